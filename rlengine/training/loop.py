"""The parts of a training loop every trainer of the engine shares: per-step seeds (what makes
a resumed run exact), opening a run directory (resume or start over), one all-reduce of a
step's logged numbers, resume-invariant checks, checkpoint saving and loading, the result
fields and the progress bar."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlengine.configs import to_yaml
from rlengine.files import atomic_write
from rlengine.training.checkpoint import CheckpointManager
from rlengine.training.distributed import DistributedContext
from rlengine.training.metrics import MetricsLogger
from rlengine.training.progress import progress_bar


@dataclass(kw_only=True)
class RunResult:
    """What every trainer's result has besides its own numbers: the step it resumed from (None
    for a fresh run), the seconds train() took and where the final model went (None when not
    saved)."""

    resumed_from: int | None = None
    seconds: float = 0.0
    model_dir: Path | None = None


def step_seed(seed: int, step: int, rank: int) -> int:
    """Distinct, reproducible random streams per (seed, step, process): reseeding from it at
    every step makes a run's draws independent of where it was interrupted."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def open_checkpoints(output_dir: str | None, *, keep_last: int, resume: bool,
                     dist: DistributedContext, load: Callable[[Path], int], log,
                     total_steps: int) -> tuple[CheckpointManager | None, int | None]:
    """The run's CheckpointManager (None without an output directory) and the step it resumed
    from: the newest checkpoint is loaded with ``load`` when ``resume``, else deleted."""
    if not output_dir:
        return None, None
    checkpoints = CheckpointManager(output_dir, keep_last=keep_last)
    resumed_from = None
    latest = checkpoints.latest()
    if latest is not None and resume:
        resumed_from = load(latest)
        log(f"resumed from {latest} (step {resumed_from} of {total_steps})")
    elif latest is not None and dist.is_main:
        shutil.rmtree(checkpoints.root, ignore_errors=True)
    dist.barrier()
    return checkpoints, resumed_from


def start_run(config: Any, *, dist: DistributedContext, load: Callable[[Path], int], log,
              total_steps: int, position: Callable[[], int], describe: Callable[[], str],
              desc: str):
    """The opening of a trainer's train(): its checkpoints and the step it resumed from (see
    open_checkpoints), its metrics logger (config.yaml written beside it), ``describe()``
    logged when the run starts fresh, and a progress bar from ``position()`` (read after the
    resume) to ``total_steps``. ``config`` has output_dir, keep_checkpoints, resume,
    tensorboard and progress. Returns (checkpoints, resumed_from, logger, progress)."""
    checkpoints, resumed_from = open_checkpoints(
        config.output_dir, keep_last=config.keep_checkpoints, resume=config.resume, dist=dist,
        load=load, log=log, total_steps=total_steps)
    logger = MetricsLogger(config.output_dir, tensorboard=config.tensorboard,
                           enabled=dist.is_main, resume_step=resumed_from)
    if dist.is_main and config.output_dir:
        text = to_yaml(config)
        atomic_write(Path(config.output_dir) / "config.yaml", lambda tmp: tmp.write_text(text))
    if resumed_from is None:
        log(describe())
    progress = progress_bar(config.progress and dist.is_main, total_steps, position(), desc)
    return checkpoints, resumed_from, logger, progress


def save_checkpoint(checkpoints: CheckpointManager, step: int,
                    state_dict: Callable[[], dict[str, Any]], dist: DistributedContext) -> None:
    """``state_dict()`` saved as step ``step`` by the main process; the others wait for it."""
    if dist.is_main:
        checkpoints.save(step, state_dict())
    dist.barrier()


def load_checkpoint_state(path: str | Path, config: Any, invariant: Sequence[str], *,
                          size_key: str, size: int, size_name: str | None = None
                          ) -> dict[str, Any]:
    """A checkpoint's state, or a ValueError when a resume-invariant option of ``config`` or
    the data size (``state[size_key]`` against ``size``) changed since it was written."""
    state = CheckpointManager.load(path)
    changed = resume_conflicts(state["config"], config, invariant)
    if state[size_key] != size:
        changed.append(f"{size_name or size_key}: {state[size_key]} -> {size}")
    refuse_resume(path, changed)
    return state


def save_policy(policy: torch.nn.Module, tokenizer: Any, output_dir: str | Path) -> Path:
    """A trained causal LM and its tokenizer in ``output_dir / "model"``."""
    model_dir = Path(output_dir) / "model"
    policy.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def gather_chunks(make_chunk: Callable[[int], Any], chunks: int, dist: DistributedContext, *,
                  send: Callable[[Any], Any] | None = None) -> list[Any]:
    """``[make_chunk(0), ..., make_chunk(chunks - 1)]`` on every process: each makes the chunks
    ``chunk % world == rank``, then all exchange them (each passed through ``send`` first,
    e.g. to the CPU)."""
    mine = {c: make_chunk(c) for c in range(dist.rank, chunks, dist.world_size)}
    if dist.enabled:
        merged: dict[int, Any] = {}
        for part in dist.all_gather_object(
                mine if send is None else {c: send(value) for c, value in mine.items()}):
            merged.update(part)
        mine = merged
    return [mine[c] for c in range(chunks)]


