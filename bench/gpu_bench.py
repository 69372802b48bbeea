"""The GPU benchmarks: rlengine against the anchors' implementations, all in one process.

    python bench/gpu_bench.py --out DIR [--only logprobs,fused_linear,gae,reward_step] [--smoke]

Run by bench/gpu_run.sh on a GPU machine; it writes DIR/<run>.json (every measurement, the
machine and the versions) and DIR/<run>.md (tables of medians, peak memory and rlengine's speedup
over each baseline, then the issue's acceptance targets, each a ratio of two numbers measured in
this run). --smoke runs every case at toy shapes on whatever device is there (the CPU too), to
check the script itself; its numbers mean nothing.

Baselines (imported where they are packages, so that we time the real thing):
  eager          torch: upcast to fp32, log_softmax, gather (+ p * log p for the entropy)
  compile        torch.compile of rlengine.ops.reference (static shapes; compiled per shape)
  trl            trl.trainer.utils.selective_log_softmax (+ entropy_from_logits)
  trl_kernel     trl.kernels' fused selective_log_softmax_and_entropy, where TRL ships it
  liger          liger_kernel's cross entropy / fused linear cross entropy, reduction="none"
                 (its per-token loss is -log p; it has no entropy)
  cce            cut_cross_entropy.linear_cross_entropy, reduction="none"
  python_loop    TRL's GAE loop over time (bench/bench_gae.py)
  torch_blocked  a loop-free GAE in torch: within blocks of 128 steps a matrix product with the
                 discount matrix, across blocks a second one (all-valid mask, as its formula needs)
  copy / matmul  a device-to-device copy and an 8192^3 bf16 matrix product: the two ceilings
  reference      (family reward_step) one RewardTrainer optimizer step with kernels="reference"
                 (rlengine.ops.reference) against kernels="engine": bench/bench_reward_step.py's
                 cases, reported with the step's tokens per second
A baseline that is not installed or fails is recorded with its error and left out of the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gae import python_loop_gae  # noqa: E402  (bench/ is not a package)

import rlengine  # noqa: E402
from rlengine import ops  # noqa: E402
from rlengine.ops import reference  # noqa: E402

GAMMA, LAM = 1.0, 0.95  # the segment-reward paper's PPO settings, as in bench_gae.py


# ---- measurement ---------------------------------------------------------------------------

@dataclass
class Result:
    case: str
    impl: str
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_extra_mb: float | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)


class Bench:
    def __init__(self, device: torch.device, smoke: bool):
        self.device = device
        self.smoke = smoke
        self.results: list[Result] = []

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _time_once(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    def _peak_extra_mb(self, fn: Callable[[], object]) -> float | None:
        """Peak device memory fn allocates above what was allocated before it (its outputs
        included, freed before the next measurement)."""
        if self.device.type != "cuda":
            return None
        self.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = fn()
        self.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del out
        return peak / 2**20

    def measure(self, case: str, impl: str, fn: Callable[[], object], *, reps: int = 20,
                warmup: int = 3, budget_s: float = 20.0, **info) -> Result:
        """Median time of fn over reps runs (fewer if they would exceed budget_s), after warmup
        runs; errors (a missing package, out of memory) are recorded, not raised."""
        result = Result(case, impl, info=info)
        try:
            first = self._time_once(fn)  # also the first warm-up: compilation, autotuning
            for _ in range(max(0, warmup - 1)):
                self._time_once(fn)
            result.peak_extra_mb = self._peak_extra_mb(fn)
            reps = max(1, min(reps, int(budget_s * 1e3 / max(first, 1e-3))))
            result.times_ms = [self._time_once(fn) for _ in range(reps)]
            result.median_ms = statistics.median(result.times_ms)
        except Exception as error:  # noqa: BLE001 - recorded in the results, see docstring
            result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            if os.environ.get("RLENGINE_BENCH_TRACEBACK"):
                traceback.print_exc()
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.results.append(result)
        shown = f"{result.median_ms:10.3f} ms" if result.median_ms is not None else result.error
        peak = f"  peak +{result.peak_extra_mb:9.1f} MB" if result.peak_extra_mb is not None else ""
        print(f"{case:58s} {impl:14s} {shown}{peak}", flush=True)
        return result


def gradient_step(forward: Callable[[], torch.Tensor | tuple], inputs: list[torch.Tensor]):
    """forward + backward w.r.t. inputs, with incoming gradients drawn at the first call (a
    warm-up in Bench.measure, so the drawing is never timed) and reused after."""
    grads: list[torch.Tensor] = []

    def step():
        out = forward()
        out = out if isinstance(out, tuple) else (out,)
        if not grads:
            grads.extend(torch.randn_like(o) for o in out)
        return torch.autograd.grad(out, inputs, grads)

    return step


def optional_import(what: str, load: Callable[[], object]):
    try:
        return load(), None
    except Exception as error:  # noqa: BLE001 - the baseline is then reported as unavailable
        return None, f"{what} unavailable: {type(error).__name__}: {error}"


# ---- the ceilings --------------------------------------------------------------------------

def bench_ceilings(bench: Bench) -> dict:
    dev = bench.device
    n_bytes = 2**24 if bench.smoke else 2**31
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    copy = bench.measure("ceiling: device-to-device copy", "copy", lambda: dst.copy_(src),
                         bytes=2 * n_bytes)
    src = dst = None  # noqa: F841  (free the buffers before the matrix product)
    n = 512 if bench.smoke else 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    mm = bench.measure(f"ceiling: bf16 matmul {n}^3", "matmul", lambda: a @ b, flops=2 * n**3)
    ceilings = {}
    if copy.median_ms:
        ceilings["copy_gb_per_s"] = 2 * n_bytes / copy.median_ms / 1e6
    if mm.median_ms:
        ceilings["bf16_tflop_per_s"] = 2 * n**3 / mm.median_ms / 1e9
    print(f"ceilings: {ceilings}", flush=True)
    return ceilings


# ---- token_logprobs ------------------------------------------------------------------------

def eager_logprobs(logits, labels, with_entropy=False):
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return picked
    return picked, -(logp.exp() * logp).sum(-1)


def logprob_baselines(bench: Bench, with_entropy: bool) -> dict[str, Callable | str]:
    """impl name -> fn(logits, labels) returning log-probs (and entropy), or an error string."""
    impls: dict[str, Callable | str] = {
        "rlengine": lambda x, y: ops.token_logprobs(x, y, with_entropy=with_entropy),
        "eager": lambda x, y: eager_logprobs(x, y, with_entropy),
    }
    trl_utils, error = optional_import("trl", lambda: __import__(
        "trl.trainer.utils", fromlist=["selective_log_softmax", "entropy_from_logits"]))
    if trl_utils is None:
        impls["trl"] = error
    elif with_entropy:
        impls["trl"] = lambda x, y: (trl_utils.selective_log_softmax(x, y),
                                     trl_utils.entropy_from_logits(x))
    else:
        impls["trl"] = trl_utils.selective_log_softmax
    if with_entropy:
        kernel, error = optional_import("trl.kernels", lambda: __import__(
            "trl.kernels.logprob_entropy", fromlist=["selective_log_softmax_and_entropy"]))
        impls["trl_kernel"] = error if kernel is None else (
            lambda x, y: kernel.selective_log_softmax_and_entropy(x, y))
    else:
        liger, error = optional_import("liger_kernel", lambda: __import__(
            "liger_kernel.transformers.functional", fromlist=["liger_cross_entropy"]))
        impls["liger"] = error if liger is None else (
            lambda x, y: _first(liger.liger_cross_entropy(x, y, reduction="none")))
    return impls


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def bench_logprobs(bench: Bench, compile_all: bool) -> None:
    shapes = [(64, 1000), (128, 5003)] if bench.smoke else [
        (n, v) for n in (8192, 16384) for v in (32000, 128256, 151936)]
    for n, vocab in shapes:
        _bench_logprobs_shape(bench, n, vocab, compile_all or (n, vocab) == shapes[-1])


def fresh_logits(logits: torch.Tensor) -> None:
    """New random logits in place: Liger's cross entropy writes its gradient into its input, so
    each implementation is handed logits drawn afresh rather than what the last one left."""
    logits.normal_(0.0, 4.0)


def _bench_logprobs_shape(bench: Bench, n: int, vocab: int, with_compile: bool) -> None:
    dev = bench.device
    logits = torch.empty(n, vocab, device=dev, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device=dev)
    size = dict(n=n, vocab=vocab, dtype="bfloat16", logits_mb=logits.numel() * 2 / 2**20)
    for with_entropy in (False, True):
        impls = logprob_baselines(bench, with_entropy)
        if with_compile:
            compiled = torch.compile(reference.token_logprobs, dynamic=False)
            impls["compile"] = lambda x, y, c=compiled: c(x, y, with_entropy=with_entropy)
        name = "token_logprobs" + ("+entropy" if with_entropy else "")
        for impl, fn in impls.items():
            case = f"{name} forward N={n} V={vocab}"
            if isinstance(fn, str):
                bench.results.append(Result(case, impl, error=fn, info=size))
                continue
            fresh_logits(logits)
            with torch.no_grad():
                bench.measure(case, impl, lambda f=fn: f(logits, labels), **size)
        leaf = logits.detach().requires_grad_()
        for impl, fn in impls.items():
            case = f"{name} forward+backward N={n} V={vocab}"
            if isinstance(fn, str):
                bench.results.append(Result(case, impl, error=fn, info=size))
                continue
            fresh_logits(logits)
            bench.measure(case, impl, gradient_step(lambda f=fn: f(leaf, labels), [leaf]),
                          **size)
        if not with_entropy:
            _bench_inplace_backward(bench, logits, labels, size)


def _bench_inplace_backward(bench: Bench, logits, labels, size) -> None:
    """rlengine with inplace_backward=True: the gradient overwrites the logits' buffer (here a
    view of the leaf, standing in for an lm_head's output; the values left behind by one step
    are the next step's logits, which changes nothing in the timing)."""
    case = f"token_logprobs forward+backward N={size['n']} V={size['vocab']}"
    leaf = logits.detach().clone().requires_grad_()
    grad = torch.randn(labels.shape, device=logits.device)

    def step():
        activations = leaf.view_as(leaf)
        out = ops.token_logprobs(activations, labels, inplace_backward=True)
        return torch.autograd.grad(out, leaf, grad)

    bench.measure(case, "rlengine_inplace", step, **size)


