"""rlengine.integrations inside each trainer's own virtual environment (tests/trainer_envs.py):
the differential tests of tests/integrations/<trainer>/ run there, and the trainer's own tests
that ship in its package run with the patch applied, through the trainer's plugin hook."""

import re
import subprocess
import sysconfig  # noqa: F401  (documentation: the trainer's tests live in its purelib)
from pathlib import Path

import pytest
import trainer_envs
from helpers import REPO

pytestmark = pytest.mark.slow

# cachetools, uvicorn, fastapi: imported by ray_trainer, which two of its CPU tests import
VERL = ["verl==0.9.1", "cachetools", "uvicorn", "fastapi"]
# veRL's CPU tests that need packages outside its default install (TransferQueue: the
# "verl-core" extra) are left out.
VERL_TESTS_NEEDING_EXTRAS = {"test_multi_trajectories_advantage_on_cpu.py"}


def _pytest(python: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env=trainer_envs.environment(RLENGINE_TRAINER_ENV="1", **env))


@pytest.fixture(scope="module")
def verl_python() -> Path:
    return trainer_envs.ensure("verl", VERL)


def test_verl_shims_match_verls_functions(verl_python):
    result = _pytest(verl_python, "tests/integrations/verl")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\b15 passed\b", result.stdout), result.stdout[-2000:]


def test_verls_own_cpu_tests_pass_with_the_patch_applied_by_its_plugin_hook(verl_python):
    purelib = subprocess.run([str(verl_python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    tests = sorted(str(path) for path in (Path(purelib) / "tests" / "trainer").rglob("*_on_cpu.py")
                   if path.name not in VERL_TESTS_NEEDING_EXTRAS)
    assert any(t.endswith("test_core_algos_on_cpu.py") for t in tests)
    plain = _pytest(verl_python, *tests, RLENGINE_VERL="0")
    patched = _pytest(verl_python, "-p", "rlengine_patch_report", *tests, RLENGINE_VERL="1",
                      PYTHONPATH=str(REPO / "tests" / "integrations" / "verl"))
    assert plain.returncode == 0, plain.stdout[-4000:]
    assert patched.returncode == 0, patched.stdout[-6000:] + patched.stderr[-2000:]
    passed = [re.search(r"(\d+) passed", r.stdout).group(1) for r in (plain, patched)]
    assert passed[0] == passed[1], passed
    calls = dict(re.findall(r"rlengine verl patch: (\w+) rlengine=(\d+) original=\d+",
                            patched.stdout))
    assert all(int(calls[part]) > 0 for part in ("gae", "masked_stats", "whiten")), calls
