"""entropy_segments, segment_reduce and segment_rewards_to_dense against per-row Python.

Baseline (written here, not imported): ``per_row``, a Python loop over the batch in which each
row is processed with vectorized torch ops (nonzero, cumsum, bincount, indexing), the way the
paper's segmentation, segment reward read-out and reward spreading are written without a
batched kernel. Segments are taken as contiguous runs along the response, as the segmentation
produces them.

Shape: B = 64 responses of T = 2048 positions, float32; each row's response covers a random
suffix, and about 10 % of the response positions end a segment.

Groups: the target cases start with the op's name (bench/report.py matches them by prefix);
the forward+backward cases, for information, start with "forward+backward".
"""

from __future__ import annotations

import pytest
import torch
from harness import backward_of, run

from rlengine import ops
from rlengine.ops.reference import SIGMA_FLOOR

BATCH, STEPS = 64, 2048
THRESHOLD = 1.75
PHI3 = (0.7668, 0.4705, 0.2569, 2.8339)
CLAMP = 10.0
SHAPE = f"B={BATCH} T={STEPS} fp32"


# ---- per-row baselines ----------------------------------------------------------------------

def per_row_entropy_segments(entropy, response_mask, threshold):
    batch, steps = entropy.shape
    segment_ids = torch.full((batch, steps), -1, dtype=torch.long)
    counts = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        positions = response_mask[b].nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        ends = entropy[b, positions] > threshold
        ends[-1] = True                                   # the last response token ends a segment
        ends = ends.long()
        segment_ids[b, positions] = ends.cumsum(0) - ends
        counts[b] = ends.sum()
    return segment_ids, counts


def _segment_ends(ids_row):
    """Positions of the last token of each segment of one row (contiguous segments)."""
    positions = (ids_row >= 0).nonzero().squeeze(1)
    ids = ids_row[positions]
    last = torch.ones_like(ids, dtype=torch.bool)
    last[:-1] = ids[1:] != ids[:-1]
    return positions[last]


def per_row_segment_scores(values, segment_ids, counts):
    """segment_reduce(..., reduce="end_mean"): the segment RM's sequence score."""
    scores = []
    for b in range(values.shape[0]):
        ends = _segment_ends(segment_ids[b])
        if ends.numel() == 0:
            scores.append(values.new_zeros(()))
            continue
        scores.append(values[b, ends].sum() / counts[b])
    return torch.stack(scores)


def per_row_dense(segment_rewards, segment_ids, counts, mask, normalizer, clamp):
    """segment_rewards_to_dense(..., spread="even") with the location-aware normalizer."""
    a_mu, b_mu, a_sigma, b_sigma = normalizer
    rows = []
    for b in range(segment_ids.shape[0]):
        row = segment_rewards.new_zeros(segment_ids.shape[1])
        n_segments = int(counts[b])
        receives = (mask[b] & (segment_ids[b] >= 0)).nonzero().squeeze(1)
        if n_segments == 0 or receives.numel() == 0:
            rows.append(row)
            continue
        log_p = torch.log(torch.arange(1, n_segments + 1, dtype=torch.float32) / n_segments)
        mu = a_mu * log_p + b_mu
        sigma = (a_sigma * log_p + b_sigma).clamp(min=SIGMA_FLOOR)
        normalized = (segment_rewards[b, :n_segments] - mu) / sigma
        seg = segment_ids[b, receives]
        length = torch.bincount(seg, minlength=n_segments)
        token_reward = (normalized[seg] / length[seg]).clamp(-clamp, clamp)
        rows.append(row.index_put((receives,), token_reward))
    return torch.stack(rows)


# ---- inputs ---------------------------------------------------------------------------------