# ---- fused linear log-probs ----------------------------------------------------------------

def eager_linear_logprobs(hidden, weight, labels):
    return eager_logprobs(hidden @ weight.T, labels)


def linear_baselines(bench: Bench) -> dict[str, Callable | str]:
    impls: dict[str, Callable | str] = {
        "rlengine": lambda h, w, y: ops.fused_linear_logprobs(h, w, y),
        "eager": eager_linear_logprobs,
    }
    liger, error = optional_import("liger_kernel", lambda: __import__(
        "liger_kernel.transformers.functional", fromlist=["liger_fused_linear_cross_entropy"]))
    impls["liger"] = error if liger is None else (
        lambda h, w, y: _first(liger.liger_fused_linear_cross_entropy(h, w, y, reduction="none")))
    cce, error = optional_import("cut_cross_entropy", lambda: __import__(
        "cut_cross_entropy", fromlist=["linear_cross_entropy"]))
    impls["cce"] = error if cce is None else (
        lambda h, w, y: cce.linear_cross_entropy(h, w, y, reduction="none"))
    return impls


def bench_fused_linear(bench: Bench, compile_all: bool) -> None:
    hidden_size = 64 if bench.smoke else 4096
    shapes = [(96, 1000)] if bench.smoke else [
        (n, v) for n in (8192, 16384) for v in (32000, 128256, 151936)]
    acceptance_shape = shapes[0] if bench.smoke else (8192, 128256)
    for n, vocab in shapes:
        _bench_fused_linear_shape(bench, n, vocab, hidden_size,
                                  compile_all or (n, vocab) == acceptance_shape)


