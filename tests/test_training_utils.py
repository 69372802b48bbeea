"""rlengine.training (schedules, checkpoints, metrics, single-process distributed context) and
rlengine.configs (typed YAML options and their errors)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from rlengine.configs import (
    ConfigError,
    add_arguments,
    coerce,
    from_mapping,
    from_sources,
    load_yaml,
    option,
    to_yaml,
)
from rlengine.training import (
    SCHEDULES,
    CheckpointManager,
    MetricsLogger,
    init_distributed,
    make_scheduler,
)
from rlengine.training.metrics import read_metrics
from rlengine.training.schedules import lr_multiplier

# ---- schedules --------------------------------------------------------------------------------


def _multipliers(schedule, warmup, total, min_ratio=0.0, steps=None):
    return [lr_multiplier(s, schedule=schedule, warmup_steps=warmup, total_steps=total,
                          min_ratio=min_ratio) for s in range(steps or total + 1)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_is_linear_and_reaches_one(schedule):
    m = _multipliers(schedule, 4, 20)
    assert m[:4] == [0.25, 0.5, 0.75, 1.0]


def test_inverse_sqrt_is_continuous_after_warmup():
    warmup = 10
    m = _multipliers("inverse_sqrt", warmup, 100)
    # the decay formula sqrt(w / (s + 1)) equals the warm-up's last value (1) at s = w - 1 and
    # decays from there: no jump at the end of warm-up
    assert m[warmup - 1] == 1.0
    assert m[warmup] == pytest.approx(math.sqrt(warmup / (warmup + 1)))
    assert abs(m[warmup] - m[warmup - 1]) < 0.05
    for s in range(warmup, 100):
        assert m[s] == pytest.approx(math.sqrt(warmup / (s + 1)))
    assert all(a > b for a, b in zip(m[warmup - 1:], m[warmup:]))
    # no warm-up: 1 at the first step, then 1/sqrt(s + 1)
    assert _multipliers("inverse_sqrt", 0, 10)[:4] == pytest.approx(
        [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_cosine_and_linear_endpoints(schedule, min_ratio):
    warmup, total = 5, 25
    m = _multipliers(schedule, warmup, total, min_ratio, steps=total + 5)
    assert m[warmup] == 1.0
    assert m[total] == pytest.approx(min_ratio)
    assert m[total + 4] == pytest.approx(min_ratio)  # stays at the floor past the end
    middle = warmup + (total - warmup) // 2
    assert m[middle] == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)
    assert all(a >= b for a, b in zip(m[warmup:], m[warmup + 1:]))
    if schedule == "linear":
        assert m[warmup + 5] == pytest.approx(min_ratio + (1 - min_ratio) * 0.75)
    else:
        assert m[warmup + 5] == pytest.approx(
            min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_constant():
    assert _multipliers("constant", 0, 10) == [1.0] * 11
    assert _multipliers("constant", 2, 10)[:4] == [0.5, 1.0, 1.0, 1.0]


def test_scheduler_drives_the_optimizer():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.2)
    scheduler = make_scheduler(optimizer, schedule="cosine", warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [0.2 * m for m in _multipliers("cosine", 2, 6, steps=6)]
    assert seen == pytest.approx(expected)


def test_schedule_errors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_scheduler(optimizer, schedule="step", warmup_steps=0, total_steps=5)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        make_scheduler(optimizer, schedule="cosine", warmup_steps=-1, total_steps=5)
    with pytest.raises(ValueError, match=r"min_lr_ratio must be in \[0, 1\]"):
        make_scheduler(optimizer, schedule="cosine", warmup_steps=0, total_steps=5,
                       min_ratio=1.5)


# ---- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_save_load_and_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.steps() == [] and manager.latest() is None
    for step in (3, 6, 9):
        path = manager.save(step, {"step": step, "weights": torch.full((2,), float(step))})
        assert path == tmp_path / "checkpoints" / f"step-{step:08d}"
    assert manager.steps() == [6, 9]
    assert not manager.path(3).exists()
    assert manager.latest() == manager.path(9)
    state = CheckpointManager.load(manager.latest())
    assert state["step"] == 9
    torch.testing.assert_close(state["weights"], torch.full((2,), 9.0))
    # the state file itself works too
    assert CheckpointManager.load(manager.latest() / "state.pt")["step"] == 9
    # keep_last=0 keeps everything
    everything = CheckpointManager(tmp_path / "all", keep_last=0)
    for step in range(1, 5):
        everything.save(step, {"step": step})
    assert everything.steps() == [1, 2, 3, 4]
    # saving a step again replaces it
    everything.save(4, {"step": 44})
    assert CheckpointManager.load(everything.path(4))["step"] == 44


def test_checkpoint_ignores_partial_and_incomplete_directories(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(5, {"step": 5})
    # what a run killed while saving leaves: a partial directory (even with a complete-looking
    # state file), and a step directory with no state file; neither is a checkpoint
    partial = manager.root / ".partial-step-00000010-999999"
    partial.mkdir()
    torch.save({"step": 10}, partial / "state.pt")
    (manager.root / "step-00000012").mkdir()
    (manager.root / "notes").mkdir()
    assert manager.steps() == [5]
    assert CheckpointManager.load(manager.latest())["step"] == 5
    # the next save sweeps other processes' leftovers away
    manager.save(7, {"step": 7})
    assert not partial.exists()
    assert manager.steps() == [5, 7]
    assert not any(p.name.startswith(".partial") for p in manager.root.iterdir())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 0"):
        CheckpointManager(tmp_path, keep_last=-1)
    with pytest.raises(FileNotFoundError, match="no checkpoint state at"):
        CheckpointManager.load(tmp_path / "nothing")


# ---- metrics ----------------------------------------------------------------------------------


def test_metrics_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"train/loss": torch.tensor(0.5), "train/lr": 1e-3})
    logger.log(2, {"train/loss": float("nan"), "eval/x": float("inf"), "note": "text"})
    logger.close()
    records = read_metrics(tmp_path)
    assert records == [{"step": 1, "train/loss": 0.5, "train/lr": 1e-3},
                       {"step": 2, "train/loss": None, "eval/x": "inf", "note": "text"}]
    assert read_metrics(tmp_path / "metrics.jsonl") == records
    # a fresh (not resumed) logger starts the file over
    MetricsLogger(tmp_path).close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_metrics_truncated_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 7):
        logger.log(step, {"train/loss": float(step)})
    logger.close()
    # a run killed in the middle of a write leaves a cut last line
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 7, "train/lo')
    resumed = MetricsLogger(tmp_path, resume_step=4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    resumed.log(5, {"train/loss": 50.0})
    resumed.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)][-2:] == \
        [(4, 4.0), (5, 50.0)]


def test_metrics_disabled_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=False)
    logger.log(1, {"train/loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []
    MetricsLogger(None).log(1, {"x": 1.0})  # no directory: a no-op


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        logger.log(step, {"train/loss": 1.0 / step, "eval/nan": float("nan"), "text": "x"})
    logger.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert accumulator.Tags()["scalars"] == ["train/loss"]  # non-finite and text skipped
    scalars = accumulator.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([1.0, 0.5, 1 / 3])

    # a resumed run replaces the steps after its checkpoint (even with no metrics.jsonl left)
    (tmp_path / "metrics.jsonl").unlink()
    logger = MetricsLogger(tmp_path, tensorboard=True, resume_step=1)
    logger.log(2, {"train/loss": 7.0})
    logger.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    scalars = accumulator.Scalars("train/loss")
    assert [(s.step, s.value) for s in scalars] == [(1, 1.0), (2, 7.0)]

    # a fresh run in the same directory starts TensorBoard over too
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log(1, {"train/loss": 3.0})
    logger.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [(s.step, s.value) for s in accumulator.Scalars("train/loss")] == [(1, 3.0)]


# ---- distributed (one process) ----------------------------------------------------------------


def test_single_process_context(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed("cpu")
    assert (context.rank, context.world_size, context.enabled, context.is_main) == \
        (0, 1, False, True)
    assert context.device == torch.device("cpu")
    t = torch.tensor([1.0, 2.0])
    assert context.all_reduce_sum(t) is t
    assert context.broadcast_object({"a": 1}) == {"a": 1}
    context.barrier()


# ---- configs ----------------------------------------------------------------------------------


@dataclass
class _Options:
    count: int = option(1, "an int")
    rate: float = option(0.5, "a float")
    name: str = option("x", "a string")
    flag: bool = option(False, "a bool")
    mode: Literal["fast", "slow"] = option("fast", "a literal")
    limit: int | None = option(None, "an optional int")
    tags: list[str] = option(["a"], "a list")
    table: dict[str, str] = option({}, "a mapping")
    batch_size: int = option(8, "batch")
    batch_count: int = option(2, "batches")

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


@pytest.mark.parametrize("kind, value, expected", [
    (int, "12", 12), (int, 7, 7), (float, "1e-3", 1e-3), (float, 2, 2.0), (str, 3, "3"),
    (bool, "yes", True), (bool, "off", False), (bool, True, True),
    (Literal["fast", "slow"], "slow", "slow"), (int | None, "none", None),
    (int | None, None, None), (int | None, "null", None), (int | None, "4", 4),
    (list[int], "1,2, 3", [1, 2, 3]), (list[str], ["a", "b"], ["a", "b"]),
    (dict[str, str], "a=1, b = x", {"a": "1", "b": "x"}), (dict[str, str], {"k": 2}, {"k": "2"}),
])
def test_coerce(kind, value, expected):
    assert coerce(kind, value, "here") == expected


@pytest.mark.parametrize("kind, value, message", [
    (int, "1.5", "cfg.yaml: steps: expected an integer, got '1.5'"),
    (int, 1.5, "expected an integer, got 1.5"),
    (int, True, "expected an integer, got True"),
    (float, "fast", "expected a number, got 'fast'"),
    (float, False, "expected a number"),
    (bool, "maybe", "expected true or false, got 'maybe'"),
    (Literal["fast", "slow"], "medium", "must be one of fast, slow; got 'medium'"),
    (int, None, "a value is required"),
    (list[int], 3, "expected a list"),
    (list[int], "1,x", r"steps\[1\]: expected an integer"),
    (dict[str, str], "a=1,b", "expected name=value"),
    (str, [1], "expected a string"),
])
def test_coerce_errors(kind, value, message):
    with pytest.raises(ConfigError, match=message):
        coerce(kind, value, "cfg.yaml: steps")


def test_from_mapping():
    options = from_mapping(_Options, {"count": "3", "batch-size": 16, "limit": "none",
                                      "mode": "slow", "tags": "x,y"}, "run.yaml")
    assert (options.count, options.batch_size, options.limit, options.mode, options.tags) == \
        (3, 16, None, "slow", ["x", "y"])
    assert _Options().tags is not _Options().tags  # list defaults are per instance


@pytest.mark.parametrize("key, similar", [
    ("batch_sise", "batch_size"),      # a typo
    ("batch", "batch_size"),           # a prefix
    ("cont", "count"),
])
def test_unknown_key_suggests_similar(key, similar):
    with pytest.raises(ConfigError, match=f"run.yaml: unknown option '{key}'") as error:
        from_mapping(_Options, {key: 1}, "run.yaml")
    assert similar in str(error.value)


def test_unknown_key_without_similar_names():
    with pytest.raises(ConfigError, match=r"unknown option 'zzzz'$"):
        from_mapping(_Options, {"zzzz": 1}, "run.yaml")


def test_validation_error_names_the_source():
    with pytest.raises(ConfigError, match="run.yaml: count must be >= 0, got -1"):
        from_mapping(_Options, {"count": -1}, "run.yaml")


def test_yaml_loading(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("count: 4\nlimit: null\nmode: slow\n")
    assert load_yaml(path) == {"count": 4, "limit": None, "mode": "slow"}
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("count: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("count: 4\nbatch-size: 32\nrate: 0.25\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Options)
    (options,), given = from_sources(
        [_Options], parser.parse_args(["--batch-size", "64", "--limit", "none"]),
        config_path=str(path))
    assert (options.count, options.batch_size, options.rate, options.limit) == (4, 64, 0.25, None)
    assert given == {"count", "batch_size", "rate", "limit"}
    # a bad flag value names the flag
    with pytest.raises(ConfigError, match=r"command line: --count: expected an integer"):
        from_sources([_Options], parser.parse_args(["--count", "many"]), config_path=str(path))
    # every option is in --help with its default
    text = parser.format_help()
    assert "--batch-size" in text and "[fast|slow]" in text and "(default: 8)" in text


def test_to_yaml_round_trip(tmp_path):
    options = _Options(count=9, limit=3, tags=["p", "q"], table={"a": "b"})
    path = tmp_path / "out.yaml"
    path.write_text(to_yaml(options))
    assert from_mapping(_Options, load_yaml(path), str(path)) == options
    assert json.loads(json.dumps(load_yaml(path)))["count"] == 9