def evaluate_on_main(evaluate_fn: Callable[[torch.nn.Module], dict[str, Any]],
                     model: torch.nn.Module, dist: DistributedContext) -> dict[str, float]:
    """``evaluate_fn(model)``'s numbers as floats on every process: computed on the main
    process with the model in eval mode (its mode restored after), broadcast to the others."""
    results: dict[str, float] = {}
    if dist.is_main:
        was_training = model.training
        model.eval()
        try:
            results = {k: float(v) for k, v in evaluate_fn(model).items()}
        finally:
            model.train(was_training)
    return dist.broadcast_object(results)


def micro_batch_size(batch: int, name: str, dist: DistributedContext, grad_accum: int) -> int:
    """The rows of one micro-batch of one process, or a ValueError when the global ``batch``
    (the option ``name``) does not split into grad_accum x processes equal parts."""
    world = dist.world_size
    if batch % (world * grad_accum):
        raise ValueError(f"{name} ({batch}) must divide into grad_accum ({grad_accum}) x "
                         f"processes ({world}) equal micro-batches")
    return batch // (world * grad_accum)


def process_micro_batches(indices: Sequence[int], dist: DistributedContext, size: int,
                          grad_accum: int) -> list[list[int]]:
    """This process's share (``size`` rows) of each of a step's ``grad_accum`` micro-batches:
    micro-batch m is ``indices[m * world * size:(m + 1) * world * size]``, split by rank."""
    world, rank = dist.world_size, dist.rank
    return [indices[(m * world + rank) * size:(m * world + rank + 1) * size]
            for m in range(grad_accum)]


def optimizer_step(parameters, optimizer, scheduler, max_grad_norm: float | None
                   ) -> tuple[torch.Tensor | None, float]:
    """Clips the gradients (when ``max_grad_norm`` is set), steps the optimizer and the
    schedule; the gradient norm before clipping (None without) and the step's learning rate."""
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    return grad_norm, lr


def finish_step_record(record: dict[str, float], lr: float, grad_norm: torch.Tensor | None,
                       tokens: float) -> dict[str, float]:
    """``record`` with the step's learning rate, gradient norm (where clipped) and tokens."""
    record["train/lr"] = lr
    if grad_norm is not None:
        record["train/grad_norm"] = float(grad_norm)
    record["train/tokens"] = tokens
    return record


def reduce_step_record(sums: dict[str, torch.Tensor], dist: DistributedContext, scale: float
                       ) -> tuple[dict[str, float], float]:
    """``{"train/<key>": sum over processes / scale}`` for every summed number of a step, and
    the summed ``tokens`` (not scaled): one tensor, one all-reduce, one copy to the host."""
    names = [key for key in sums if key != "tokens"]
    packed = torch.stack([sums[key].double() for key in [*names, "tokens"]])
    dist.all_reduce_sum(packed)
    values = packed.tolist()
    tokens = values.pop()
    return {f"train/{key}": value / scale for key, value in zip(names, values)}, tokens


def resume_conflicts(saved: dict[str, Any], config: Any, keys: Sequence[str]) -> list[str]:
    """``"key: saved -> now"`` for each resume-invariant option that changed."""
    return [f"{key}: {saved.get(key)!r} -> {getattr(config, key)!r}" for key in keys
            if saved.get(key) != getattr(config, key)]


def refuse_resume(path: str | Path, changed: list[str]) -> None:
    if changed:
        raise ValueError(f"cannot resume from {path}: the run's options changed "
                         f"({'; '.join(changed)}); use another output_dir, or resume=false "
                         f"to start over")


def data_parallel(module: torch.nn.Module, dist: DistributedContext) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel under torchrun, else itself."""
    if not dist.enabled:
        return module
    device = dist.device
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None)


def adamw_with_schedule(parameters, config: Any, total_steps: int):
    """AdamW over the parameters that require grad and its warm-up schedule, from a config's
    lr, adam_beta1/2, adam_eps, weight_decay, schedule, warmup_steps and min_lr_ratio."""
    from rlengine.training.schedules import make_scheduler

    optimizer = torch.optim.AdamW(
        [p for p in parameters if p.requires_grad], lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
        weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, schedule=config.schedule,
                               warmup_steps=config.warmup_steps, total_steps=total_steps,
                               min_ratio=config.min_lr_ratio)
    return optimizer, scheduler


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to ``dtype`` on ``device``, or no autocast for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for ``mixed_precision="bf16"``, or ``"auto"`` on CUDA; None (no autocast) else."""
    if mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