def _bench_fused_linear_shape(bench: Bench, n: int, vocab: int, hidden_size: int,
                              with_compile: bool) -> None:
    dev = bench.device
    hidden = (torch.randn(n, hidden_size, device=dev) / 4).to(torch.bfloat16)
    weight = (torch.randn(vocab, hidden_size, device=dev) / hidden_size**0.5).to(
        torch.bfloat16)
    labels = torch.randint(0, vocab, (n,), device=dev)
    impls = linear_baselines(bench)
    if with_compile:
        impls["compile"] = torch.compile(eager_linear_logprobs, dynamic=False)
    size = dict(n=n, vocab=vocab, hidden=hidden_size, dtype="bfloat16",
                logits_fp32_mb=n * vocab * 4 / 2**20,
                grad_outputs_mb=(hidden.numel() + weight.numel()) * 2 / 2**20)
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    for impl, fn in impls.items():
        for mode in ("forward", "forward+backward"):
            case = f"fused_linear_logprobs {mode} N={n} H={hidden_size} V={vocab}"
            if isinstance(fn, str):
                bench.results.append(Result(case, impl, error=fn, info=size))
                continue
            if mode == "forward":
                with torch.no_grad():
                    bench.measure(case, impl, lambda f=fn: f(hidden, weight, labels), **size)
            else:
                bench.measure(case, impl, gradient_step(lambda f=fn: f(h, w, labels), [h, w]),
                              **size)


