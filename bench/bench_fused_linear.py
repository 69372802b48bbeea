"""fused_linear_logprobs (the chunked CPU path) against computing the full logits first.

Baselines (written here, not imported):
  eager:    F.linear to the N x V logits, then log_softmax + gather (and the entropy from the
            same log-softmax): what a trainer does with an LM head's output.
  compiled: torch.compile (inductor) of the eager baseline, compiled outside the timed region.
The fused op holds at most one chunk of logits (fused_linear.CHUNK_BYTES) at a time, so the
peak_mb column is the point on the CPU; its backward recomputes the logits (one more matmul).
"""

from __future__ import annotations

import pytest
import torch
from harness import backward_of, run

from rlengine import ops

BATCH, STEPS, HIDDEN, VOCAB = 4, 256, 512, 32000  # N = 1024 tokens, a 32k vocabulary


def eager_logprobs(hidden, weight, labels, with_entropy=False):
    logits = torch.nn.functional.linear(hidden, weight)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return picked
    return picked, -(logp.exp() * logp).sum(-1)


_compiled_eager = torch.compile(eager_logprobs, fullgraph=True, dynamic=False)

IMPLEMENTATIONS = {
    "rlengine": lambda h, w, y, e=False: ops.fused_linear_logprobs(h, w, y, with_entropy=e),
    "eager": eager_logprobs,
    "compiled": _compiled_eager,
}


def _inputs(dtype=torch.float32, requires_grad=False):
    hidden = torch.randn(BATCH, STEPS, HIDDEN).to(dtype).requires_grad_(requires_grad)
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).to(dtype).requires_grad_(requires_grad)
    labels = torch.randint(0, VOCAB, (BATCH, STEPS))
    return hidden, weight, labels


def _info(dtype):
    return dict(logits_mb=BATCH * STEPS * VOCAB * 4 / 2**20, dtype=str(dtype))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_forward(benchmark, impl):
    hidden, weight, labels = _inputs()
    fn = IMPLEMENTATIONS[impl]
    benchmark.group = (f"fused_linear_logprobs forward N={BATCH * STEPS} H={HIDDEN} V={VOCAB} "
                       "fp32")
    run(benchmark, lambda: fn(hidden, weight, labels), rounds=3, **_info(torch.float32))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_forward_with_entropy(benchmark, impl):
    hidden, weight, labels = _inputs()
    fn = IMPLEMENTATIONS[impl]
    benchmark.group = (f"fused_linear_logprobs+entropy forward N={BATCH * STEPS} H={HIDDEN} "
                       f"V={VOCAB} fp32")
    run(benchmark, lambda: fn(hidden, weight, labels, True), rounds=3, **_info(torch.float32))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_forward_backward(benchmark, impl):
    hidden, weight, labels = _inputs(requires_grad=True)
    fn = IMPLEMENTATIONS[impl]
    benchmark.group = (f"fused_linear_logprobs forward+backward N={BATCH * STEPS} H={HIDDEN} "
                       f"V={VOCAB} fp32")
    step = backward_of(lambda: fn(hidden, weight, labels), [hidden, weight])
    run(benchmark, step, rounds=3, warmup_rounds=2, **_info(torch.float32))


# ---- GPU (Triton kernels): the acceptance shape, on a GPU machine only -----------------------

GPU_TOKENS, GPU_HIDDEN, GPU_VOCAB = 8192, 4096, 128256


def _gpu_step(impl):
    hidden = torch.randn(GPU_TOKENS, GPU_HIDDEN, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(GPU_VOCAB, GPU_HIDDEN, device="cuda") / GPU_HIDDEN**0.5).bfloat16()
    weight.requires_grad_()
    labels = torch.randint(0, GPU_VOCAB, (GPU_TOKENS,), device="cuda")
    fn = IMPLEMENTATIONS[impl]
    step = backward_of(lambda: fn(hidden, weight, labels), [hidden, weight])

    def synchronized():
        out = step()
        torch.cuda.synchronize()
        return out

    return synchronized


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU case")
@pytest.mark.parametrize("impl", ["rlengine", "compiled"])
def bench_gpu_forward_backward(benchmark, impl):
    """Times include a device synchronization; peak_mb is the CUDA allocator's peak above what
    was allocated before the step (inputs, and the gradients' previous values)."""
    step = _gpu_step(impl)
    step()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    benchmark.group = (f"fused_linear_logprobs forward+backward N={GPU_TOKENS} H={GPU_HIDDEN} "
                       f"V={GPU_VOCAB} bf16 cuda")
    run(benchmark, step, rounds=5, memory=False, device_peak_mb=round(peak_mb, 1),
        logits_mb=GPU_TOKENS * GPU_VOCAB * 4 / 2**20)
