"""The pip route: an sdist of this checkout, a wheel built from it by pip with build isolation
(the extension is built against the torch of the environment it goes into), and that wheel
installed with its dependencies into a fresh virtual environment that holds only the CPU build
of torch (`make torch-cpu`): no CUDA wheel is installed, and the ops and the command work."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import venv

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow

# What a CUDA build of torch brings along; none may be installed.
CUDA_PACKAGES = ("nvidia-", "cuda-", "triton")


def _run(*command, cwd=None, timeout=900) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                            cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_sdist_wheel_and_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    _run(sys.executable, "-c", f"from scikit_build_core.build import build_sdist; "
                               f"build_sdist({str(dist)!r})", cwd=REPO)
    sdist, = dist.glob("rlengine-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    for needed in ("CMakeLists.txt", "csrc/registration.cpp", "rlengine/ops/__init__.py",
                   "rlengine/cli/__main__.py", "pyproject.toml", "README.md"):
        assert any(name.endswith(f"/{needed}") for name in names), needed
    assert not any(name.endswith(".so") for name in names)

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    _run("make", "-s", "torch-cpu", f"PYTHON={python}", cwd=REPO)
    # pip builds the wheel in an isolated environment, which cannot import the venv's torch:
    # CMakeLists.txt finds it in the venv's site-packages
    _run(python, "-m", "pip", "wheel", "--no-deps", "-w", dist, sdist)
    wheel, = dist.glob("rlengine-*.whl")
    _run(python, "-m", "pip", "install", wheel)

    installed = json.loads(_run(python, "-m", "pip", "list", "--format", "json"))
    names = {p["name"].lower(): p["version"] for p in installed}
    assert names["torch"].endswith("+cpu") and "rlengine" in names
    assert not [n for n in names if n.startswith(CUDA_PACKAGES)], sorted(names)

    check = ("import torch\n"
             "from rlengine import ops, _extension\n"
             "assert _extension.library_path().startswith(%r)\n"
             "assert _extension.built_against() == torch.__version__\n"
             "logits = torch.randn(3, 5, 11)\n"
             "labels = torch.randint(0, 11, (3, 5))\n"
             "expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]\n"
             "torch.testing.assert_close(ops.token_logprobs(logits, labels), expected)\n"
             "print('ok')" % str(env))
    assert _run(python, "-c", check, cwd=tmp_path).strip() == "ok"
    out = _run(env / "bin" / "rlengine", "kernels", "--batch", "2", "--seq-len", "8",
               "--vocab", "64", "--repeats", "1", cwd=tmp_path)
    assert "speedup" in out and "gae" in out