# ---- GAE -----------------------------------------------------------------------------------

def blocked_torch_gae(rewards, values, gamma, lam, block=128):
    """Loop-free GAE with every position valid: A_t = sum_k c^(k-t) delta_k as two levels of
    matrix products with discount matrices (inside blocks of `block` steps, then across
    blocks); c^j underflowing to 0 at long distances is the true value's rounding."""
    batch, steps = rewards.shape
    c = gamma * lam
    next_values = torch.cat([values[:, 1:], values.new_zeros(batch, 1)], 1)
    delta = (rewards + gamma * next_values - values).double()
    pad = (-steps) % block
    delta = torch.nn.functional.pad(delta, (0, pad))
    blocks = delta.shape[1] // block
    delta = delta.view(batch, blocks, block)
    offsets = torch.arange(block, device=rewards.device, dtype=torch.float64)
    distance = offsets[None, :] - offsets[:, None]  # k - t
    inner = torch.where(distance >= 0, c ** distance.clamp(min=0), 0.0)  # [t, k]
    local = delta @ inner.T  # A within each block, as if the next block's A were 0
    starts = torch.arange(blocks, device=rewards.device, dtype=torch.float64)
    block_distance = starts[None, :] - starts[:, None]
    outer = torch.where(block_distance >= 0, (c**block) ** block_distance.clamp(min=0), 0.0)
    block_start = local[:, :, 0] @ outer.T  # true A at each block's first step
    following = torch.cat([block_start[:, 1:], block_start.new_zeros(batch, 1)], 1)
    advantages = local + following[:, :, None] * (c ** (block - offsets))[None, None, :]
    advantages = advantages.reshape(batch, -1)[:, :steps].float()
    return advantages, advantages + values


def bench_gae(bench: Bench) -> None:
    dev = bench.device
    shapes = [(4, 300), (8, 1000)] if bench.smoke else [
        (b, t) for b in (64, 512) for t in (1024, 8192, 32768)]
    for batch, steps in shapes:
        rewards = torch.randn(batch, steps, device=dev)
        values = torch.randn(batch, steps, device=dev)
        mask = torch.ones(batch, steps, dtype=torch.bool, device=dev)
        expected, _ = ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)
        blocked, _ = blocked_torch_gae(rewards, values, GAMMA, LAM)
        error = float((blocked - expected).abs().max() / expected.abs().max().clamp(min=1))
        case = f"gae B={batch} T={steps}"
        info = dict(batch=batch, steps=steps, torch_blocked_max_rel_error=error)
        with torch.no_grad():
            bench.measure(case, "rlengine", lambda: ops.gae(rewards, values, mask, gamma=GAMMA,
                                                            lam=LAM), **info)
            bench.measure(case, "torch_blocked", lambda: blocked_torch_gae(rewards, values, GAMMA,
                                                                           LAM), **info)
            bench.measure(case, "python_loop", lambda: python_loop_gae(rewards, values, mask,
                                                                       GAMMA, LAM),
                          reps=3, warmup=1, budget_s=10.0, **info)


# ---- reward-model training step -------------------------------------------------------------

def bench_reward_steps(bench: Bench) -> None:
    """bench/bench_reward_step.py's cases on this device (--smoke: the synthetic score_mode=last
    case only); a case that cannot be built (no HH-RLHF file here) is recorded as an error."""
    from bench_reward_step import CASE_NAMES, build_case

    for name in ["last"] if bench.smoke else CASE_NAMES:
        try:
            case = build_case(name, str(bench.device))
        except Exception as error:  # noqa: BLE001 - recorded in the results
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            bench.results += [Result(f"rm step {name}", impl, error=message)
                              for impl in ("rlengine", "reference")]
            print(f"rm step {name}: {message}", flush=True)
            continue
        for impl in case.trainers:
            bench.measure(case.group, impl, case.step(impl), reps=20, warmup=3, budget_s=30.0,
                          **case.info)


