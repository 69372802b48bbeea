"""token_logprobs against the ways the anchors compute log-probs and entropy from logits.

Baselines (written here the way those projects write them, not imported):
  eager: torch.log_softmax over the vocabulary + gather (TRL's and OpenRLHF's older
         logprobs_from_logits); the entropy from the same log-softmax.
  trl:   TRL's selective_log_softmax (gather the label logits, logsumexp per batch row in a
         Python loop; for half precision, log_softmax per row) and its chunked
         entropy_from_logits.
  compiled: torch.compile (inductor) of the eager baseline, compiled outside the timed region.
"""

from __future__ import annotations

import pytest
import torch
from harness import backward_of, run

from rlengine import ops

BATCH, STEPS, VOCAB = 8, 512, 32000  # N = 4096 tokens, the CPU shape


def eager_logprobs(logits, labels, with_entropy=False):
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return picked
    return picked, -(logp.exp() * logp).sum(-1)


def trl_selective_log_softmax(logits, labels):
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        row_lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - row_lse
    rows = [torch.log_softmax(row, dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
            for row, lab in zip(logits, labels)]
    return torch.stack(rows)


def trl_entropy_from_logits(logits, chunk_rows=128):
    flat = logits.reshape(-1, logits.shape[-1])
    pieces = []
    for chunk in flat.split(chunk_rows):
        logp = torch.log_softmax(chunk.float(), dim=-1)
        pieces.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(pieces).reshape(logits.shape[:-1])


def trl_logprobs(logits, labels, with_entropy=False):
    picked = trl_selective_log_softmax(logits, labels)
    return (picked, trl_entropy_from_logits(logits)) if with_entropy else picked


_compiled_eager = torch.compile(eager_logprobs, fullgraph=True, dynamic=False)

IMPLEMENTATIONS = {
    "rlengine": lambda x, y, e=False: ops.token_logprobs(x, y, with_entropy=e),
    "eager": eager_logprobs,
    "trl": trl_logprobs,
    "compiled": _compiled_eager,
}


def _inputs(dtype, requires_grad=False):
    logits = torch.randn(BATCH, STEPS, VOCAB).to(dtype).requires_grad_(requires_grad)
    labels = torch.randint(0, VOCAB, (BATCH, STEPS))
    return logits, labels


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def bench_forward(benchmark, impl, dtype):
    logits, labels = _inputs(dtype)
    fn = IMPLEMENTATIONS[impl]
    benchmark.group = f"token_logprobs forward N={BATCH * STEPS} V={VOCAB} {dtype}"
    run(benchmark, lambda: fn(logits, labels), logits_mb=logits.nbytes / 2**20)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_forward_with_entropy(benchmark, impl):
    logits, labels = _inputs(torch.float32)
    fn = IMPLEMENTATIONS[impl]
    benchmark.group = f"token_logprobs+entropy forward N={BATCH * STEPS} V={VOCAB} fp32"
    run(benchmark, lambda: fn(logits, labels, True), logits_mb=logits.nbytes / 2**20)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def bench_forward_backward(benchmark, impl):
    logits, labels = _inputs(torch.float32, requires_grad=True)
    fn = IMPLEMENTATIONS[impl]
    benchmark.group = f"token_logprobs forward+backward N={BATCH * STEPS} V={VOCAB} fp32"
    step = backward_of(lambda: fn(logits, labels), [logits])
    # warm-up as in bench_ranking.bench_rrhf_step: fresh N x V gradients fault in their pages
    run(benchmark, step, rounds=5, warmup_rounds=3, logits_mb=logits.nbytes / 2**20)
