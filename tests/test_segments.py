"""rlengine.ops.entropy_segments, segment_reduce and segment_rewards_to_dense against their
references (reference.entropy_segments, segment_reduce, segment_rewards_to_dense) evaluated in
float64, plus the checks of METHODS.md section 3."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    assert_compiles_fullgraph,
    assert_matches,
    incoming_gradient,
    noncontiguous,
    result_dtype,
    to64,
)
from hypothesis import given
from hypothesis import strategies as st

import rlengine
from rlengine import ops
from rlengine.ops import reference

REDUCES = ("end_mean", "end", "sum", "mean")
SPREADS = ("even", "repeat", "end")
PHI3 = (0.7668, 0.4705, 0.2569, 2.8339)   # METHODS.md: Phi-3, c = 1.75
FLOORED = (0.5, 0.1, 1.0, 0.5)            # sigma(p) = log p + 0.5 < SIGMA_FLOOR for p < 0.61
SHAPES = [(1, 1), (3, 1), (1, 7), (5, 31), (17, 257), (4, 2049)]


def _response_mask(batch: int, steps: int, holes: float = 0.1) -> torch.Tensor:
    """Prompt, then a response of random length, then padding; holes punched in the response.
    Some rows (a response of length 0) have no response at all."""
    positions = torch.arange(steps)
    start = torch.randint(0, steps + 1, (batch, 1))
    length = (torch.rand(batch, 1) * (steps + 1 - start)).long()
    mask = (positions >= start) & (positions < start + length)
    return mask & (torch.rand(batch, steps) >= holes)


def _segmentation(batch: int, steps: int, end_fraction: float = 0.1, holes: float = 0.1):
    """(mask, segment_ids, counts) from the reference segmentation of random entropies, about
    end_fraction of the response positions ending a segment."""
    mask = _response_mask(batch, steps, holes)
    entropy = torch.rand(batch, steps, dtype=torch.float64)
    ids, counts = reference.entropy_segments(entropy, mask, threshold=1.0 - end_fraction)
    return mask, ids, counts


def _arbitrary_segments(batch: int, steps: int, extra_segments: int = 2):
    """Segment ids that are labels in any order (not non-decreasing, segments not contiguous),
    some segments empty (counts above the largest id used)."""
    counts = torch.randint(0, steps + 1, (batch,)).clamp(max=max(steps - extra_segments, 0))
    counts = (counts + torch.randint(0, extra_segments + 1, (batch,))).clamp(max=steps)
    ids = (torch.rand(batch, steps) * counts.unsqueeze(1)).long()
    ids = torch.where((torch.rand(batch, steps) < 0.2) | (counts.unsqueeze(1) == 0), -1, ids)
    return ids, counts



def _check_reduce(values, ids, counts, reduce):
    """Kernel forward and backward (random incoming gradient) equal the float64 reference's."""
    dtype = values.dtype
    x = values.detach().clone().requires_grad_()
    x64 = to64(values).requires_grad_()
    out = ops.segment_reduce(x, ids, counts, reduce=reduce)
    ref = reference.segment_reduce(x64, ids, counts, reduce=reduce)
    assert out.dtype == result_dtype(dtype)
    assert_matches(out, ref, dtype, what=f"segment_reduce {reduce}")
    grad = incoming_gradient(out)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    assert x.grad.dtype == dtype and x.grad.shape == values.shape
    assert_matches(x.grad, x64.grad, dtype, gradient=True, what=f"grad values ({reduce})")


def _check_dense(rewards, ids, counts, mask, *, normalizer=None, spread="even", clamp=10.0):
    dtype = rewards.dtype
    x = rewards.detach().clone().requires_grad_()
    x64 = to64(rewards).requires_grad_()
    kwargs = dict(normalizer=normalizer, spread=spread, clamp=clamp)
    out = ops.segment_rewards_to_dense(x, ids, counts, mask, **kwargs)
    ref = reference.segment_rewards_to_dense(x64, ids, counts, mask, **kwargs)
    assert out.dtype == result_dtype(dtype)
    assert_matches(out, ref, dtype, what=f"dense {spread} {normalizer} {clamp}")
    grad = incoming_gradient(out)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    assert x.grad.dtype == dtype and x.grad.shape == rewards.shape
    assert_matches(x.grad, x64.grad, dtype, gradient=True, what=f"grad rewards ({spread})")
    return out


def test_kernels_are_compiled():
    for name in ("entropy_segments", "segment_reduce", "segment_reduce_backward",
                 "segment_rewards_to_dense", "segment_rewards_to_dense_backward"):
        assert rlengine._extension.has_kernel(name), name