def _inputs():
    """Entropies of a reference model (about 10 % of them above the threshold), a response
    mask covering a random suffix of each row (EOS excluded), per-token values and segment
    rewards."""
    positions = torch.arange(STEPS)
    start = torch.randint(STEPS // 8, STEPS // 2, (BATCH, 1))
    response_mask = positions >= start
    response_mask[:, -1] = False                          # EOS
    entropy = torch.where(torch.rand(BATCH, STEPS) < 0.1, 2.5, 0.5) + 0.1 * torch.rand(BATCH, STEPS)
    segment_ids, counts = ops.entropy_segments(entropy, response_mask, threshold=THRESHOLD)
    values = torch.randn(BATCH, STEPS)
    segment_rewards = torch.randn(BATCH, int(counts.max())) * 2
    return entropy, response_mask, segment_ids, counts, values, segment_rewards


def _segment_info(counts, response_mask):
    return {"segments_per_response_token":
            round(float(counts.sum()) / float(response_mask.sum()), 4)}


# ---- benchmarks -----------------------------------------------------------------------------

IMPLS = ["rlengine", "per_row"]


def _check_same(actual, expected):
    for a, e in zip(actual if isinstance(actual, tuple) else (actual,),
                    expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def bench_entropy_segments(benchmark, impl):
    entropy, response_mask, _, counts, _, _ = _inputs()
    fns = {
        "rlengine": lambda: ops.entropy_segments(entropy, response_mask, threshold=THRESHOLD),
        "per_row": lambda: per_row_entropy_segments(entropy, response_mask, THRESHOLD),
    }
    _check_same(fns[impl](), fns["rlengine"]())
    benchmark.group = f"entropy_segments {SHAPE}"
    run(benchmark, fns[impl], rounds=20, **_segment_info(counts, response_mask))


def _reduce_fns(values, segment_ids, counts):
    return {
        "rlengine": lambda: ops.segment_reduce(values, segment_ids, counts, reduce="end_mean"),
        "per_row": lambda: per_row_segment_scores(values, segment_ids, counts),
    }


@pytest.mark.parametrize("impl", IMPLS)
def bench_segment_reduce(benchmark, impl):
    _, response_mask, segment_ids, counts, values, _ = _inputs()
    fns = _reduce_fns(values, segment_ids, counts)
    _check_same(fns[impl](), fns["rlengine"]())
    benchmark.group = f"segment_reduce end_mean {SHAPE}"
    run(benchmark, fns[impl], rounds=20, **_segment_info(counts, response_mask))


def _dense_fns(segment_rewards, segment_ids, counts, response_mask):
    return {
        "rlengine": lambda: ops.segment_rewards_to_dense(
            segment_rewards, segment_ids, counts, response_mask, normalizer=PHI3, spread="even",
            clamp=CLAMP),
        "per_row": lambda: per_row_dense(segment_rewards, segment_ids, counts, response_mask,
                                         PHI3, CLAMP),
    }


@pytest.mark.parametrize("impl", IMPLS)
def bench_segment_rewards_to_dense(benchmark, impl):
    _, response_mask, segment_ids, counts, _, segment_rewards = _inputs()
    fns = _dense_fns(segment_rewards, segment_ids, counts, response_mask)
    _check_same(fns[impl](), fns["rlengine"]())
    benchmark.group = f"segment_rewards_to_dense even+normalizer {SHAPE}"
    run(benchmark, fns[impl], rounds=20, **_segment_info(counts, response_mask))


@pytest.mark.parametrize("impl", IMPLS)
def bench_segment_reduce_forward_backward(benchmark, impl):
    _, response_mask, segment_ids, counts, values, _ = _inputs()
    values.requires_grad_()
    fns = _reduce_fns(values, segment_ids, counts)
    benchmark.group = f"forward+backward segment_reduce end_mean {SHAPE}"
    run(benchmark, backward_of(fns[impl], [values]), rounds=10,
        **_segment_info(counts, response_mask))


@pytest.mark.parametrize("impl", IMPLS)
def bench_segment_rewards_to_dense_forward_backward(benchmark, impl):
    _, response_mask, segment_ids, counts, _, segment_rewards = _inputs()
    segment_rewards.requires_grad_()
    fns = _dense_fns(segment_rewards, segment_ids, counts, response_mask)
    benchmark.group = f"forward+backward segment_rewards_to_dense even+normalizer {SHAPE}"
    run(benchmark, backward_of(fns[impl], [segment_rewards]), rounds=10,
        **_segment_info(counts, response_mask))

