"""rlengine.ops.sequence_scores, rrhf_rank_loss and bt_loss against their references
(reference.sequence_scores, reference.rrhf_rank_loss, reference.bt_loss) evaluated in float64."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPES,
    FP32_EPS,
    GRADIENT_TOLERANCE,
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

RANKING_OPS = ("sequence_scores", "sequence_scores_backward", "rrhf_rank_loss",
               "rrhf_rank_loss_backward", "bt_loss", "bt_loss_backward")



def _looser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype whose gradient tolerance is the looser of the two."""
    return max(a, b, key=lambda d: GRADIENT_TOLERANCE[d][1])


@pytest.mark.parametrize("name", RANKING_OPS)
def test_compiled_kernels_are_registered(name):
    assert rlengine._extension.has_kernel(name, "CPU")


# ==== sequence_scores ============================================================================

def _check_sequence_scores(x, mask, length_penalty=1.0):
    """Forward and backward (random incoming gradient) equal the float64 reference's."""
    dtype = x.dtype
    ours = x.detach().clone().requires_grad_()
    ref = to64(x).requires_grad_()
    out = ops.sequence_scores(ours, mask, length_penalty=length_penalty)
    expected = reference.sequence_scores(ref, mask, length_penalty=length_penalty)
    assert out.dtype == result_dtype(dtype) and out.shape == x.shape[:-1]
    # fp32 sums carry ~eps * sum|x| of rounding (it matters for the plain sum, length_penalty 0).
    kept = torch.where(mask.bool(), x.double().abs(), 0).sum(-1) if x.numel() else x.double()
    slack = 0.0 if dtype == torch.float64 or not kept.numel() else 8 * FP32_EPS * float(kept.max())
    assert_matches(out, expected, dtype, what="scores", extra_atol=slack)
    grad = incoming_gradient(out)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    assert ours.grad.dtype == dtype
    assert_matches(ours.grad, ref.grad, dtype, gradient=True, what="grad token_logprobs")
    return out, ours.grad


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 31), (4, 3, 17), (7, 2049), (2, 5000)])
def test_sequence_scores_matches_reference(shape, dtype, length_penalty):
    x = (torch.randn(shape) - 2).to(dtype)
    mask = torch.rand(shape) < 0.7
    mask[0] = False                                         # an empty row
    _check_sequence_scores(x, mask, length_penalty)


