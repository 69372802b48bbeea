"""Virtual environments for the trainers that rlengine.integrations patches. veRL, OpenRLHF and
TRL pin conflicting transformers versions, so each gets its own environment under
build/trainer-venvs/<name>, with the CPU torch the suite runs on and rlengine installed
editable (its build is reused). An environment is rebuilt only when what went into it changed:
its requirements, the torch version, or the extension's sources."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import torch
from helpers import REPO

ROOT = REPO / "build" / "trainer-venvs"
STAMP = ".rlengine-stamp.json"


def _sources_digest() -> str:
    """What a rebuild of the extension depends on (Python files are read in place)."""
    digest = hashlib.sha256()
    paths = [REPO / "CMakeLists.txt", REPO / "pyproject.toml",
             *sorted((REPO / "csrc").rglob("*"))]
    for path in paths:
        if path.is_file():
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command)}):\n{result.stdout[-3000:]}\n"
                           f"{result.stderr[-3000:]}")


def ensure(name: str, requirements: list[str]) -> Path:
    """The python of build/trainer-venvs/<name>, created or brought up to date."""
    folder = ROOT / name
    python = folder / "bin" / "python"
    wanted = {"requirements": requirements, "torch": torch.__version__,
              "python": sys.version.split()[0], "extension": _sources_digest()}
    stamp = folder / STAMP
    have = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if have == wanted:
        return python
    if have.get("python") != wanted["python"] or not python.exists():
        venv.EnvBuilder(clear=True, with_pip=True).create(folder)
        have = {}
    if have.get("torch") != wanted["torch"] or have.get("requirements") != requirements:
        # the CPU torch first, by name (the Makefile's rule), so that no requirement pulls a
        # CUDA build; then the trainer and the test tools
        _run(["make", "-s", "torch-cpu", f"PYTHON={python}",
              f"TORCH_VERSION={torch.__version__.split('+')[0]}"], f"torch for {name}")
        _run([str(python), "-m", "pip", "install", "-q", *requirements,
              "scikit-build-core", "pytest", "hypothesis"], f"{name}'s requirements")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
          str(REPO)], f"rlengine into {name}'s environment")
    stamp.write_text(json.dumps(wanted, indent=1))
    return python


def environment(**extra: str) -> dict[str, str]:
    """The environment of a run inside a trainer's venv: none of this venv's paths."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env
