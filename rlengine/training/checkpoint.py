"""Checkpoints that let an interrupted run finish exactly as an uninterrupted one would.

A checkpoint is a directory ``checkpoints/step-00000120/`` holding ``state.pt``: whatever the
trainer puts there (model, optimizer and scheduler state, its counters). No RNG state: the
trainers make every random draw a function of (seed, step), so none is needed to resume
exactly. It is written under a temporary name and
renamed into place, so a run killed while saving (SIGKILL included) leaves either the whole
checkpoint or none: resume always finds the newest *complete* one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.pt"


class CheckpointManager:
    """Saves to and finds checkpoints in ``directory / "checkpoints"``, keeping the newest
    ``keep_last`` (0 keeps all)."""

    def __init__(self, directory: str | Path, *, keep_last: int = 2):
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        self.root = Path(directory) / "checkpoints"
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        final = self.path(step)
        partial = self.root / f".partial-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        torch.save(state, partial / STATE_FILE)
        _fsync_file(partial / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        self._prune()
        return final

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        path = Path(path)
        file = path / STATE_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no checkpoint state at {file}")
        # Our own files, holding optimizer state and RNG states as well as tensors.
        return torch.load(file, map_location="cpu", weights_only=False)

    def _prune(self) -> None:
        for stale in self.root.glob(".partial-step-*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)
        if self.keep_last:
            for step in self.steps()[:-self.keep_last]:
                shutil.rmtree(self.path(step), ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