def test_sequence_scores_is_rrhf_length_normalized_score():
    # Two candidates of lengths 3 and 2 padded to 4: p_i = sum / real length, not padded length.
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -7.0], [-0.5, -1.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(ops.sequence_scores(logprobs, mask), torch.tensor([-2.0, -1.0]))
    torch.testing.assert_close(ops.sequence_scores(logprobs, mask, length_penalty=0.0),
                               torch.tensor([-6.0, -2.0]))
    torch.testing.assert_close(ops.sequence_scores(logprobs, mask, length_penalty=0.5),
                               torch.tensor([-6.0 / math.sqrt(3), -2.0 / math.sqrt(2)]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_scores_masked_positions_never_contribute(dtype):
    x = torch.randn(4, 9).to(dtype)
    mask = torch.rand(4, 9) < 0.5
    mask[:, 0] = True
    mask[3] = False
    poisoned = x.clone()
    poisoned[~mask] = torch.tensor([math.nan, -math.inf, math.inf]).to(dtype).repeat(40)[
        : int((~mask).sum())]
    clean, clean_grad = _check_sequence_scores(x, mask)
    dirty = poisoned.clone().requires_grad_()
    out = ops.sequence_scores(dirty, mask)
    assert torch.equal(out, clean)                          # bit-identical, not just close
    out.backward(torch.ones_like(out))
    assert dirty.grad[~mask].eq(0).all() and torch.isfinite(dirty.grad).all()
    assert out[3] == 0 and dirty.grad[3].eq(0).all()        # an all-masked row
    assert dirty.grad[0, 0] != 0


def test_sequence_scores_numeric_mask_and_layouts():
    x = torch.randn(6, 20)
    mask = torch.rand(6, 20) < 0.6
    expected = ops.sequence_scores(x, mask)
    torch.testing.assert_close(ops.sequence_scores(x, mask.int() * 3), expected)
    torch.testing.assert_close(ops.sequence_scores(x, mask.float()), expected)
    torch.testing.assert_close(ops.sequence_scores(noncontiguous(x), noncontiguous(mask)),
                               expected)
    # x[:, 1:] of a wider buffer (leading stride != T) and a transposed copy.
    wide = torch.randn(6, 21)
    _check_sequence_scores(wide[:, 1:], mask)
    _check_sequence_scores(torch.randn(20, 6).t(), mask.t().contiguous().t())


def test_sequence_scores_empty_shapes():
    for shape in [(0, 5), (3, 0), (2, 0, 4), (0,)]:
        x = torch.randn(shape, requires_grad=True)
        out = ops.sequence_scores(x, torch.ones(shape, dtype=torch.bool))
        assert out.shape == shape[:-1]
        assert out.eq(0).all()                              # T = 0: every row is empty
        out.sum().backward()
        assert x.grad.shape == shape


def test_sequence_scores_gradcheck_float64():
    x = torch.randn(3, 2, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 2, 11) < 0.6
    mask[1, 0] = False
    for length_penalty in (1.0, 0.0, 1.7):
        assert torch.autograd.gradcheck(
            lambda t: ops.sequence_scores(t, mask, length_penalty=length_penalty), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sequence_scores_opcheck(dtype):
    x = torch.randn(4, 3, 13).to(dtype).requires_grad_()
    mask = torch.rand(4, 3, 13) < 0.5
    torch.library.opcheck(torch.ops.rlengine.sequence_scores.default, (x, mask, 0.8))
    torch.library.opcheck(torch.ops.rlengine.sequence_scores_backward.default,
                          (torch.randn(4, 3).to(result_dtype(dtype)), mask, 0.8, dtype))


def test_sequence_scores_compiles_fullgraph():
    def score(lp, m):
        return (ops.sequence_scores(lp[:, 1:], m[:, 1:], length_penalty=0.9) ** 2).sum()

    x = torch.randn(5, 12, requires_grad=True)
    assert_compiles_fullgraph(score, x, torch.rand(5, 12) < 0.7, wrt=(x,))


@st.composite
def logprob_rows(draw):
    shape = (draw(st.integers(0, 5)), draw(st.integers(0, 70)))
    dtype = draw(st.sampled_from(DTYPES))
    x = -torch.rand(shape, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    mask = torch.rand(shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    if x.numel():                                           # poison masked-out positions
        x = torch.where(mask, x, torch.tensor(draw(st.sampled_from([-math.inf, math.nan, 5.0]))))
    return x.to(dtype), mask, draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))


@given(logprob_rows())
def test_sequence_scores_property(case):
    x, mask, length_penalty = case
    _check_sequence_scores(x, mask, length_penalty)


@pytest.mark.parametrize("make_args, kwargs, error, fragment", [
    (lambda: (torch.randn(()), torch.ones((), dtype=torch.bool)), {}, ValueError,
     "token dimension"),
    (lambda: (torch.randn(3, 4), torch.ones(3, 5, dtype=torch.bool)), {}, ValueError,
     "mask must have shape"),
    (lambda: (torch.randint(0, 3, (3, 4)), torch.ones(3, 4, dtype=torch.bool)), {}, TypeError,
     "token_logprobs must be float"),
    (lambda: (torch.randn(3, 4), torch.ones(3, 4, dtype=torch.complex64)), {}, TypeError,
     "mask must be a bool or real tensor"),
    (lambda: ([[0.0]], torch.ones(1, 1, dtype=torch.bool)), {}, TypeError,
     "token_logprobs must be a torch.Tensor"),
    (lambda: (torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool, device="meta")), {},
     ValueError, "is on meta"),
    (lambda: (torch.randn(3, 4), torch.ones(3, 4)), {"length_penalty": -0.5}, ValueError,
     "length_penalty must be >= 0"),
    (lambda: (torch.randn(3, 4), torch.ones(3, 4)), {"length_penalty": math.nan}, ValueError,
     "length_penalty must be finite"),
    (lambda: (torch.randn(3, 4), torch.ones(3, 4)), {"length_penalty": math.inf}, ValueError,
     "length_penalty must be finite"),
    (lambda: (torch.randn(3, 4), torch.ones(3, 4)), {"length_penalty": "1"}, TypeError,
     "length_penalty must be a real number"),
])
def test_sequence_scores_bad_input(make_args, kwargs, error, fragment):
    x, mask = make_args()
    with pytest.raises(error, match="rlengine.sequence_scores") as info:
        ops.sequence_scores(x, mask, **kwargs)
    assert fragment in str(info.value)


def test_sequence_scores_kernel_guards_shapes():
    """Called directly (past the Python checks), the kernel still refuses a mismatched mask."""
    with pytest.raises(ValueError, match="mask must have shape"):
        torch.ops.rlengine.sequence_scores(torch.randn(3, 4), torch.ones(3, 5, dtype=torch.bool),
                                           1.0)
    with pytest.raises(ValueError, match="grad_scores must have shape"):
        torch.ops.rlengine.sequence_scores_backward(torch.randn(4),
                                                    torch.ones(3, 5, dtype=torch.bool), 1.0,
                                                    torch.float32)


# ==== rrhf_rank_loss =============================================================================

def _check_rank_loss(scores, rewards, valid=None):
    dtype = scores.dtype
    ours = scores.detach().clone().requires_grad_()
    ref = to64(scores).requires_grad_()
    out = ops.rrhf_rank_loss(ours, rewards, valid)
    expected = reference.rrhf_rank_loss(ref, to64(rewards), valid)
    assert out.dtype == result_dtype(dtype) and out.shape == (scores.shape[0],)
    assert_matches(out, expected, dtype, what="rank loss")
    grad = incoming_gradient(out, where=torch.isfinite(expected))
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    assert ours.grad.dtype == dtype and ours.grad.shape == scores.shape
    assert_matches(ours.grad, ref.grad, dtype, gradient=True, what="grad scores")
    return out, ours.grad


def test_rrhf_rank_loss_methods_example():
    """METHODS.md section 4: p = [-1.2, -0.8, -1.5, -0.9], r = [0.1, -0.3, 0.5, 0.2]: 2.1."""
    p = torch.tensor([[-1.2, -0.8, -1.5, -0.9]], requires_grad=True)
    r = torch.tensor([[0.1, -0.3, 0.5, 0.2]])
    loss = ops.rrhf_rank_loss(p, r)
    assert abs(loss.item() - 2.1) < 1e-6
    loss.sum().backward()
    # Active pairs (worse, better): (1,0) (1,3) (1,2) (0,2) (3,2).
    torch.testing.assert_close(p.grad, torch.tensor([[0.0, 3.0, -3.0, 0.0]]))
    p64 = torch.tensor([[-1.2, -0.8, -1.5, -0.9]], dtype=torch.float64)
    r64 = torch.tensor([[0.1, -0.3, 0.5, 0.2]], dtype=torch.float64)
    assert abs(ops.rrhf_rank_loss(p64, r64).item() - 2.1) < 1e-14


@pytest.mark.parametrize("reward_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (5, 4), (8, 7), (3, 40), (0, 4), (4, 0),
                                   (300, 6)])
def test_rrhf_rank_loss_matches_reference(shape, dtype, reward_dtype):
    scores = (torch.randn(shape) - 1).to(dtype)
    rewards = torch.randint(-3, 4, shape).to(reward_dtype)          # many ties
    valid = torch.rand(shape) < 0.8
    _check_rank_loss(scores, rewards, valid)
    _check_rank_loss(scores, torch.randn(shape).to(reward_dtype))


def test_rrhf_rank_loss_ties_and_nan_rewards_contribute_nothing():
    p = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    loss = ops.rrhf_rank_loss(p, torch.tensor([[0.5, 0.5, 0.5]]))
    loss.sum().backward()
    assert loss.item() == 0 and p.grad.eq(0).all()
    # Candidate 1 has a NaN reward, so only candidates 0 and 2 are compared: ordered as their
    # scores (p_2 < p_0 with r_2 < r_0) nothing is active; with the rewards swapped, 2.0.
    r = torch.tensor([[1.0, math.nan, 0.0]])
    assert ops.rrhf_rank_loss(p, r).item() == 0
    r = torch.tensor([[0.0, math.nan, 1.0]])
    assert ops.rrhf_rank_loss(p, r).item() == pytest.approx(2.0)
    _check_rank_loss(p.detach(), r)


def test_rrhf_rank_loss_invalid_candidates_never_count():
    p = torch.tensor([[-1.0, math.nan, -3.0, math.inf], [-1.0, -2.0, -3.0, -4.0]])
    r = torch.tensor([[0.0, 5.0, 1.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    valid = torch.tensor([[True, False, True, False], [False, False, False, False]])
    out, _ = _check_rank_loss(p, r, valid)
    assert out.tolist() == [2.0, 0.0]                       # pair (0 worse, 2 better) only
    leaf = p.clone().requires_grad_()
    ops.rrhf_rank_loss(leaf, r, valid).sum().backward()
    assert leaf.grad.tolist() == [[1.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(ops.rrhf_rank_loss(p, r, valid.int()), out)


def test_rrhf_rank_loss_equal_scores_have_zero_subgradient():
    # (0 worse, 1 better) has p_0 == p_1: a kink, whose subgradient is 0 (torch.relu's); the
    # pairs of candidate 3 with each other candidate are active.
    p = torch.tensor([[-1.0, -1.0, -3.0, -0.5]], requires_grad=True)
    r = torch.tensor([[0.0, 1.0, -1.0, -2.0]])
    loss = ops.rrhf_rank_loss(p, r)
    loss.sum().backward()
    assert loss.item() == 3.5
    assert p.grad.tolist() == [[-1.0, -1.0, -1.0, 3.0]]
    _check_rank_loss(p.detach(), r)


def test_rrhf_rank_loss_small_and_empty():
    for shape in [(0, 5), (4, 1), (3, 0), (0, 0)]:
        p = torch.randn(shape, requires_grad=True)
        out = ops.rrhf_rank_loss(p, torch.randn(shape))
        assert out.shape == (shape[0],) and out.eq(0).all()
        out.sum().backward()
        assert p.grad.shape == shape and p.grad.eq(0).all()


def test_rrhf_rank_loss_batches_queries_independently():
    B, K = 37, 6
    p, r = torch.randn(B, K), torch.randn(B, K)
    valid = torch.rand(B, K) < 0.9
    batched = ops.rrhf_rank_loss(p, r, valid)
    one_by_one = torch.cat([ops.rrhf_rank_loss(p[b:b + 1], r[b:b + 1], valid[b:b + 1])
                            for b in range(B)])
    assert torch.equal(batched, one_by_one)


def test_rrhf_rank_loss_layouts_and_reward_gradient():
    p = torch.randn(6, 5).t()                                # non-contiguous [5, 6]
    r = torch.randn(6, 5).t()
    valid = (torch.rand(6, 5) < 0.8).t()
    _check_rank_loss(p, r, valid)
    _check_rank_loss(noncontiguous(torch.randn(4, 7)), noncontiguous(torch.randn(4, 7)))
    scores = torch.randn(3, 4, requires_grad=True)
    rewards = torch.randn(3, 4, requires_grad=True)         # rewards are not differentiated
    ops.rrhf_rank_loss(scores, rewards).sum().backward()
    assert rewards.grad is None and scores.grad is not None


def test_rrhf_rank_loss_gradcheck_float64():
    # Distinct scores (no kink within gradcheck's eps) and rewards with ties and invalid slots.
    p = (torch.randperm(24, dtype=torch.float64) * 0.1).reshape(4, 6).requires_grad_()
    r = torch.randint(0, 3, (4, 6)).double()
    valid = torch.rand(4, 6) < 0.8
    assert torch.autograd.gradcheck(lambda t: ops.rrhf_rank_loss(t, r, valid), (p,))
    assert torch.autograd.gradcheck(lambda t: ops.rrhf_rank_loss(t, r), (p,))


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rrhf_rank_loss_opcheck(dtype, with_valid):
    p = torch.randn(5, 4).to(dtype).requires_grad_()
    r = torch.randn(5, 4)
    valid = torch.rand(5, 4) < 0.7 if with_valid else None
    torch.library.opcheck(torch.ops.rlengine.rrhf_rank_loss.default, (p, r, valid))
    torch.library.opcheck(torch.ops.rlengine.rrhf_rank_loss_backward.default,
                          (torch.randn(5).to(result_dtype(dtype)), p.detach(), r, valid))


def test_rrhf_rank_loss_compiles_fullgraph():
    def rrhf(logprobs, mask, rewards):
        B, K, T = logprobs.shape
        scores = ops.sequence_scores(logprobs, mask).reshape(B, K)
        return ops.rrhf_rank_loss(scores, rewards).sum()

    lp = (-torch.rand(3, 4, 9)).requires_grad_()
    mask = torch.rand(3, 4, 9) < 0.8
    (g_actual,) = assert_compiles_fullgraph(rrhf, lp, mask, torch.randn(3, 4), wrt=(lp,))
    assert g_actual.abs().sum() > 0


@st.composite
def ranking_batches(draw):
    B, K = draw(st.integers(0, 6)), draw(st.integers(0, 9))
    dtype = draw(st.sampled_from(DTYPES))
    # Scores on a coarse grid give exact ties of p; rewards on a grid give ties of r.
    scores = torch.randint(-6, 1, (B, K)).double() * draw(st.sampled_from([0.25, 1.0]))
    if draw(st.booleans()):
        scores = scores + torch.rand(B, K, dtype=torch.float64) * 0.01
    rewards = torch.randint(0, draw(st.integers(1, 5)), (B, K)).double()
    rewards[torch.rand(B, K) < draw(st.sampled_from([0.0, 0.2]))] = math.nan
    valid = torch.rand(B, K) < draw(st.sampled_from([0.5, 1.0]))
    scores[~valid] = draw(st.sampled_from([math.nan, math.inf, -7.0]))   # never read
    return scores.to(dtype), rewards, valid if draw(st.booleans()) or not valid.all() else None


@given(ranking_batches())
def test_rrhf_rank_loss_property(case):
    scores, rewards, valid = case
    _check_rank_loss(scores, rewards, valid)


@pytest.mark.parametrize("make_args, error, fragment", [
    (lambda: (torch.randn(4), torch.randn(4), None), ValueError, "scores must be 2-D"),
    (lambda: (torch.randn(2, 4), torch.randn(2, 3), None), ValueError, "rewards must have shape"),
    (lambda: (torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 3, dtype=torch.bool)),
     ValueError, "valid must have shape"),
    (lambda: (torch.randint(0, 3, (2, 4)), torch.randn(2, 4), None), TypeError,
     "scores must be float"),
    (lambda: (torch.randn(2, 4), torch.randint(0, 3, (2, 4)), None), TypeError,
     "rewards must be float"),
    (lambda: (torch.randn(2, 4), [[0.0] * 4] * 2, None), TypeError,
     "rewards must be a torch.Tensor"),
    (lambda: (torch.randn(2, 4), torch.randn(2, 4, device="meta"), None), ValueError,
     "is on meta"),
])
def test_rrhf_rank_loss_bad_input(make_args, error, fragment):
    with pytest.raises(error, match="rlengine.rrhf_rank_loss") as info:
        ops.rrhf_rank_loss(*make_args())
    assert fragment in str(info.value)


def test_rrhf_rank_loss_kernel_guards_shapes():
    with pytest.raises(ValueError, match="valid must have shape"):
        torch.ops.rlengine.rrhf_rank_loss(torch.randn(2, 4), torch.randn(2, 4),
                                          torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="grad_loss must have shape"):
        torch.ops.rlengine.rrhf_rank_loss_backward(torch.randn(3), torch.randn(2, 4),
                                                   torch.randn(2, 4), None)


# ==== bt_loss ====================================================================================

def _leaf(t, differentiable=True):
    """(kernel input, float64 reference input) for a tensor argument; reals pass through."""
    if not isinstance(t, torch.Tensor):
        return t, t
    ours = t.detach().clone()
    ref = to64(t)
    if differentiable and t.dtype.is_floating_point:
        ours.requires_grad_()
        ref.requires_grad_()
    return ours, ref


def _check_bt(chosen, rejected, margin=None, smoothing=0.0):
    """Loss and the gradients of every tensor argument equal the float64 reference's."""
    dtype = chosen.dtype
    args = {"chosen": _leaf(chosen), "rejected": _leaf(rejected), "margin": _leaf(margin),
            "label_smoothing": _leaf(smoothing)}
    ours = {k: v[0] for k, v in args.items()}
    refs = {k: v[1] for k, v in args.items()}
    out = ops.bt_loss(ours["chosen"], ours["rejected"], margin=ours["margin"],
                      label_smoothing=ours["label_smoothing"])
    expected = reference.bt_loss(refs["chosen"], refs["rejected"], margin=refs["margin"],
                                 label_smoothing=refs["label_smoothing"])
    assert out.dtype == result_dtype(dtype) and out.shape == chosen.shape
    # delta is formed in fp32: its rounding is ~eps * (|chosen| + |rejected| + |margin|).
    size = chosen.double().abs() + rejected.double().abs()
    if isinstance(margin, torch.Tensor):
        size = size + margin.double().abs()
    elif margin is not None:
        size = size + abs(margin)
    finite = size[torch.isfinite(size)]
    slack = 0.0
    if dtype != torch.float64 and finite.numel():
        slack = 4 * FP32_EPS * float(finite.max())
    assert_matches(out, expected, dtype, what="bt loss", extra_atol=slack)
    grad = incoming_gradient(out)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    grad_size = float(grad.abs().max()) if grad.numel() else 0.0
    for name in args:
        leaf, ref = ours[name], refs[name]
        if not (isinstance(leaf, torch.Tensor) and leaf.requires_grad):
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        tol_dtype = _looser(dtype, leaf.dtype)
        extra = slack * grad_size
        if leaf.dim() == 0 and out.numel() > 1 and dtype != torch.float64 and finite.numel():
            # a 0-d margin or smoothing gets the sum of N per-pair terms (each at most
            # |grad| * max(1, |delta|)): a float32 sum's rounding grows with their total size
            extra += 4 * FP32_EPS * float(grad.abs().sum()) * max(1.0, float(finite.max()))
        assert_matches(leaf.grad, ref.grad, tol_dtype, gradient=True, what=f"grad {name}",
                       extra_atol=extra)
    return out, ours


def _margin_kinds(shape, dtype):
    return [None, 0.7, -1.3, torch.randn(shape).to(dtype), -torch.rand(()).to(dtype),
            torch.randn(shape, dtype=torch.float64)]


def _smoothing_kinds(shape, dtype):
    return [0.0, 0.2, 1.0, torch.rand(shape).to(dtype), torch.rand(()).to(torch.float32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 3), (4099,), ()])
def test_bt_loss_matches_reference(shape, dtype):
    chosen = (torch.randn(shape) * 3).to(dtype)
    rejected = (torch.randn(shape) * 3).to(dtype)
    for margin in _margin_kinds(shape, dtype):
        for smoothing in _smoothing_kinds(shape, dtype):
            _check_bt(chosen, rejected, margin, smoothing)


def test_bt_loss_large_batch_crosses_threads_and_chunks():
    for dtype in (torch.float32, torch.bfloat16):
        chosen, rejected = torch.randn(100_003).to(dtype), torch.randn(100_003).to(dtype)
        _check_bt(chosen, rejected, torch.randn(100_003), torch.rand(100_003))


@pytest.mark.parametrize("smoothing", [0.0, 0.3, 1.0])
def test_bt_loss_extreme_deltas_fp32(smoothing):
    """|delta| up to 1e4 in fp32: finite loss and gradients equal to the reference's (no
    overflow of exp, no loss of the tiny tail terms)."""
    delta = torch.tensor([1e4, -1e4, 5e3, -5e3, 100.0, -100.0, 88.0, -88.0, 30.0, -30.0,
                          17.0, -17.0, 1e-7, -1e-7, 0.0])
    out, ours = _check_bt(delta, torch.zeros_like(delta), None, smoothing)
    assert torch.isfinite(out).all()
    assert torch.isfinite(ours["chosen"].grad).all()
    if smoothing == 0.0:
        # softplus(-delta) for large positive delta is exp(-delta): relative precision kept.
        expected_tail = torch.exp(-torch.tensor([30.0, 17.0], dtype=torch.float64))
        torch.testing.assert_close(out[[8, 10]].double(), expected_tail, rtol=1e-6, atol=0)
        assert out[1] == 1e4 and out[0] == 0


def test_bt_loss_gradient_at_zero_delta():
    for smoothing in (0.0, 0.1, 0.5):
        chosen = torch.zeros(3, requires_grad=True)
        rejected = torch.zeros(3, requires_grad=True)
        loss = ops.bt_loss(chosen, rejected, label_smoothing=smoothing)
        loss.sum().backward()
        torch.testing.assert_close(loss, torch.full((3,), math.log(2.0)))
        torch.testing.assert_close(chosen.grad, torch.full((3,), smoothing - 0.5))
        torch.testing.assert_close(rejected.grad, torch.full((3,), 0.5 - smoothing))


def test_bt_loss_is_negative_log_sigmoid_with_margin():
    chosen, rejected = torch.randn(50), torch.randn(50)
    margin = -torch.rand(50) * 2                            # adaptive margins may be negative
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - margin)
    torch.testing.assert_close(ops.bt_loss(chosen, rejected, margin=margin), expected)
    torch.testing.assert_close(ops.bt_loss(chosen, rejected, margin=-0.75),
                               -torch.nn.functional.logsigmoid(chosen - rejected + 0.75))
    _check_bt(chosen, rejected, margin)
    a = 0.2                                                 # the soft label of METHODS.md 1
    soft = -(1 - a) * torch.nn.functional.logsigmoid(chosen - rejected) \
        - a * torch.nn.functional.logsigmoid(rejected - chosen)
    torch.testing.assert_close(ops.bt_loss(chosen, rejected, label_smoothing=a), soft)


def test_bt_loss_scalar_and_tensor_arguments_agree():
    chosen = torch.randn(33, requires_grad=True)
    rejected = torch.randn(33, requires_grad=True)

    def run(margin, smoothing):
        chosen.grad = rejected.grad = None
        loss = ops.bt_loss(chosen, rejected, margin=margin, label_smoothing=smoothing)
        loss.backward(torch.linspace(-1, 2, 33))
        return loss.detach(), chosen.grad.clone(), rejected.grad.clone()

    reference_run = run(0.4, 0.15)
    for margin in (torch.tensor(0.4), torch.full((33,), 0.4)):
        for smoothing in (0.15, torch.tensor(0.15), torch.full((33,), 0.15)):
            for a, b in zip(run(margin, smoothing), reference_run):
                assert torch.equal(a, b)
    # No margin is margin 0; an integer margin tensor is converted.
    assert torch.equal(run(None, 0.0)[0], run(0.0, 0.0)[0])
    assert torch.equal(run(torch.full((33,), 2), 0.0)[0], run(2.0, 0.0)[0])


def test_bt_loss_margin_and_smoothing_gradients():
    chosen, rejected = torch.randn(9), torch.randn(9)
    # Per-pair tensors, 0-d tensors, and a float64 margin with float32 rewards.
    _, ours = _check_bt(chosen, rejected, torch.randn(9), torch.rand(9))
    assert ours["margin"].grad.shape == (9,) and ours["label_smoothing"].grad.shape == (9,)
    _, ours = _check_bt(chosen, rejected, torch.tensor(0.3), torch.tensor(0.25))
    assert ours["margin"].grad.shape == () and ours["label_smoothing"].grad.shape == ()
    _, ours = _check_bt(chosen, rejected, torch.randn(9, dtype=torch.float64), 0.1)
    assert ours["margin"].grad.dtype == torch.float64
    # dloss/da = delta exactly, dloss/dmargin = -dloss/dchosen.
    a = torch.rand(9, requires_grad=True)
    m = torch.randn(9, requires_grad=True)
    c = chosen.clone().requires_grad_()
    ops.bt_loss(c, rejected, margin=m, label_smoothing=a).sum().backward()
    torch.testing.assert_close(a.grad, chosen - rejected - m.detach())
    torch.testing.assert_close(m.grad, -c.grad)


def test_bt_loss_nonfinite_inputs_follow_reference():
    chosen = torch.tensor([math.inf, -math.inf, math.nan, 1.0, 2.0])
    rejected = torch.tensor([0.0, 0.0, 0.0, math.nan, 1.0])
    for smoothing in (0.0, 0.3, 1.0):
        out, _ = _check_bt(chosen, rejected, None, smoothing)
        assert torch.isnan(out[2:4]).all() and torch.isfinite(out[4])


def test_bt_loss_broadcast_and_noncontiguous_inputs():
    base = torch.randn(12)
    _check_bt(noncontiguous(base), noncontiguous(torch.randn(12)), noncontiguous(torch.randn(12)),
              noncontiguous(torch.rand(12)))
    # An expanded (stride 0) reward and the expanded gradient of loss.mean().
    chosen = torch.tensor(0.5).expand(12)
    _check_bt(chosen, base)
    x = torch.randn(12, requires_grad=True)
    ops.bt_loss(x, base).mean().backward()
    torch.testing.assert_close(x.grad, -torch.sigmoid(base - x.detach()) / 12)


def test_bt_loss_empty():
    chosen = torch.zeros(0, requires_grad=True)
    out = ops.bt_loss(chosen, torch.zeros(0), margin=torch.zeros(0),
                      label_smoothing=torch.zeros(0))
    assert out.shape == (0,)
    out.sum().backward()
    assert chosen.grad.shape == (0,)


def test_bt_loss_gradcheck_float64():
    c = torch.randn(7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, dtype=torch.float64, requires_grad=True)
    m = torch.randn(7, dtype=torch.float64, requires_grad=True)
    a = (torch.rand(7, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    m0 = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    a0 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def loss(*t):
        return ops.bt_loss(t[0], t[1], margin=t[2], label_smoothing=t[3])

    assert torch.autograd.gradcheck(loss, (c, r, m, a))
    assert torch.autograd.gradcheck(loss, (c, r, m0, a0))
    assert torch.autograd.gradcheck(lambda x, y: ops.bt_loss(x, y, margin=0.5,
                                                             label_smoothing=0.2), (c, r))
    big = (torch.tensor([40.0, -40.0, 700.0, -700.0], dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.bt_loss(x, torch.zeros_like(x)), (big,))


@pytest.mark.parametrize("kinds", ["scalars", "tensors", "zero-d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bt_loss_opcheck(dtype, kinds):
    c = torch.randn(6).to(dtype).requires_grad_()
    r = torch.randn(6).to(dtype).requires_grad_()
    if kinds == "scalars":
        m, a = None, None
    elif kinds == "tensors":
        m, a = torch.randn(6).requires_grad_(), torch.rand(6).to(dtype).requires_grad_()
    else:
        m, a = torch.tensor(0.3).requires_grad_(), torch.tensor(0.1).requires_grad_()
    torch.library.opcheck(torch.ops.rlengine.bt_loss.default, (c, r, m, a, 0.2, 0.1))
    detach = (lambda t: None if t is None else t.detach())
    torch.library.opcheck(torch.ops.rlengine.bt_loss_backward.default,
                          (torch.randn(6).to(result_dtype(dtype)), c.detach(), r.detach(),
                           detach(m), detach(a), 0.2, 0.1))


def test_bt_loss_compiles_fullgraph():
    def loss(c, r, m, a):
        return ops.bt_loss(c, r, margin=m, label_smoothing=a).mean() + \
            ops.bt_loss(c, r, margin=-0.5, label_smoothing=0.1).sum()

    c, r = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    m, a = torch.randn(16, requires_grad=True), torch.rand(16, requires_grad=True)
    assert_compiles_fullgraph(loss, c, r, m, a, wrt=(c, r, m, a))


@st.composite
def preference_pairs(draw):
    n = draw(st.integers(0, 40))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.01, 1.0, 30.0, 1e3]))
    chosen = torch.randn(n, dtype=torch.float64) * scale
    rejected = torch.randn(n, dtype=torch.float64) * scale
    for _ in range(draw(st.integers(0, 4))):                # special rewards
        if n:
            i = draw(st.integers(0, n - 1))
            chosen[i] = rejected[i] + draw(st.sampled_from([0.0, 1e4, -1e4, 60.0, -60.0]))
    margin = draw(st.sampled_from(["none", "float", "tensor", "zero-d"]))
    margin = {"none": None, "float": draw(st.floats(-3, 3)), "tensor": torch.randn(n) * 2,
              "zero-d": torch.tensor(draw(st.floats(-3, 3)))}[margin]
    smoothing = draw(st.sampled_from(["float", "tensor", "zero-d"]))
    smoothing = {"float": draw(st.floats(0, 1)), "tensor": torch.rand(n),
                 "zero-d": torch.tensor(draw(st.floats(0, 1)))}[smoothing]
    return chosen.to(dtype), rejected.to(dtype), margin, smoothing


@given(preference_pairs())
def test_bt_loss_property(case):
    _check_bt(*case)


@pytest.mark.parametrize("make_args, kwargs, error, fragment", [
    (lambda: (torch.randn(4), torch.randn(5)), {}, ValueError, "rejected must have shape"),
    (lambda: (torch.randn(4), torch.randn(4).double()), {}, TypeError,
     "rejected must have the dtype of chosen"),
    (lambda: (torch.randint(0, 3, (4,)), torch.randint(0, 3, (4,))), {}, TypeError,
     "chosen must be float"),
    (lambda: ([1.0], torch.randn(1)), {}, TypeError, "chosen must be a torch.Tensor"),
    (lambda: (torch.randn(4), torch.randn(4)), {"margin": torch.randn(3)}, ValueError,
     "margin must be a real number, a 0-d tensor or a tensor of the shape of chosen"),
    (lambda: (torch.randn(4), torch.randn(4)), {"margin": torch.ones(4, dtype=torch.bool)},
     TypeError, "margin must be float"),
    (lambda: (torch.randn(4), torch.randn(4)), {"margin": math.inf}, ValueError,
     "margin must be finite"),
    (lambda: (torch.randn(4), torch.randn(4)), {"margin": "1"}, TypeError,
     "margin must be a real number"),
    (lambda: (torch.randn(4), torch.randn(4)), {"label_smoothing": 1.5}, ValueError,
     "label_smoothing must be <= 1"),
    (lambda: (torch.randn(4), torch.randn(4)), {"label_smoothing": -0.1}, ValueError,
     "label_smoothing must be >= 0"),
    (lambda: (torch.randn(4), torch.randn(4)),
     {"label_smoothing": torch.tensor([0.1, 0.2, 1.2, 0.0])}, ValueError,
     "label_smoothing[2] = 1.2"),
    (lambda: (torch.randn(4), torch.randn(4)),
     {"label_smoothing": torch.tensor([0.1, math.nan, 0.2, 0.0])}, ValueError,
     "label_smoothing[1] = nan is outside [0, 1]"),
    (lambda: (torch.randn(4), torch.randn(4)), {"label_smoothing": torch.tensor(-0.5)},
     ValueError, "label_smoothing = -0.5 is outside [0, 1]"),
    (lambda: (torch.randn(4), torch.randn(4)), {"label_smoothing": torch.ones(4, 1) * 0.1},
     ValueError, "label_smoothing must be a real number, a 0-d tensor"),
    (lambda: (torch.randn(4), torch.randn(4)), {"label_smoothing": torch.zeros(4).long()},
     TypeError, "label_smoothing must be float"),
    (lambda: (torch.randn(4), torch.randn(4)), {"margin": torch.zeros(4, device="meta")},
     ValueError, "margin is on meta"),
])
def test_bt_loss_bad_input(make_args, kwargs, error, fragment):
    chosen, rejected = make_args()
    with pytest.raises(error, match="rlengine.bt_loss") as info:
        ops.bt_loss(chosen, rejected, **kwargs)
    assert fragment in str(info.value)


def test_bt_loss_kernel_guards_shapes():
    with pytest.raises(ValueError, match="margin must be 0-d or have the shape of chosen"):
        torch.ops.rlengine.bt_loss(torch.randn(4), torch.randn(4), torch.randn(3), None, 0.0, 0.0)
    with pytest.raises(ValueError, match="grad_loss must have shape"):
        torch.ops.rlengine.bt_loss_backward(torch.randn(3), torch.randn(4), torch.randn(4), None,
                                            None, 0.0, 0.0)
