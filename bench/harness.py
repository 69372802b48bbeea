"""The shared benchmark harness: time (pytest-benchmark) and peak memory of one implementation
of one case, so that every family's benchmarks report the same fields.

Each benchmark is a pytest test parametrized over implementations (``rlengine`` and the
baselines); the pytest-benchmark group is the case, and bench/report.py turns a run's JSON into
a table of speedups of rlengine over each baseline measured in the same run.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes that fn allocates through torch's allocator above what was allocated
    when it started (its outputs included), from the profiler's allocator events. Allocations
    made outside torch's allocator (a kernel's stack buffers) are not seen."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def run(benchmark, fn: Callable[[], object], *, rounds: int = 5, warmup_rounds: int = 1,
        memory: bool = True, **info) -> None:
    """Time fn with pytest-benchmark (median over rounds after warm-up) and record its peak
    memory and any extra facts (shapes, dtype) in the result's extra_info.

    The first warm-up round runs before the memory probe too, so that neither measurement sees
    compilation or lazy initialisation; warmup_rounds=0 (for baselines too slow to repeat) runs
    nothing untimed but the probe."""
    if warmup_rounds > 0:
        fn()
        warmup_rounds -= 1
    if memory:
        info["peak_mb"] = round(peak_allocated_bytes(fn) / 2**20, 3)
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def backward_of(forward: Callable[[], torch.Tensor | tuple], inputs: list[torch.Tensor]):
    """A callable running forward + backward w.r.t. inputs with fixed random output gradients
    (drawn once, outside the timed region)."""
    with torch.no_grad():
        probe = forward()
    outputs = probe if isinstance(probe, tuple) else (probe,)
    grads = [torch.randn_like(o) for o in outputs]

    def step():
        out = forward()
        out = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(out, inputs, grads)

    return step


def peak_rss_growth_mb(fn: Callable[[], object]) -> float | None:
    """How far the process's resident memory rose above its level before fn while fn ran (its
    high-water VmHWM, reset through /proc/self/clear_refs, minus VmRSS before), in MiB: unlike
    peak_allocated_bytes it sees every allocation (the kernels' own buffers, the C library's),
    but memory that an earlier call freed to the C library and fn reuses is not counted. None
    where Linux's clear_refs is not available."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    result = fn()
    del result
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")