# ---- the report ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    what: str
    case: str
    numerator: str       # impl whose time is divided ...
    denominator: str     # ... by this one's (a speedup of `denominator` over `numerator`)
    at_least: float | None = None
    at_most: float | None = None
    denominator_case: str | None = None


L_FULL = "N=16384 V=151936"
GAE_ACCEPTANCE = "gae B=512 T=8192"
FLCE = "fused_linear_logprobs forward+backward N=8192 H=4096 V=128256"
TARGETS = [
    Target("token_logprobs fwd+bwd vs eager", f"token_logprobs forward+backward {L_FULL}",
           "eager", "rlengine", at_least=4.0),
    Target("token_logprobs fwd+bwd vs torch.compile",
           f"token_logprobs forward+backward {L_FULL}", "compile", "rlengine", at_least=1.3),
    Target("token_logprobs fwd+bwd vs Liger cross entropy",
           f"token_logprobs forward+backward {L_FULL}", "liger", "rlengine", at_least=1.0),
    Target("token_logprobs with entropy / without (forward+backward)",
           f"token_logprobs+entropy forward+backward {L_FULL}", "rlengine", "rlengine",
           at_most=1.2, denominator_case=f"token_logprobs forward+backward {L_FULL}"),
    Target("fused_linear_logprobs fwd+bwd vs Liger fused linear CE", FLCE, "liger", "rlengine",
           at_least=1.0),
    Target("fused_linear_logprobs fwd+bwd vs Cut Cross-Entropy", FLCE, "cce", "rlengine",
           at_least=1.0),
    Target("gae vs the Python loop", GAE_ACCEPTANCE, "python_loop", "rlengine", at_least=1000.0),
    Target("gae vs vectorized torch", GAE_ACCEPTANCE, "torch_blocked", "rlengine",
           at_least=10.0),
]


def _lookup(results: list[Result], case: str, impl: str) -> Result | None:
    for r in results:
        if r.case == case and r.impl == impl and r.median_ms is not None:
            return r
    return None


def target_rows(results: list[Result], ceilings: dict) -> list[str]:
    rows = []
    for t in TARGETS:
        num = _lookup(results, t.case, t.numerator)
        den = _lookup(results, t.denominator_case or t.case, t.denominator)
        bound = f">= {t.at_least}" if t.at_least is not None else f"<= {t.at_most}"
        if num is None or den is None:
            rows.append(f"| {t.what} | {bound} | not measured | - |")
            continue
        ratio = num.median_ms / den.median_ms
        ok = (t.at_least is None or ratio >= t.at_least) and (t.at_most is None or
                                                              ratio <= t.at_most)
        rows.append(f"| {t.what} | {bound} | {ratio:.2f}x | {'met' if ok else 'MISSED'} |")
    # Bandwidth of the forward: logits read once + labels + outputs, over the copy ceiling.
    fwd = _lookup(results, f"token_logprobs forward {L_FULL}", "rlengine")
    if fwd is not None and "copy_gb_per_s" in ceilings:
        moved = fwd.info["n"] * fwd.info["vocab"] * 2 + fwd.info["n"] * (8 + 4 + 4)
        gbps = moved / fwd.median_ms / 1e6
        share = gbps / ceilings["copy_gb_per_s"]
        rows.append(f"| token_logprobs forward bandwidth / copy bandwidth | >= 0.80 | "
                    f"{share:.2f} ({gbps:.0f} GB/s) | {'met' if share >= 0.8 else 'MISSED'} |")
    flce = _lookup(results, FLCE, "rlengine")
    if flce is not None and flce.peak_extra_mb is not None:
        gb = flce.peak_extra_mb / 1024
        rows.append(f"| fused_linear_logprobs fwd+bwd extra peak memory (gradients included) | "
                    f"<= 2 GB | {gb:.2f} GB | {'met' if gb <= 2 else 'MISSED'} |")
    return rows