# ---- entropy_segments -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_entropy_segments_matches_reference(shape, dtype):
    entropy = (torch.rand(shape) * 3).to(dtype)
    mask = _response_mask(*shape)
    for threshold in (1.75, 2.0, 0.3):
        ids, counts = ops.entropy_segments(entropy, mask, threshold=threshold)
        ref_ids, ref_counts = reference.entropy_segments(to64(entropy), mask, threshold=threshold)
        assert ids.dtype == torch.int64 and counts.dtype == torch.int64
        assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_entropy_threshold_compared_exactly(dtype):
    """Entropies one ulp around a threshold that the dtype cannot represent: the kernel compares
    the exact value with the float64 threshold, as the float64 reference does."""
    threshold = 1.7
    near = torch.tensor(threshold, dtype=dtype)
    below = torch.nextafter(near, torch.tensor(0.0, dtype=dtype))
    above = torch.nextafter(near, torch.tensor(9.0, dtype=dtype))
    entropy = torch.stack([below, near, above, torch.tensor(1.75, dtype=dtype),
                           torch.tensor(0.0, dtype=dtype)]).unsqueeze(0)
    mask = torch.ones_like(entropy, dtype=torch.bool)
    ids, counts = ops.entropy_segments(entropy, mask, threshold=threshold)
    ref_ids, ref_counts = reference.entropy_segments(to64(entropy), mask, threshold=threshold)
    assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)
    assert float(near) != threshold  # the case is meaningful: threshold is not representable
    # An entropy equal to a representable threshold does not end a segment.
    ids, _ = ops.entropy_segments(torch.tensor([[1.75, 1.75, 0.0]], dtype=dtype),
                                  torch.ones(1, 3, dtype=torch.bool), threshold=1.75)
    assert ids.tolist() == [[0, 0, 0]]


