"""Where training metrics go: a JSONL file (one object per record, always), TensorBoard
(optional, ``pip install tensorboard``) and the console. Only the main process writes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from rlengine.files import atomic_write


class MetricsLogger:
    """``log(step, {"train/loss": ...})`` appends ``{"step": step, "train/loss": ...}`` to
    ``metrics.jsonl`` in ``directory`` and writes each scalar to TensorBoard when enabled.

    On resume, pass ``resume_step``: records after it (written by the interrupted run after its
    last checkpoint) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, directory: str | Path | None, *, tensorboard: bool = False,
                 enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled and directory is not None
        self.path = None if directory is None else Path(directory) / "metrics.jsonl"
        self._writer = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines()
                        if (step := _step_of(line)) is not None and step <= resume_step]
                # atomically: a kill during the rewrite must not lose the records kept
                text = "".join(line + "\n" for line in kept)
                atomic_write(self.path, lambda temporary: temporary.write_text(text))
        else:
            # A fresh run: the records of an earlier run in this directory go, TensorBoard's
            # events as well (they would otherwise show as a second curve over the same steps).
            self.path.unlink(missing_ok=True)
            shutil.rmtree(Path(directory) / "tensorboard", ignore_errors=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("TensorBoard logging needs the tensorboard package: "
                                  "pip install tensorboard (or turn tensorboard off)") from error
            self._writer = SummaryWriter(log_dir=str(Path(directory) / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank line or one cut short by a run killed
    while writing it, which resuming drops."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a file or the run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
