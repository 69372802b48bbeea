"""The quickstart's stages, and how each is run, reused, skipped or re-run.

Every stage writes into its own folder under the report folder and, when it finishes, a record
``<stage>/stage.json``: the settings it ran with, the run ids of the stages it read, its own run
id and its metrics (also in ``<stage>/metrics.jsonl``). On the next run a stage is reused when
its record exists, its settings are unchanged and the stages it read are the same runs; else it
runs again, and so does everything after it that read it. ``--rerun`` forces stages to run,
``--skip`` leaves them out (their saved outputs are still used when they exist).

A stage that is interrupted leaves a record marked running; run again with the same settings it
keeps its folder, so its trainers resume from their newest checkpoints.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from rlengine.files import atomic_write
from rlengine.quickstart.settings import QuickstartSettings
from rlengine.training.progress import say

MetricRow = dict[str, Any]


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[Run], list[MetricRow]]
    needs: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()   # the QuickstartSettings fields it depends on
    always: bool = False             # runs every time (the report: it reads every stage)


@dataclass
class Run:
    """What a stage sees: the report folder, the settings, and the records of the stages that
    ran (or were reused) before it in this pipeline run."""

    out: Path
    settings: QuickstartSettings
    progress: bool = True
    records: dict[str, dict[str, Any]] = field(default_factory=dict)

    def folder(self, stage: str) -> Path:
        return self.out / stage

    def say(self, message: str) -> None:
        say(message)

    @cached_property
    def task(self):
        from rlengine.reward.job import synthetic_task

        return synthetic_task(self.settings.task_seed)

    def sft_policy(self):
        """A fresh copy of the SFT policy the sft stage saved."""
        from rlengine.policy.job import load_causal_lm

        return load_causal_lm(str(self.folder("sft") / "model"), "model").eval()

    def heldout_prompts(self) -> list[str]:
        return self.task.prompts(self.settings.heldout_prompts, seed=900)


def _record_path(out: Path, stage: str) -> Path:
    return out / stage / "stage.json"


def read_record(out: Path, stage: str) -> dict[str, Any] | None:
    path = _record_path(out, stage)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record is a stage to run again


def _write_record(out: Path, stage: str, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(_record_path(out, stage), lambda tmp: tmp.write_text(text))


def write_metrics(path: Path, rows: Sequence[MetricRow]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass
class Outcome:
    stage: str
    status: str          # ran, reused, skipped, saved (skipped, saved outputs used), missing
    seconds: float = 0.0
    reason: str = ""


def run_pipeline(stages: Sequence[Stage], run: Run, *, skip: set[str], rerun: set[str],
                 overall=None) -> list[Outcome]:
    """Run ``stages`` in order (see the module docstring). ``overall`` (a progress bar, or
    None) advances once per stage."""
    outcomes: list[Outcome] = []
    available: dict[str, str] = {}   # stage -> the run id of its outputs
    for stage in stages:
        record = read_record(run.out, stage.name)
        settings = {name: _jsonable(getattr(run.settings, name)) for name in stage.settings}
        missing = [need for need in stage.needs if need not in available]
        inputs = {need: available[need] for need in stage.needs if need in available}
        finished = record is not None and record.get("status") == "finished"
        if stage.name in skip:
            if finished:
                available[stage.name] = record["run_id"]
                run.records[stage.name] = record
                outcomes.append(Outcome(stage.name, "saved", reason="skipped; its saved "
                                        "outputs are used"))
            else:
                outcomes.append(Outcome(stage.name, "skipped", reason="skipped"))
            run.say(f"[{stage.name}] {outcomes[-1].reason}")
        elif missing:
            outcomes.append(Outcome(stage.name, "missing",
                                    reason=f"not run: needs {', '.join(missing)}, which did not "
                                           f"run and has no saved outputs"))
            run.say(f"[{stage.name}] {outcomes[-1].reason}")
        elif (finished and not stage.always and stage.name not in rerun
              and record["settings"] == settings and record["inputs"] == inputs):
            available[stage.name] = record["run_id"]
            run.records[stage.name] = record
            outcomes.append(Outcome(stage.name, "reused", reason=f"reused from "
                                    f"{run.folder(stage.name)} (--rerun {stage.name} to run it "
                                    f"again)"))
            run.say(f"[{stage.name}] {outcomes[-1].reason}")
        else:
            outcomes.append(_run_stage(stage, run, record, settings, inputs))
            available[stage.name] = run.records[stage.name]["run_id"]
        if overall is not None:
            overall.update(1)
    return outcomes


def _run_stage(stage: Stage, run: Run, record: dict[str, Any] | None, settings: dict[str, Any],
               inputs: dict[str, str]) -> Outcome:
    folder = run.folder(stage.name)
    interrupted = (record is not None and record.get("status") == "running"
                   and record["settings"] == settings and record["inputs"] == inputs)
    if folder.exists() and not interrupted:
        shutil.rmtree(folder)  # outputs of other settings or inputs: nothing to resume
    if interrupted:
        run.say(f"[{stage.name}] resuming an interrupted run")
    run_id = record["run_id"] if interrupted else uuid.uuid4().hex[:12]
    _write_record(run.out, stage.name, {"status": "running", "run_id": run_id,
                                        "settings": settings, "inputs": inputs})
    run.say(f"[{stage.name}] {stage.title}")
    began = time.perf_counter()
    rows = [{"stage": stage.name, **row} for row in stage.run(run)]
    seconds = time.perf_counter() - began
    rows.append({"stage": stage.name, "run": "stage", "metric": "seconds", "value": seconds})
    write_metrics(folder / "metrics.jsonl", rows)
    # threads: a resumed pipeline may run its stages with different thread counts (the
    # default follows the machine's load), and the report shows each stage's
    record = {"status": "finished", "run_id": run_id, "settings": settings, "inputs": inputs,
              "seconds": seconds, "threads": torch.get_num_threads(),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "metrics": rows}
    _write_record(run.out, stage.name, record)
    run.records[stage.name] = record
    run.say(f"[{stage.name}] done in {seconds:.0f} s")
    return Outcome(stage.name, "ran", seconds)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