def markdown(meta: dict, results: list[Result]) -> str:
    lines = [f"# GPU benchmarks: {meta['run']}", "",
             f"- device: {meta['device']} (driver {meta.get('driver', '?')})",
             f"- torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, "
             f"rlengine {meta['rlengine']}, python {meta['python']}",
             f"- baselines: {json.dumps(meta['baseline_versions'])}",
             f"- date: {meta['date']}; medians of CUDA-event timings after warm-up",
             f"- ceilings: {json.dumps({k: round(v, 1) for k, v in meta['ceilings'].items()})}",
             ""]
    if meta.get("smoke"):
        lines += ["**Smoke run at toy shapes: these numbers mean nothing.**", ""]
    lines += ["## Acceptance targets", "", "| target | bound | measured | |", "|---|---|---|---|"]
    lines += target_rows(results, meta["ceilings"])
    lines += ["", "## All cases", "",
              "| case | impl | median ms | rlengine speedup | peak extra MB |",
              "|---|---|---|---|---|"]
    for r in results:
        ours = _lookup(results, r.case, "rlengine")
        if r.median_ms is None:
            lines.append(f"| {r.case} | {r.impl} | {r.error} | | |")
            continue
        speedup = (f"{r.median_ms / ours.median_ms:.2f}x"
                   if ours is not None and r.impl != "rlengine" else "")
        peak = f"{r.peak_extra_mb:.0f}" if r.peak_extra_mb is not None else ""
        lines.append(f"| {r.case} | {r.impl} | {r.median_ms:.3f} | {speedup} | {peak} |")
    steps = [r for r in results if "tokens" in r.info and r.median_ms is not None]
    if steps:
        lines += ["", "## Reward-model training steps", "",
                  "| case | impl | median ms | tokens | tokens/s |", "|---|---|---|---|---|"]
        lines += [f"| {r.case} | {r.impl} | {r.median_ms:.1f} | {r.info['tokens']} | "
                  f"{r.info['tokens'] / r.median_ms * 1e3:.0f} |" for r in steps]
    return "\n".join(lines) + "\n"


def machine(device: torch.device) -> dict:
    meta = {
        "rlengine": rlengine.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device.type == "cuda":
        meta["device"] = torch.cuda.get_device_name(device)
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            meta["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                text=True).strip().splitlines()[0]
    else:
        meta["device"] = f"CPU ({platform.processor() or platform.machine()})"
    versions = {}
    for package in ("liger_kernel", "cut_cross_entropy", "trl", "transformers"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package.replace("_", "-"))
    meta["baseline_versions"] = versions
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for <run>.json and <run>.md")
    parser.add_argument("--only", default="logprobs,fused_linear,gae,reward_step",
                        help="comma-separated families: logprobs, fused_linear, gae, "
                             "reward_step")
    parser.add_argument("--smoke", action="store_true", help="toy shapes, to test the script")
    parser.add_argument("--compile-all-shapes", action="store_true",
                        help="torch.compile baselines at every shape (default: acceptance shapes)")
    parser.add_argument("--run-name", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no GPU: the full benchmarks need one (use --smoke to test the script)")
    families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = set(families) - {"logprobs", "fused_linear", "gae", "reward_step"}
    if unknown:
        parser.error(f"unknown families in --only: {', '.join(sorted(unknown))}")
    torch.manual_seed(0)
    bench = Bench(device, args.smoke)
    meta = machine(device)
    meta["smoke"] = args.smoke
    meta["ceilings"] = bench_ceilings(bench)
    if "logprobs" in families:
        bench_logprobs(bench, args.compile_all_shapes)
    if "fused_linear" in families:
        bench_fused_linear(bench, args.compile_all_shapes)
    if "gae" in families:
        bench_gae(bench)
    if "reward_step" in families:
        bench_reward_steps(bench)
    slug = "".join(ch if ch.isalnum() else "-" for ch in meta["device"].lower()).strip("-")
    meta["run"] = args.run_name or f"gpu-{slug}-{meta['date']}" + ("-smoke" if args.smoke else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, meta["run"] + ".json"), "w") as f:
        json.dump({"machine": meta, "results": [asdict(r) for r in bench.results]}, f, indent=1)
    report = markdown(meta, bench.results)
    with open(os.path.join(args.out, meta["run"] + ".md"), "w") as f:
        f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
