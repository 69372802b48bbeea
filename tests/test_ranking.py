"""rlengine.ops.sequence_scores, rrhf_rank_loss and bt_loss against the float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, assert_matches, to64
from hypothesis import given
from hypothesis import strategies as st

from rlengine import ops
from rlengine.ops import reference


def _compare(op, ref, tensors, *, differentiable, kwargs=None, extra_atol=0.0):
    """Forward and backward (w.r.t. the tensors at the indices in differentiable, with a random
    incoming gradient) equal the float64 reference. tensors[0] sets the dtype tolerance."""
    kwargs = kwargs or {}
    dtype = tensors[0].dtype
    ours = [t.detach().clone().requires_grad_(i in differentiable) if t.is_floating_point() else t
            for i, t in enumerate(tensors)]
    theirs = [to64(t).requires_grad_(i in differentiable) if t.is_floating_point() else t
              for i, t in enumerate(tensors)]
    out = op(*ours, **kwargs)
    expected = ref(*theirs, **kwargs)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_matches(out, expected, dtype, what="forward", extra_atol=extra_atol)
    if out.numel() == 0 or not differentiable:
        return
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    for i in differentiable:
        assert ours[i].grad.dtype == ours[i].dtype
        assert_matches(ours[i].grad, theirs[i].grad, ours[i].dtype, gradient=True,
                       what=f"grad of input {i}", extra_atol=extra_atol)


# ---- sequence_scores ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (5, 31), (2, 3, 257), (64, 512)])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 0.5, 2.0])
def test_sequence_scores_matches_reference(shape, dtype, length_penalty):
    logprobs = (-torch.rand(shape) * 5).to(dtype)
    mask = torch.rand(shape) < 0.6
    _compare(ops.sequence_scores, reference.sequence_scores, [logprobs, mask],
             differentiable=[0], kwargs=dict(length_penalty=length_penalty))


def test_sequence_scores_rrhf_definition_and_empty_rows():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[False, True, True, False], [False, False, False, False]])
    torch.testing.assert_close(ops.sequence_scores(logprobs, mask), torch.tensor([-2.5, 0.0]))
    torch.testing.assert_close(ops.sequence_scores(logprobs, mask, length_penalty=0.0),
                               torch.tensor([-5.0, 0.0]))


def test_sequence_scores_never_reads_unselected_positions():
    logprobs = torch.full((2, 6), -math.inf)
    logprobs[:, :3] = -1.0
    logprobs[1, 4] = math.nan
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :3] = True
    x = logprobs.requires_grad_()
    scores = ops.sequence_scores(x, mask)
    torch.testing.assert_close(scores, torch.tensor([-1.0, -1.0]))
    scores.sum().backward()
    assert x.grad[:, 3:].eq(0).all() and torch.isfinite(x.grad).all()


def test_sequence_scores_strided_numeric_mask_and_empty():
    logprobs = torch.randn(4, 20)[:, ::2]
    mask = (torch.rand(4, 10) < 0.5).int()
    _compare(ops.sequence_scores, reference.sequence_scores, [logprobs, mask.bool()],
             differentiable=[0])
    torch.testing.assert_close(ops.sequence_scores(logprobs, mask),
                               ops.sequence_scores(logprobs.contiguous(), mask.bool()))
    assert ops.sequence_scores(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0,)
    assert ops.sequence_scores(torch.zeros(3, 0), torch.zeros(3, 0)).eq(0).all()


# ---- rrhf_rank_loss -------------------------------------------------------------------------------

def test_rrhf_check_value_from_the_paper_setup():
    """METHODS.md section 4: p = [-1.2, -0.8, -1.5, -0.9], r = [0.1, -0.3, 0.5, 0.2] give 2.1."""
    p = torch.tensor([[-1.2, -0.8, -1.5, -0.9]], requires_grad=True)
    r = torch.tensor([[0.1, -0.3, 0.5, 0.2]])
    loss = ops.rrhf_rank_loss(p, r)
    torch.testing.assert_close(loss, torch.tensor([2.1]))
    loss.sum().backward()
    # p_1 (worst reward) is above all three better candidates; p_0 above p_2; p_3 above p_2.
    torch.testing.assert_close(p.grad, torch.tensor([[0.0, 3.0, -3.0, 0.0]]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (0, 4), (3, 0), (5, 2), (7, 6), (33, 17)])
def test_rrhf_matches_reference(shape, dtype):
    scores = torch.randn(shape).to(dtype)
    rewards = torch.randint(0, 4, shape).float()  # many ties
    valid = torch.rand(shape) < 0.8
    _compare(ops.rrhf_rank_loss, reference.rrhf_rank_loss, [scores, rewards, valid],
             differentiable=[0])
    _compare(ops.rrhf_rank_loss, reference.rrhf_rank_loss, [scores, torch.randn(shape)],
             differentiable=[0])


def test_rrhf_ties_invalid_and_nan_rewards_add_nothing():
    p = torch.tensor([[0.0, 5.0, -5.0]])
    assert ops.rrhf_rank_loss(p, torch.tensor([[1.0, 1.0, 1.0]])).item() == 0.0   # all tied
    assert ops.rrhf_rank_loss(p, torch.tensor([[math.nan, 0.0, 1.0]])).item() == 0.0 + 10.0
    valid = torch.tensor([[True, True, False]])
    assert ops.rrhf_rank_loss(p, torch.tensor([[0.0, -1.0, 1.0]]), valid).item() == 5.0
    assert ops.rrhf_rank_loss(p, torch.tensor([[0.0, -1.0, 1.0]]),
                              torch.zeros(1, 3, dtype=torch.bool)).item() == 0.0


def test_rrhf_gradient_zero_at_equal_scores():
    p = torch.tensor([[1.0, 1.0]], requires_grad=True)
    ops.rrhf_rank_loss(p, torch.tensor([[0.0, 1.0]])).sum().backward()
    assert p.grad.eq(0).all()


def test_rrhf_reward_gets_no_gradient():
    p = torch.randn(2, 3, requires_grad=True)
    r = torch.randn(2, 3, requires_grad=True)
    ops.rrhf_rank_loss(p, r).sum().backward()
    assert r.grad is None and p.grad is not None


# ---- bt_loss --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 7, 4099])
def test_bt_loss_matches_reference(size, dtype):
    chosen, rejected = (torch.randn(size) * 3).to(dtype), (torch.randn(size) * 3).to(dtype)
    margin, smoothing = torch.randn(size).to(dtype), torch.rand(size).to(dtype)
    _compare(ops.bt_loss, reference.bt_loss, [chosen, rejected], differentiable=[0, 1])
    _compare(lambda c, r, m, a: ops.bt_loss(c, r, margin=m, label_smoothing=a),
             lambda c, r, m, a: reference.bt_loss(c, r, margin=m, label_smoothing=a),
             [chosen, rejected, margin, smoothing], differentiable=[0, 1, 2, 3])
    _compare(ops.bt_loss, reference.bt_loss, [chosen, rejected], differentiable=[0, 1],
             kwargs=dict(margin=-0.5, label_smoothing=0.2))


def test_bt_loss_is_stable_at_extreme_deltas():
    chosen = torch.tensor([1e4, -1e4, 0.0, 50.0, -50.0], requires_grad=True)
    rejected = torch.zeros(5)
    loss = ops.bt_loss(chosen, rejected, label_smoothing=0.1)
    delta = chosen.detach().double()
    exact = 0.9 * torch.logaddexp(-delta, torch.zeros(())) + 0.1 * torch.logaddexp(delta,
                                                                                    torch.zeros(()))
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    # dL/d delta = sigmoid(delta) - 0.9: 0.1 at +inf, -0.9 at -inf, -0.4 at 0
    torch.testing.assert_close(chosen.grad, torch.tensor([0.1, -0.9, -0.4, 0.1, -0.9]))
    assert torch.isfinite(ops.bt_loss(chosen, rejected)).all()


def test_bt_loss_scalar_and_tensor_arguments_agree():
    chosen, rejected = torch.randn(50), torch.randn(50)
    for margin in (0.7, -1.3):
        torch.testing.assert_close(ops.bt_loss(chosen, rejected, margin=margin),
                                   ops.bt_loss(chosen, rejected, margin=torch.full((50,), margin)))
        torch.testing.assert_close(ops.bt_loss(chosen, rejected, margin=margin),
                                   ops.bt_loss(chosen, rejected, margin=torch.tensor(margin)))
    torch.testing.assert_close(ops.bt_loss(chosen, rejected, label_smoothing=0.3),
                               ops.bt_loss(chosen, rejected, label_smoothing=torch.full((50,), 0.3)))
    # plain BT is -log sigmoid(delta)
    torch.testing.assert_close(ops.bt_loss(chosen, rejected),
                               -torch.nn.functional.logsigmoid(chosen - rejected))


def test_bt_loss_zero_dim_margin_gets_summed_gradient():
    chosen, rejected = torch.randn(8), torch.randn(8)
    margin = torch.tensor(0.5, requires_grad=True)
    ops.bt_loss(chosen, rejected, margin=margin).sum().backward()
    m64 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    reference.bt_loss(chosen.double(), rejected.double(), margin=m64).sum().backward()
    torch.testing.assert_close(margin.grad.double(), m64.grad, atol=1e-6, rtol=1e-6)


def test_bt_loss_mixed_precisions():
    chosen = torch.randn(5, requires_grad=True)
    rejected = torch.randn(5).bfloat16().requires_grad_()
    loss = ops.bt_loss(chosen, rejected)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert chosen.grad.dtype == torch.float32 and rejected.grad.dtype == torch.bfloat16


# ---- gradcheck, opcheck, compile -------------------------------------------------------------------

def test_gradcheck_float64():
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4, 6) < 0.5
    assert torch.autograd.gradcheck(lambda x: ops.sequence_scores(x, mask, length_penalty=0.8),
                                    (x,))
    scores = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    rewards = torch.randn(4, 5, dtype=torch.float64)
    valid = torch.rand(4, 5) < 0.8
    assert torch.autograd.gradcheck(lambda s: ops.rrhf_rank_loss(s, rewards, valid), (scores,))
    c, r, m = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(3))
    a = (torch.rand(6, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, r, m, a: ops.bt_loss(c, r, margin=m,
                                                                   label_smoothing=a),
                                    (c, r, m, a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    lp = torch.randn(3, 9).to(dtype).requires_grad_()
    mask = torch.rand(3, 9) < 0.6
    torch.library.opcheck(torch.ops.rlengine.sequence_scores.default, (lp, mask, 0.5))
    torch.library.opcheck(torch.ops.rlengine.sequence_scores_backward.default,
                          (torch.randn(3), mask, 0.5, dtype))
    scores = torch.randn(3, 4).to(dtype).requires_grad_()
    rewards, valid = torch.randn(3, 4), torch.rand(3, 4) < 0.7
    torch.library.opcheck(torch.ops.rlengine.rrhf_rank_loss.default, (scores, rewards, valid))
    torch.library.opcheck(torch.ops.rlengine.rrhf_rank_loss.default, (scores, rewards, None))
    torch.library.opcheck(torch.ops.rlengine.rrhf_rank_loss_backward.default,
                          (torch.randn(3), scores.detach(), rewards, valid))
    c, r = torch.randn(5).to(dtype).requires_grad_(), torch.randn(5).to(dtype).requires_grad_()
    m, a = torch.randn(5).to(dtype).requires_grad_(), torch.rand(5).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.rlengine.bt_loss.default, (c, r, m, a, 0.0, 0.0))
    torch.library.opcheck(torch.ops.rlengine.bt_loss.default, (c, r, None, None, 0.3, 0.1))
    torch.library.opcheck(torch.ops.rlengine.bt_loss_backward.default,
                          (torch.randn(5), c.detach(), r.detach(), m.detach(), None, 0.0, 0.2))


def test_compiles_fullgraph():
    def rrhf_and_bt(lp, mask, rewards, chosen, rejected):
        scores = ops.sequence_scores(lp, mask).view(2, 3)
        return ops.rrhf_rank_loss(scores, rewards).sum() + \
            ops.bt_loss(chosen, rejected, margin=0.5, label_smoothing=0.1).mean()

    lp = torch.randn(6, 10, requires_grad=True)
    mask = torch.rand(6, 10) < 0.7
    rewards = torch.randn(2, 3)
    chosen, rejected = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    compiled = torch.compile(rrhf_and_bt, fullgraph=True, backend="aot_eager")
    args = (lp, mask, rewards, chosen, rejected)
    expected, actual = rrhf_and_bt(*args), compiled(*args)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(torch.autograd.grad(actual, (lp, chosen, rejected)),
                               torch.autograd.grad(expected, (lp, chosen, rejected)))


# ---- property tests ---------------------------------------------------------------------------

SPECIALS = st.sampled_from([0.0, 1e4, -1e4, 1e-30, 50.0])


@given(st.data())
def test_property_bt_loss(data):
    size = data.draw(st.integers(0, 40))
    dtype = data.draw(st.sampled_from(DTYPES))
    scale = data.draw(st.sampled_from([0.01, 1.0, 100.0]))
    chosen, rejected = (torch.randn(size, dtype=torch.float64) * scale for _ in range(2))
    for _ in range(data.draw(st.integers(0, 4))):
        if size:
            chosen[data.draw(st.integers(0, size - 1))] = data.draw(SPECIALS)
    margin = data.draw(st.sampled_from([None, 0.5, "tensor"]))
    margin = torch.randn(size, dtype=torch.float64) if margin == "tensor" else margin
    smoothing = data.draw(st.sampled_from([0.0, 0.25, 1.0]))
    tensors = [chosen.to(dtype), rejected.to(dtype)]
    tolerance = 0.0 if dtype == torch.float64 else 1e-6 * max(1.0, float(
        chosen.abs().max() if size else 0.0))
    _compare(ops.bt_loss, reference.bt_loss, tensors, differentiable=[0, 1],
             kwargs=dict(margin=margin, label_smoothing=smoothing), extra_atol=tolerance)


@given(st.data())
def test_property_rrhf_and_scores(data):
    queries, k = data.draw(st.integers(0, 6)), data.draw(st.integers(0, 9))
    dtype = data.draw(st.sampled_from(DTYPES))
    scores = torch.randn(queries, k).to(dtype)
    rewards = torch.randint(0, data.draw(st.integers(1, 5)), (queries, k)).double()
    if queries and k and data.draw(st.booleans()):
        rewards[0, 0] = math.nan
    valid = torch.rand(queries, k) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    _compare(ops.rrhf_rank_loss, reference.rrhf_rank_loss, [scores, rewards, valid],
             differentiable=[0])
    logprobs = (-torch.rand(queries, k + 1) * 10).to(dtype)
    _compare(ops.sequence_scores, reference.sequence_scores,
             [logprobs, torch.rand(queries, k + 1) < 0.5], differentiable=[0],
             kwargs=dict(length_penalty=data.draw(st.sampled_from([0.0, 1.0, 1.7]))))


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, fragment", [
    (lambda: ops.sequence_scores(torch.randn(2, 3), torch.ones(2, 4)), ValueError,
     "sequence_scores: mask must have shape (2, 3)"),
    (lambda: ops.sequence_scores(torch.randn(2, 3), torch.ones(2, 3), length_penalty=-1),
     ValueError, "length_penalty must be >= 0"),
    (lambda: ops.sequence_scores(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)),
     TypeError, "token_logprobs must be float"),
    (lambda: ops.rrhf_rank_loss(torch.randn(6), torch.randn(6)), ValueError,
     "rrhf_rank_loss: scores must be 2-D"),
    (lambda: ops.rrhf_rank_loss(torch.randn(2, 3), torch.randn(2, 4)), ValueError,
     "rewards must have shape (2, 3)"),
    (lambda: ops.rrhf_rank_loss(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3, 2)),
     ValueError, "valid must have shape (2, 3)"),
    (lambda: ops.bt_loss(torch.randn(4), torch.randn(5)), ValueError,
     "bt_loss: rejected must have shape (4,)"),
    (lambda: ops.bt_loss(torch.randn(4), torch.randn(4), label_smoothing=1.5), ValueError,
     "label_smoothing must be <= 1"),
    (lambda: ops.bt_loss(torch.randn(4), torch.randn(4),
                         label_smoothing=torch.tensor([0.1, 0.2, -0.1, 0.3])), ValueError,
     "label_smoothing[2] = -0.1"),
    (lambda: ops.bt_loss(torch.randn(4), torch.randn(4), margin=torch.randn(3)), ValueError,
     "margin must have shape (4,)"),
    (lambda: ops.bt_loss(torch.randn(4), torch.randn(4), margin=math.inf), ValueError,
     "margin must be finite"),
    (lambda: ops.bt_loss(torch.randn(4), torch.randn(4, device="meta")), ValueError,
     "is on meta"),
])
def test_bad_input_raises_named_error(call, error, fragment):
    with pytest.raises(error, match="rlengine.") as info:
        call()
    assert fragment in str(info.value)