def test_entropy_segments_by_hand():
    entropy = torch.tensor([[9.0, 0.1, 3.0, 0.2, 0.3, 2.5, 0.1, 9.0],
                            [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
                            [0.1, 3.0, 0.1, 0.1, 3.0, 0.1, 0.1, 0.1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0],       # prompt, response, EOS/padding
                         [0, 0, 0, 0, 0, 0, 0, 0],       # no response
                         [1, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)  # holes
    ids, counts = ops.entropy_segments(entropy, mask, threshold=2.0)
    assert ids.tolist() == [[-1, -1, 0, 1, 1, 1, 2, -1],
                            [-1] * 8,
                            [0, 0, 1, -1, 1, 2, -1, -1]]
    assert counts.tolist() == [3, 0, 3]


def test_entropy_segments_token_level_and_bandit():
    entropy = torch.rand(6, 50) + 1e-3                   # all > 0
    mask = _response_mask(6, 50, holes=0.2)
    ids, counts = ops.entropy_segments(entropy, mask, threshold=0.0)
    rank = torch.cumsum(mask.long(), 1) - 1              # every response token its own segment
    assert torch.equal(ids, torch.where(mask, rank, -1))
    assert torch.equal(counts, mask.sum(1))
    ids, counts = ops.entropy_segments(entropy * 1e30, mask, threshold=1e300)
    assert torch.equal(ids, torch.where(mask, 0, -1))   # one segment: the bandit case
    assert torch.equal(counts, mask.any(1).long())


def test_entropy_segments_nan_inf_and_last_position():
    nan, inf = math.nan, math.inf
    entropy = torch.tensor([[nan, 5.0, nan, inf, -inf, 0.0, nan],
                            [nan, nan, nan, nan, nan, nan, nan]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    ids, counts = ops.entropy_segments(entropy, mask, threshold=1.0)
    # NaN never ends a segment, +inf does, -inf does not; the last response position always does.
    assert ids.tolist() == [[0, 0, 1, 1, 2, 2, -1], [-1, 0, 0, 0, -1, -1, -1]]
    assert counts.tolist() == [3, 1]
    ref_ids, ref_counts = reference.entropy_segments(entropy, mask, threshold=1.0)
    assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)


def test_entropy_segments_degenerate_shapes():
    ids, counts = ops.entropy_segments(torch.rand(0, 5), torch.ones(0, 5, dtype=torch.bool),
                                       threshold=1.0)
    assert ids.shape == (0, 5) and counts.shape == (0,)
    ids, counts = ops.entropy_segments(torch.rand(3, 0), torch.ones(3, 0, dtype=torch.bool),
                                       threshold=1.0)
    assert ids.shape == (3, 0) and counts.tolist() == [0, 0, 0]
    ids, counts = ops.entropy_segments(torch.tensor([[0.0], [5.0], [1.0]]),
                                       torch.tensor([[True], [True], [False]]), threshold=1.0)
    assert ids.tolist() == [[0], [0], [-1]] and counts.tolist() == [1, 1, 0]


def test_entropy_alignment_recipe_with_token_logprobs():
    """The docstring's recipe: the entropy of the distribution after token t (which predicts
    t + 1) decides whether t ends a segment. The reference model below is sure of every next
    token except after position 3; EOS (id 1) is excluded from the mask."""
    vocab, eos = 11, 1
    seq = torch.tensor([[5, 6, 7, 8, 9, 10, eos]])      # prompt = 2 tokens, response 5, EOS
    logits = torch.full((1, 7, vocab), -30.0)
    logits[0, torch.arange(6), seq[0, 1:]] = 30.0       # confident about the actual next token
    logits[0, 3] = 0.0                                  # uniform after token 3: high entropy
    _, ent = ops.token_logprobs(logits[:, :-1], seq[:, 1:], with_entropy=True)
    entropy = F.pad(ent, (0, 1))
    positions = torch.arange(7)
    response_mask = (positions >= 2) & (seq != eos)
    ids, counts = ops.entropy_segments(entropy, response_mask, threshold=1.0)
    # Segment 0 = tokens 2, 3 (ends at 3, where the next token is uncertain); segment 1 =
    # tokens 4, 5 (the last content token ends it); EOS gets -1.
    assert ids.tolist() == [[-1, -1, 0, 0, 1, 1, -1]] and counts.tolist() == [2]
    # Label-aligned arrays (index j holds token j + 1): shift the entropy left by one.
    label_mask = response_mask[:, 1:]
    label_ids, _ = ops.entropy_segments(F.pad(ent[:, 1:], (0, 1)), label_mask, threshold=1.0)
    assert torch.equal(label_ids, ids[:, 1:])
    # Dense rewards: EOS and the prompt get exactly 0.
    dense = ops.segment_rewards_to_dense(torch.tensor([[1.0, 2.0]]), ids, counts, response_mask)
    assert dense.tolist() == [[0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0.0]]


def test_entropy_segments_noncontiguous_and_no_grad():
    entropy = torch.rand(5, 40, requires_grad=True) * 3
    mask = _response_mask(5, 40)
    ids, counts = ops.entropy_segments(noncontiguous(entropy.detach()), noncontiguous(mask),
                                       threshold=1.5)
    ref_ids, ref_counts = reference.entropy_segments(entropy.detach(), mask, threshold=1.5)
    assert torch.equal(ids, ref_ids) and torch.equal(counts, ref_counts)
    ids, counts = ops.entropy_segments(entropy, mask.float(), threshold=1.5)  # numeric mask
    assert torch.equal(ids, ref_ids) and not ids.requires_grad and not counts.requires_grad


# ---- segment_reduce -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_segment_reduce_matches_reference(shape, dtype):
    _, ids, counts = _segmentation(*shape)
    values = (torch.randn(shape) * 3).to(dtype)
    for reduce in REDUCES:
        _check_reduce(values, ids, counts, reduce)


@pytest.mark.parametrize("reduce", REDUCES)
def test_segment_reduce_arbitrary_ids_and_empty_segments(reduce):
    ids, counts = _arbitrary_segments(7, 60)
    _check_reduce(torch.randn(7, 60), ids, counts, reduce)


def test_segment_reduce_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], requires_grad=True)
    ids = torch.tensor([[-1, 0, 0, 1, -1, 1]])
    counts = torch.tensor([3])                           # segment 2 has no token
    assert ops.segment_reduce(values, ids, counts, reduce="end").tolist() == [[3, 6, 0, 0, 0, 0]]
    assert ops.segment_reduce(values, ids, counts, reduce="sum").tolist() == [[5, 10, 0, 0, 0, 0]]
    assert ops.segment_reduce(values, ids, counts, reduce="mean").tolist() == [[2.5, 5, 0, 0, 0, 0]]
    score = ops.segment_reduce(values, ids, counts)      # end_mean: (3 + 6 + 0) / 3
    assert score.tolist() == [3.0]
    score.backward()
    third = torch.tensor(1 / 3).item()
    assert values.grad.tolist() == [[0, 0, third, 0, 0, third]]


def test_segment_reduce_token_level_and_bandit_scores():
    """METHODS.md: token level = average over response tokens; bandit = the value at the one
    segment's end (the last response token, EOS being excluded from the mask)."""
    entropy = torch.rand(5, 30) + 0.01
    mask = _response_mask(5, 30)
    mask[0] = False
    values = torch.randn(5, 30, dtype=torch.float64)
    ids, counts = ops.entropy_segments(entropy, mask, threshold=0.0)
    token_level = ops.segment_reduce(values, ids, counts)
    expected = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
    torch.testing.assert_close(token_level, expected)
    ids, counts = ops.entropy_segments(entropy, mask, threshold=1e9)
    bandit = ops.segment_reduce(values, ids, counts)
    last = torch.where(mask, torch.arange(30), -1).amax(1)
    expected = torch.where(last >= 0, values.gather(1, last.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(bandit, expected)


def test_segment_reduce_masked_values_do_not_leak():
    """Positions outside every segment are never read (NaN there changes nothing) and get
    exactly 0 gradient; NaN inside a segment reaches only that segment."""
    _, ids, counts = _segmentation(6, 80)
    values = torch.randn(6, 80)
    values[ids < 0] = math.nan
    for reduce in REDUCES:
        _check_reduce(values, ids, counts, reduce)
        x = values.clone().requires_grad_()
        out = ops.segment_reduce(x, ids, counts, reduce=reduce)
        assert not out.isnan().any()
        out.sum().backward()                             # an expanded incoming gradient
        assert x.grad[ids < 0].eq(0).all()


def test_segment_reduce_noncontiguous_int32_and_degenerate():
    _, ids, counts = _segmentation(5, 33)
    values = torch.randn(5, 33)
    for reduce in REDUCES:
        out = ops.segment_reduce(noncontiguous(values), noncontiguous(ids.int()), counts.int(),
                                 reduce=reduce)
        torch.testing.assert_close(out, reference.segment_reduce(values, ids, counts,
                                                                 reduce=reduce))
        # B = 0, T = 0, T = 1
        empty = ops.segment_reduce(torch.randn(0, 4), torch.zeros(0, 4, dtype=torch.long),
                                   torch.zeros(0, dtype=torch.long), reduce=reduce)
        assert empty.shape == ((0,) if reduce == "end_mean" else (0, 4))
        x = torch.randn(2, 0, requires_grad=True)
        out = ops.segment_reduce(x, torch.zeros(2, 0, dtype=torch.long),
                                 torch.zeros(2, dtype=torch.long), reduce=reduce)
        assert out.eq(0).all() and out.shape == ((2,) if reduce == "end_mean" else (2, 0))
        out.sum().backward()
        assert x.grad.shape == (2, 0)
        one = torch.tensor([[4.0], [5.0]])
        out = ops.segment_reduce(one, torch.tensor([[0], [-1]]), torch.tensor([1, 0]),
                                 reduce=reduce)
        assert out.flatten().tolist() == [4.0, 0.0]


# ---- segment_rewards_to_dense ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_reference(shape, dtype):
    mask, ids, counts = _segmentation(*shape)
    k_max = int(counts.max()) + 3                        # Kmax larger than needed
    rewards = (torch.randn(shape[0], k_max) * 4).to(dtype)
    for spread in SPREADS:
        for normalizer in (None, PHI3):
            for clamp in (10.0, 0.7, None):              # 0.7: the clamp is often active
                _check_dense(rewards, ids, counts, mask, normalizer=normalizer, spread=spread,
                             clamp=clamp)


@pytest.mark.parametrize("spread", SPREADS)
def test_dense_arbitrary_ids_mask_subset_and_sigma_floor(spread):
    ids, counts = _arbitrary_segments(6, 50)
    mask = torch.rand(6, 50) < 0.7                       # some segments lose receiving tokens
    rewards = torch.randn(6, 52)
    for normalizer in (PHI3, FLOORED):
        _check_dense(rewards, ids, counts, mask, normalizer=normalizer, spread=spread, clamp=None)


def test_dense_location_normalizer_matches_methods():
    """METHODS.md's Phi-3 example through the op: mu(0.1) = -1.2951, sigma(0.1) = 2.2424,
    mu(1) = 0.4705, sigma(1) = 2.8339, read off a row of K = 10 one-token segments."""
    ids = torch.arange(10).unsqueeze(0)
    counts = torch.tensor([10])
    mask = torch.ones(1, 10, dtype=torch.bool)

    def dense(r):
        rewards = torch.full((1, 10), r, dtype=torch.float64)
        return ops.segment_rewards_to_dense(rewards, ids, counts, mask, normalizer=PHI3,
                                            spread="repeat", clamp=None)[0]

    at_zero, at_one = dense(0.0), dense(1.0)             # -mu / sigma and (1 - mu) / sigma
    sigma = 1.0 / (at_one - at_zero)
    mu = -at_zero * sigma
    assert abs(float(mu[0]) - -1.2951) < 5e-5 and abs(float(sigma[0]) - 2.2424) < 5e-5
    assert abs(float(mu[9]) - 0.4705) < 5e-5 and abs(float(sigma[9]) - 2.8339) < 5e-5
    ref_mu, ref_sigma = reference.location_normalizer(torch.arange(1, 11) / 10.0, PHI3)
    torch.testing.assert_close(mu, ref_mu.double())
    torch.testing.assert_close(sigma, ref_sigma.double())


def test_dense_sigma_floor():
    ids = torch.arange(100).unsqueeze(0)
    rewards = torch.zeros(1, 100, dtype=torch.float64)
    out = ops.segment_rewards_to_dense(rewards, ids, torch.tensor([100]),
                                       torch.ones(1, 100, dtype=torch.bool),
                                       normalizer=FLOORED, spread="repeat", clamp=None)
    mu = 0.5 * math.log(0.01) + 0.1                      # segment 0: p = 0.01, sigma floored
    assert out[0, 0].item() == pytest.approx(-mu / reference.SIGMA_FLOOR, rel=1e-12)


def test_dense_round_trip_even_spread():
    """spread = even, no normalizer, no clamp: each row's dense rewards sum to its segment
    rewards' sum (every segment has a receiving token)."""
    mask, ids, counts = _segmentation(9, 300, holes=0.3)
    rewards = torch.randn(9, 310, dtype=torch.float64)
    dense = ops.segment_rewards_to_dense(rewards, ids, counts, mask, clamp=None)
    used = torch.arange(310) < counts.unsqueeze(1)
    torch.testing.assert_close(dense.sum(1), (rewards * used).sum(1))
    assert dense[~mask].eq(0).all()


def test_dense_by_hand_spreads_and_clamp():
    ids = torch.tensor([[-1, 0, 0, 0, 1, 1, -1]])
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)  # token 3 receives nothing
    counts = torch.tensor([2])
    rewards = torch.tensor([[3.0, -30.0, 99.0]], requires_grad=True)
    even = ops.segment_rewards_to_dense(rewards, ids, counts, mask, spread="even")
    assert even.tolist() == [[0, 1.5, 1.5, 0, -10, -10, 0]]   # -15 per token, clamped
    even.sum().backward(retain_graph=True)
    assert rewards.grad.tolist() == [[1.0, 0.0, 0.0]]          # clamped: no gradient
    # ... not even from a non-finite incoming gradient (torch.clamp's backward is a where).
    upstream = torch.tensor([[0.0, 1.0, 3.0, 0.0, math.inf, math.nan, math.nan]])
    (grad,) = torch.autograd.grad(even, rewards, upstream)
    assert grad.tolist() == [[2.0, 0.0, 0.0]]
    x64 = rewards.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(
        reference.segment_rewards_to_dense(x64, ids, counts, mask), x64, upstream.double())
    assert expected.tolist() == [[2.0, 0.0, 0.0]]
    rewards.grad = None
    repeat = ops.segment_rewards_to_dense(rewards, ids, counts, mask, spread="repeat", clamp=3.0)
    assert repeat.tolist() == [[0, 3, 3, 0, -3, -3, 0]]
    repeat.sum().backward()
    assert rewards.grad.tolist() == [[2.0, 0.0, 0.0]]          # at the bound: gradient passes
    end = ops.segment_rewards_to_dense(rewards, ids, counts, mask, spread="end", clamp=None)
    assert end.tolist() == [[0, 0, 3, 0, 0, -30, 0]]           # last *receiving* token


def test_dense_nan_and_inf_rewards():
    mask, ids, counts = _segmentation(4, 40, holes=0.0)
    rewards = torch.randn(4, 41)
    rewards[:, 0] = math.nan
    rewards[:, 1] = math.inf
    rewards[:, 2] = -math.inf
    for spread in SPREADS:
        for clamp in (10.0, None):
            _check_dense(rewards, ids, counts, mask, normalizer=PHI3, spread=spread, clamp=clamp)


def test_dense_noncontiguous_int32_and_degenerate():
    mask, ids, counts = _segmentation(5, 33)
    rewards = torch.randn(5, 40)
    out = ops.segment_rewards_to_dense(noncontiguous(rewards), noncontiguous(ids.int()),
                                       counts.int(), noncontiguous(mask.int()), normalizer=PHI3)
    torch.testing.assert_close(out, reference.segment_rewards_to_dense(
        rewards, ids, counts, mask, normalizer=PHI3))
    # B = 0; T = 0; Kmax = 0 (no segment anywhere); T = 1.
    assert ops.segment_rewards_to_dense(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.long),
                                        torch.zeros(0, dtype=torch.long),
                                        torch.ones(0, 4, dtype=torch.bool)).shape == (0, 4)
    x = torch.zeros(2, 0, requires_grad=True)
    out = ops.segment_rewards_to_dense(x, torch.full((2, 5), -1), torch.zeros(2, dtype=torch.long),
                                       torch.ones(2, 5, dtype=torch.bool), normalizer=PHI3)
    assert out.shape == (2, 5) and out.eq(0).all()
    out.sum().backward()
    assert x.grad.shape == (2, 0)
    out = ops.segment_rewards_to_dense(torch.tensor([[2.0], [3.0]]), torch.tensor([[0], [0]]),
                                       torch.tensor([1, 1]), torch.tensor([[True], [False]]),
                                       spread="end")
    assert out.tolist() == [[2.0], [0.0]]


def test_no_batch_sized_temporaries():
    """The kernels allocate their outputs and nothing else of size B x T through torch."""
    from torch.profiler import ProfilerActivity, profile

    mask, ids, counts = _segmentation(32, 1024)
    values = torch.randn(32, 1024)
    entropy = torch.rand(32, 1024)
    calls = [
        (lambda: ops.entropy_segments(entropy, mask, threshold=0.9), 32 * 1024 * 8 + 32 * 8),
        (lambda: ops.segment_reduce(values, ids, counts, reduce="mean"), 32 * 1024 * 4),
        (lambda: ops.segment_reduce(values, ids, counts), 32 * 4),
        (lambda: ops.segment_rewards_to_dense(values, ids, counts, mask, normalizer=PHI3),
         32 * 1024 * 4),
    ]
    for call, output_bytes in calls:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        allocated = sum(e.nbytes() for e in events if e.nbytes() > 0)
        assert allocated <= output_bytes + 1024, f"{allocated} bytes for {output_bytes}"


# ---- gradcheck, opcheck, compile ------------------------------------------------------------

def test_gradcheck_float64():
    mask = (torch.arange(23) >= 3) & (torch.rand(4, 23) > 0.2)
    ids, counts = reference.entropy_segments(torch.rand(4, 23), mask, threshold=0.7)
    values = torch.randn(4, 23, dtype=torch.float64, requires_grad=True)
    for reduce in REDUCES:
        assert torch.autograd.gradcheck(
            lambda x, r=reduce: ops.segment_reduce(x, ids, counts, reduce=r), (values,))
    arb_ids, arb_counts = _arbitrary_segments(4, 23)
    assert torch.autograd.gradcheck(
        lambda x: ops.segment_reduce(x, arb_ids, arb_counts, reduce="mean"), (values,))
    rewards = torch.randn(4, 25, dtype=torch.float64, requires_grad=True)
    for spread in SPREADS:
        def dense(x, s=spread, c=None):
            return ops.segment_rewards_to_dense(x, ids, counts, mask, normalizer=PHI3, spread=s,
                                                clamp=c)
        # A clamp in the middle of the widest gap between the token rewards: active for some
        # tokens, and no token near its kink (where finite differences would be wrong).
        magnitudes = dense(rewards.detach()).abs().unique()
        magnitudes = magnitudes[magnitudes > 0]
        gap = magnitudes.diff().argmax()
        clamp = float(magnitudes[gap] + magnitudes[gap + 1]) / 2
        assert torch.autograd.gradcheck(dense, (rewards,))
        assert torch.autograd.gradcheck(lambda x, d=dense, c=clamp: d(x, c=c), (rewards,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    mask, ids, counts = _segmentation(3, 17, holes=0.2)
    entropy = torch.rand(3, 17).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.rlengine.entropy_segments.default, (entropy, mask, 0.8))
    values = torch.randn(3, 17).to(dtype).requires_grad_()
    for reduce in REDUCES:
        torch.library.opcheck(torch.ops.rlengine.segment_reduce.default,
                              (values, ids, counts, reduce))
        grad_shape = (3,) if reduce == "end_mean" else (3, 17)
        grad = torch.randn(grad_shape, dtype=result_dtype(dtype))
        torch.library.opcheck(torch.ops.rlengine.segment_reduce_backward.default,
                              (grad, ids, counts, reduce, dtype))
    rewards = torch.randn(3, 20).to(dtype).requires_grad_()
    for spread, normalizer in (("even", list(PHI3)), ("repeat", None), ("end", list(FLOORED))):
        args = (rewards, ids, counts, mask, normalizer, spread, 1.5)
        torch.library.opcheck(torch.ops.rlengine.segment_rewards_to_dense.default, args)
        grad = torch.randn(3, 17, dtype=result_dtype(dtype))
        torch.library.opcheck(torch.ops.rlengine.segment_rewards_to_dense_backward.default,
                              (grad, rewards.detach(), *args[1:]))


def test_compiles_fullgraph_entropy_segments():
    entropy = torch.rand(3, 21) * 3
    mask = _response_mask(3, 21)
    assert_compiles_fullgraph(lambda e, m: ops.entropy_segments(e, m, threshold=1.75), entropy, mask)


def test_compiles_fullgraph_segment_reduce():
    mask, ids, counts = _segmentation(3, 21)
    values = torch.randn(3, 21, requires_grad=True)

    def fn(v, i, c):
        return (ops.segment_reduce(v, i, c), ops.segment_reduce(v * 2, i, c, reduce="mean"))

    assert_compiles_fullgraph(fn, values, ids, counts, wrt=(values,))


def test_compiles_fullgraph_dense_pipeline():
    """Segmentation, segment rewards from a value head and dense rewards, in one graph."""
    entropy = torch.rand(3, 21) * 3
    mask = _response_mask(3, 21)
    values = torch.randn(3, 21, requires_grad=True)

    def fn(e, m, v):
        ids, counts = ops.entropy_segments(e, m, threshold=1.75)
        rewards = ops.segment_reduce(v, ids, counts, reduce="end")
        return ops.segment_rewards_to_dense(rewards, ids, counts, m, normalizer=PHI3, clamp=1.0)

    assert_compiles_fullgraph(fn, entropy, mask, values, wrt=(values,))


# ---- property tests -------------------------------------------------------------------------

SPECIALS = st.sampled_from([math.nan, math.inf, -math.inf, 1e4, -1e4, 0.0])


@st.composite
def segment_cases(draw):
    # The tensors come from torch's generator, seeded by hypothesis so that a case replays.
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    batch = draw(st.integers(0, 5))
    steps = draw(st.integers(0, 40))
    if draw(st.booleans()):
        mask = _response_mask(batch, steps, holes=draw(st.sampled_from([0.0, 0.3])))
        entropy = torch.rand(batch, steps, dtype=torch.float64) * 3
        threshold = draw(st.sampled_from([0.0, 1.0, 2.9, 1e9]))
        ids, counts = ops.entropy_segments(entropy, mask, threshold=threshold)
    else:
        ids, counts = _arbitrary_segments(batch, steps)
        mask = torch.rand(batch, steps) < 0.8
    dtype = draw(st.sampled_from(DTYPES))
    k_max = (int(counts.max()) if batch else 0) + draw(st.integers(0, 3))
    values = torch.randn(batch, steps, dtype=torch.float64) * 3
    rewards = torch.randn(batch, k_max, dtype=torch.float64) * 3
    for t in (values, rewards):
        for _ in range(draw(st.integers(0, 4))):
            if t.numel():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(SPECIALS)
    return mask, ids, counts, values.to(dtype), rewards.to(dtype)


@given(segment_cases(), st.sampled_from(REDUCES), st.sampled_from(SPREADS),
       st.sampled_from([None, PHI3, FLOORED]), st.sampled_from([10.0, 0.5, None]))
def test_property_matches_reference(case, reduce, spread, normalizer, clamp):
    mask, ids, counts, values, rewards = case
    _check_reduce(values, ids, counts, reduce)
    _check_dense(rewards, ids, counts, mask, normalizer=normalizer, spread=spread, clamp=clamp)


# ---- bad input ------------------------------------------------------------------------------

def _bad_segments():
    """(name, segment_ids [2, 6], counts [2], fragment of the expected message)."""
    ids = torch.tensor([[0, 0, 1, 1, 2, -1], [-1, 0, 1, 1, -1, -1]])
    counts = torch.tensor([3, 2])

    def patched(b, t, value):
        bad = ids.clone()
        bad[b, t] = value
        return bad

    return [
        ("id >= counts", patched(1, 3, 2), counts, "segment_ids[1, 3] = 2 is out of range"),
        ("id >= counts, row 0", patched(0, 5, 3), counts, "[0, counts[0]) = [0, 3)"),
        ("id < -1", patched(0, 2, -2), counts, "segment_ids[0, 2] = -2"),
        ("huge id", patched(1, 0, 2**62), counts, f"segment_ids[1, 0] = {2**62}"),
        ("most negative id", patched(0, 0, -2**63), counts, f"= {-2**63}"),
        ("counts > T", ids, torch.tensor([7, 2]), "counts[0] = 7 is out of range"),
        ("counts < 0", ids, torch.tensor([3, -1]), "counts[1] = -1 is out of range"),
        ("counts huge", ids, torch.tensor([3, 2**62]), f"counts[1] = {2**62}"),
    ]


BAD = _bad_segments()


@pytest.mark.parametrize("name, ids, counts, fragment", BAD, ids=[b[0] for b in BAD])
def test_malformed_segments_raise_value_error(name, ids, counts, fragment):
    values = torch.randn(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    for reduce in REDUCES:
        with pytest.raises(ValueError, match=r"rlengine\.segment_reduce") as info:
            ops.segment_reduce(values, ids, counts, reduce=reduce)
        assert fragment in str(info.value)
        grad = torch.randn(2) if reduce == "end_mean" else torch.randn(2, 6)
        with pytest.raises(ValueError, match=r"rlengine\.segment_reduce_backward") as info:
            torch.ops.rlengine.segment_reduce_backward(grad, ids, counts, reduce, torch.float32)
        assert fragment in str(info.value)
    rewards = torch.randn(2, 8)
    for spread in SPREADS:
        for normalizer in (None, PHI3):
            with pytest.raises(ValueError, match=r"rlengine\.segment_rewards_to_dense") as info:
                ops.segment_rewards_to_dense(rewards, ids, counts, mask, normalizer=normalizer,
                                             spread=spread)
            assert fragment in str(info.value)
            with pytest.raises(ValueError, match="segment_rewards_to_dense_backward") as info:
                torch.ops.rlengine.segment_rewards_to_dense_backward(
                    torch.randn(2, 6), rewards, ids, counts, mask,
                    None if normalizer is None else list(normalizer), spread, 10.0)
            assert fragment in str(info.value)


def test_counts_above_kmax_raise_value_error():
    ids = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match=r"counts\[0\] = 4 exceeds segment_rewards.shape\[1\] = 3"):
        ops.segment_rewards_to_dense(torch.randn(1, 3), ids, torch.tensor([4]),
                                     torch.ones(1, 4, dtype=torch.bool))


E = torch.rand(2, 5)
M = torch.ones(2, 5, dtype=torch.bool)
IDS = torch.zeros(2, 5, dtype=torch.long)
C = torch.ones(2, dtype=torch.long)


@pytest.mark.parametrize("call, error, fragment", [
    (lambda: ops.entropy_segments(E.long(), M, threshold=1.0), TypeError, "entropy must be float"),
    (lambda: ops.entropy_segments(E[0], M[0], threshold=1.0), ValueError, "entropy must be 2-D"),
    (lambda: ops.entropy_segments(E, M[:, :4], threshold=1.0), ValueError, "response_mask must have shape"),
    (lambda: ops.entropy_segments(E, M, threshold=math.nan), ValueError, "threshold must be finite"),
    (lambda: ops.entropy_segments(E, M, threshold="1"), TypeError, "threshold must be a real"),
    (lambda: ops.entropy_segments(E, M.to("meta"), threshold=1.0), ValueError, "is on meta"),
    (lambda: ops.segment_reduce(E, IDS.float(), C), TypeError, "segment_ids must be int64 or int32"),
    (lambda: ops.segment_reduce(E, IDS, C.float()), TypeError, "counts must be int64 or int32"),
    (lambda: ops.segment_reduce(E, IDS[:, :4], C), ValueError, "segment_ids must have shape (2, 5)"),
    (lambda: ops.segment_reduce(E, IDS, C[:1]), ValueError, "counts must have shape (2,)"),
    (lambda: ops.segment_reduce(E, IDS[0], C), ValueError, "segment_ids must be 2-D"),
    (lambda: ops.segment_reduce(E, IDS, C, reduce="max"), ValueError, "reduce must be one of"),
    (lambda: ops.segment_reduce(E.int(), IDS, C), TypeError, "values must be float"),
    (lambda: ops.segment_rewards_to_dense(E[:1], IDS, C, M), ValueError, "segment_rewards must have B = 2"),
    (lambda: ops.segment_rewards_to_dense(E, IDS, C, M[:, 1:]), ValueError, "mask must have shape"),
    (lambda: ops.segment_rewards_to_dense(E, IDS, C, M, spread="uniform"), ValueError, "spread must be one of"),
    (lambda: ops.segment_rewards_to_dense(E, IDS, C, M, normalizer=(1.0, 2.0)), ValueError, "got 2 numbers"),
    (lambda: ops.segment_rewards_to_dense(E, IDS, C, M, normalizer=(1.0, 2.0, math.inf, 1.0)), ValueError, "normalizer a_sigma must be finite"),
    (lambda: ops.segment_rewards_to_dense(E, IDS, C, M, normalizer="abcd"), TypeError, "normalizer must be None or a sequence"),
    (lambda: ops.segment_rewards_to_dense(E, IDS, C, M, clamp=0.0), ValueError, "clamp must be > 0"),
    (lambda: ops.segment_rewards_to_dense(E, IDS, C, M, clamp=-math.inf), ValueError, "clamp must be finite"),
    (lambda: ops.segment_rewards_to_dense(E, IDS, C, M.to("meta")), ValueError, "is on meta"),
])
def test_bad_arguments_raise_named_error(call, error, fragment):
    with pytest.raises(error, match=r"rlengine\.(entropy_segments|segment_)") as info:
        call()
    assert fragment in str(info.value)


def test_normalizer_as_array_or_tensor():
    import numpy as np

    mask, ids, counts = _segmentation(3, 30)
    rewards = torch.randn(3, 31)
    expected = ops.segment_rewards_to_dense(rewards, ids, counts, mask, normalizer=PHI3)
    for normalizer in (list(PHI3), np.array(PHI3), np.array(PHI3, dtype=np.float32),
                       torch.tensor(PHI3, dtype=torch.float64)):
        out = ops.segment_rewards_to_dense(rewards, ids, counts, mask, normalizer=normalizer)
        torch.testing.assert_close(out, expected)


def test_clamp_inf_is_no_clamp():
    mask, _, _ = _segmentation(3, 30)
    mask[0] = False
    mask[0, 5:12] = True                                  # row 0's response starts at token 5
    ids, counts = reference.entropy_segments(torch.rand(3, 30), mask, threshold=0.9)
    rewards = torch.randn(3, 31) * 100
    rewards[0, 0] = 50.0                                  # a reward the default clamp would cut
    for spread in SPREADS:
        unclamped = ops.segment_rewards_to_dense(rewards, ids, counts, mask, spread=spread,
                                                 clamp=None)
        torch.testing.assert_close(ops.segment_rewards_to_dense(
            rewards, ids, counts, mask, spread=spread, clamp=math.inf), unclamped)
    repeated = ops.segment_rewards_to_dense(rewards, ids, counts, mask, spread="repeat",
                                            clamp=None)
    assert repeated[0, 5] == 50.0
