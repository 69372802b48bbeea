"""Ranking and preference losses against the ways the anchors compute them.

Baselines (written here the way those projects write them, not imported):
  rrhf_reference: one RRHF training step as the RRHF reference code does it: a full
      torch.log_softmax over the vocabulary for every candidate, gather of the labels, masked
      sum / length per candidate (the sequence scores), the pairwise ranking hinge through a
      [B, K, K] matrix of score differences masked by the reward order, and the SFT term on
      each query's best candidate (extended here from one query to B queries per batch).
  eager / eager_smoothed: the Bradley-Terry reward-model loss as TRL's and OpenRLHF's trainers
      write it: -logsigmoid(chosen - rejected - margin), and its label-smoothed form
      -(1 - a) logsigmoid(delta) - a logsigmoid(-delta).
  eager (sequence_scores): masked sum / mask count with elementwise torch ops.
rlengine does the same work with ops.token_logprobs + ops.sequence_scores + ops.rrhf_rank_loss
(the SFT term is computed from the same token log-probs), ops.bt_loss and ops.sequence_scores.
Every case is forward + backward unless its group says forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import backward_of, run

from rlengine import ops

IGNORE = -100

# ---- one RRHF step: scores of k candidates per query, ranking hinge and SFT on the best -------

QUERIES, CANDIDATES, STEPS, VOCAB = 4, 4, 192, 32000


def _rrhf_inputs():
    rows = QUERIES * CANDIDATES
    logits = torch.randn(rows, STEPS, VOCAB, requires_grad=True)
    labels = torch.randint(0, VOCAB, (rows, STEPS))
    lengths = torch.randint(STEPS // 4, STEPS + 1, (rows, 1))
    mask = torch.arange(STEPS).unsqueeze(0) < lengths       # response tokens, then padding
    labels = torch.where(mask, labels, IGNORE)
    rewards = torch.randn(QUERIES, CANDIDATES)
    return logits, labels, mask, rewards


def _sft_on_best(token_logprobs, mask, rewards):
    """-sum of the best candidate's token log-probs, per query (METHODS.md section 4)."""
    best = rewards.argmax(-1)
    per_query = token_logprobs.view(QUERIES, CANDIDATES, STEPS)[torch.arange(QUERIES), best]
    kept = mask.view(QUERIES, CANDIDATES, STEPS)[torch.arange(QUERIES), best]
    return -torch.where(kept, per_query, 0).sum(-1)


def rrhf_reference_step(logits, labels, mask, rewards):
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    token_logprobs = picked * mask
    scores = (token_logprobs.sum(-1) / mask.sum(-1)).view(QUERIES, CANDIDATES)
    # [b, i, j] = p_j - p_i and r_j - r_i: a pair is wrongly ordered when r_j > r_i, p_j < p_i.
    score_gap = scores.unsqueeze(1) - scores.unsqueeze(2)
    reward_gap = rewards.unsqueeze(1) - rewards.unsqueeze(2)
    wrong = (reward_gap > 0) & (score_gap < 0)
    rank = -torch.where(wrong, score_gap, 0).sum((1, 2))
    return (rank + _sft_on_best(token_logprobs, mask, rewards)).mean()


def rrhf_rlengine_step(logits, labels, mask, rewards):
    token_logprobs = ops.token_logprobs(logits, labels, ignore_index=IGNORE)
    scores = ops.sequence_scores(token_logprobs, mask).view(QUERIES, CANDIDATES)
    rank = ops.rrhf_rank_loss(scores, rewards)
    return (rank + _sft_on_best(token_logprobs, mask, rewards)).mean()


RRHF_STEPS = {"rlengine": rrhf_rlengine_step, "rrhf_reference": rrhf_reference_step}


@pytest.mark.parametrize("impl", RRHF_STEPS)
def bench_rrhf_step(benchmark, impl):
    logits, labels, mask, rewards = _rrhf_inputs()
    step_fn = RRHF_STEPS[impl]
    benchmark.group = (f"rrhf step forward+backward B={QUERIES} K={CANDIDATES} T={STEPS} "
                       f"V={VOCAB} fp32")
    step = backward_of(lambda: step_fn(logits, labels, mask, rewards), [logits])
    # The first steps of a run pay page faults on fresh multi-hundred-MB buffers until the
    # allocator starts reusing them; enough warm-up rounds leave that out of the median.
    run(benchmark, step, rounds=8, warmup_rounds=3, logits_mb=logits.nbytes / 2**20)


# ---- Bradley-Terry loss -------------------------------------------------------------------------

PAIRS = 65536
SMOOTHING = 0.1


def eager_bt(chosen, rejected, margin):
    return -F.logsigmoid(chosen - rejected - margin).mean()


def eager_bt_smoothed(chosen, rejected, margin):
    delta = chosen - rejected - margin
    return (-(1 - SMOOTHING) * F.logsigmoid(delta) - SMOOTHING * F.logsigmoid(-delta)).mean()


BT_CASES = {
    "margin": {"rlengine": lambda c, r, m: ops.bt_loss(c, r, margin=m).mean(),
               "eager": eager_bt},
    "margin+label_smoothing": {
        "rlengine": lambda c, r, m: ops.bt_loss(c, r, margin=m,
                                                label_smoothing=SMOOTHING).mean(),
        "eager_smoothed": eager_bt_smoothed},
}


@pytest.mark.parametrize("case, impl", [(case, impl) for case, impls in BT_CASES.items()
                                        for impl in impls])
def bench_bt_loss(benchmark, case, impl):
    chosen = torch.randn(PAIRS, requires_grad=True)
    rejected = torch.randn(PAIRS, requires_grad=True)
    margin = torch.randn(PAIRS)                              # per-pair (adaptive) margin
    fn = BT_CASES[case][impl]
    benchmark.group = f"bt_loss {case} forward+backward B={PAIRS} fp32"
    step = backward_of(lambda: fn(chosen, rejected, margin), [chosen, rejected])
    run(benchmark, step, rounds=50, warmup_rounds=5)


# ---- sequence scores ----------------------------------------------------------------------------

ROWS, LENGTH = 4096, 512


def eager_sequence_scores(token_logprobs, mask):
    return (token_logprobs * mask).sum(-1) / mask.sum(-1)


SEQUENCE_SCORES = {"rlengine": ops.sequence_scores, "eager": eager_sequence_scores}


def _sequence_inputs(requires_grad):
    token_logprobs = (-torch.rand(ROWS, LENGTH) * 5).requires_grad_(requires_grad)
    lengths = torch.randint(1, LENGTH + 1, (ROWS, 1))
    mask = torch.arange(LENGTH).unsqueeze(0) < lengths
    return token_logprobs, mask


@pytest.mark.parametrize("impl", SEQUENCE_SCORES)
def bench_sequence_scores_forward(benchmark, impl):
    token_logprobs, mask = _sequence_inputs(False)
    fn = SEQUENCE_SCORES[impl]
    benchmark.group = f"sequence_scores forward [{ROWS}, {LENGTH}] fp32"
    run(benchmark, lambda: fn(token_logprobs, mask), rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("impl", SEQUENCE_SCORES)
def bench_sequence_scores_forward_backward(benchmark, impl):
    token_logprobs, mask = _sequence_inputs(True)
    fn = SEQUENCE_SCORES[impl]
    benchmark.group = f"sequence_scores forward+backward [{ROWS}, {LENGTH}] fp32"
    step = backward_of(lambda: fn(token_logprobs, mask), [token_logprobs])
    run(benchmark, step, rounds=30, warmup_rounds=3)
