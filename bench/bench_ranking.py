"""The ranking and preference losses against eager PyTorch written the way the anchors write it.

Baselines (written here, not imported):
  rrhf_reference: the RRHF step as the RRHF reference code computes it: a full log_softmax over
                  the vocabulary for every candidate, gather, masked mean per candidate, the
                  pairwise rank loss through a [B, K, K] difference matrix, plus the SFT term
                  of the best candidate; rlengine does the same with token_logprobs +
                  sequence_scores + rrhf_rank_loss.
  eager:          TRL / OpenRLHF reward-model losses: -logsigmoid(chosen - rejected - margin),
                  label-smoothed as -(1 - a) logsigmoid(d) - a logsigmoid(-d); masked
                  sum / count for sequence scores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import backward_of, run

from rlengine import ops

QUERIES, CANDIDATES, STEPS, VOCAB = 4, 4, 192, 32000


def rrhf_reference_loss(logits, labels, mask, rewards):
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask
    scores = (token_logp.sum(-1) / mask.sum(-1)).view(QUERIES, CANDIDATES)
    gaps = scores.unsqueeze(2) - scores.unsqueeze(1)
    worse = (rewards.unsqueeze(2) < rewards.unsqueeze(1)).float()
    rank = (torch.relu(gaps) * worse).sum()
    best = rewards.argmax(-1) + torch.arange(QUERIES) * CANDIDATES
    sft = -token_logp.view(QUERIES * CANDIDATES, -1)[best].sum(-1).mean()
    return rank + sft


def rrhf_rlengine_loss(logits, labels, mask, rewards):
    token_logp = ops.token_logprobs(logits, labels)
    scores = ops.sequence_scores(token_logp, mask).view(QUERIES, CANDIDATES)
    rank = ops.rrhf_rank_loss(scores, rewards).sum()
    best = rewards.argmax(-1) + torch.arange(QUERIES) * CANDIDATES
    sft = -(token_logp * mask)[best].sum(-1).mean()
    return rank + sft


@pytest.mark.parametrize("impl", ["rlengine", "rrhf_reference"])
def bench_rrhf_step(benchmark, impl):
    rows = QUERIES * CANDIDATES
    logits = torch.randn(rows, STEPS, VOCAB, requires_grad=True)
    labels = torch.randint(0, VOCAB, (rows, STEPS))
    mask = (torch.arange(STEPS) >= STEPS // 3).expand(rows, STEPS).float()
    rewards = torch.randn(QUERIES, CANDIDATES)
    loss = rrhf_rlengine_loss if impl == "rlengine" else rrhf_reference_loss
    step = backward_of(lambda: loss(logits, labels, mask, rewards), [logits])
    benchmark.group = (f"forward+backward RRHF step: {QUERIES} queries x {CANDIDATES} candidates, "
                       f"T={STEPS}, V={VOCAB} fp32")
    run(benchmark, step, rounds=4)


def eager_bt_loss(chosen, rejected, margin, smoothing):
    delta = chosen - rejected - margin
    return -(1 - smoothing) * F.logsigmoid(delta) - smoothing * F.logsigmoid(-delta)


@pytest.mark.parametrize("impl", ["rlengine", "eager"])
def bench_bt_loss(benchmark, impl):
    pairs = 65536
    chosen = torch.randn(pairs, requires_grad=True)
    rejected = torch.randn(pairs, requires_grad=True)
    margin = torch.randn(pairs)
    if impl == "rlengine":
        def forward():
            return ops.bt_loss(chosen, rejected, margin=margin, label_smoothing=0.1)
    else:
        def forward():
            return eager_bt_loss(chosen, rejected, margin, 0.1)
    benchmark.group = f"forward+backward bt_loss {pairs} pairs fp32"
    run(benchmark, backward_of(forward, [chosen, rejected]), rounds=20)


@pytest.mark.parametrize("impl", ["rlengine", "eager"])
def bench_sequence_scores(benchmark, impl):
    logprobs = -torch.rand(4096, 512)
    mask = torch.rand(4096, 512) < 0.7
    if impl == "rlengine":
        def fn():
            return ops.sequence_scores(logprobs, mask)
    else:
        def fn():
            return (logprobs * mask).sum(-1) / mask.sum(-1)
    benchmark.group = "sequence_scores [4096, 512] fp32"
    run(benchmark, fn, rounds=20)
