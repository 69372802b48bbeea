"""rlengine.ops.gae and discounted_returns against the float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, assert_matches, to64
from hypothesis import given
from hypothesis import strategies as st

from rlengine import ops
from rlengine.ops import reference


def _mask(shape, density=0.7):
    return torch.rand(shape) < density


def _check_gae(rewards, values, mask, *, gamma, lam, last_values=None):
    """Forward and backward (random incoming gradients for both outputs) equal the float64
    reference within the tolerance of the inputs' dtype."""
    dtype = rewards.dtype
    inputs = [rewards, values] + ([last_values] if last_values is not None else [])
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    leaves64 = [to64(t).requires_grad_() for t in inputs]

    def call(fn, ts):
        lv = ts[2] if last_values is not None else None
        return fn(ts[0], ts[1], mask, gamma=gamma, lam=lam, last_values=lv)

    out = call(ops.gae, leaves)
    ref = call(reference.gae, leaves64)
    # Errors grow with the number of accumulated terms (1 / (1 - gamma*lam) at most T) and
    # their size.
    scale = max(1.0, float(to64(rewards).abs().max() + to64(values).abs().max())) if \
        rewards.numel() else 1.0
    for name, o, r in zip(("advantages", "returns"), out, ref):
        assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches(o, r, dtype, what=name, extra_atol=0 if dtype == torch.float64 else
                       4e-7 * scale * min(rewards.shape[-1], 1 / max(1e-9, 1 - gamma * lam)))
    if rewards.numel() == 0:   # nothing flows back through empty outputs
        return
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in out]
    torch.autograd.backward(list(out), [g.to(o.dtype) for o, g in zip(out, grads)])
    torch.autograd.backward(list(ref), grads)
    for name, leaf, leaf64 in zip(("rewards", "values", "last_values"), leaves, leaves64):
        assert leaf.grad.dtype == leaf.dtype
        assert_matches(leaf.grad, leaf64.grad, dtype, gradient=True, what=f"grad {name}",
                       extra_atol=0 if dtype == torch.float64 else 4e-7 * rewards.shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (5, 31), (17, 257), (64, 2048)])
def test_gae_matches_reference(shape, dtype):
    rewards, values = (torch.randn(shape).to(dtype) for _ in range(2))
    _check_gae(rewards, values, _mask(shape), gamma=0.99, lam=0.95,
               last_values=torch.randn(shape[0]).to(dtype))


@pytest.mark.parametrize("gamma, lam", [(0.0, 0.0), (1.0, 1.0), (1.0, 0.95), (0.95, 0.0),
                                        (0.5, 1.0)])
@pytest.mark.parametrize("with_last", [False, True])
def test_gae_discount_extremes(gamma, lam, with_last):
    rewards, values = torch.randn(6, 40), torch.randn(6, 40)
    _check_gae(rewards, values, _mask((6, 40)), gamma=gamma, lam=lam,
               last_values=torch.randn(6) if with_last else None)


def test_gae_hand_computed_multi_turn_example():
    """Pins the convention: masked positions are skipped, gamma applies once between
    consecutive valid positions, last_values bootstraps after the last valid position."""
    rewards = torch.tensor([[1.0, 100.0, 0.0, 2.0, 100.0]])
    values = torch.tensor([[0.5, 100.0, 0.25, 1.0, 100.0]])
    mask = torch.tensor([[True, False, True, True, False]])
    gamma, lam, last = 0.5, 0.5, torch.tensor([4.0])
    # valid positions 0, 2, 3; after 3 comes last_values = 4
    d3 = 2.0 + 0.5 * 4.0 - 1.0            # 3.0
    d2 = 0.0 + 0.5 * 1.0 - 0.25           # 0.25
    d0 = 1.0 + 0.5 * 0.25 - 0.5           # 0.625
    a3 = d3
    a2 = d2 + 0.25 * a3                   # 1.0
    a0 = d0 + 0.25 * a2                   # 0.875
    adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, last_values=last)
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2, a3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25, a3 + 1.0, 0.0]]))
    g = ops.discounted_returns(rewards, mask, gamma=gamma, last_values=last)
    torch.testing.assert_close(g, torch.tensor([[1.0 + 0.5 * 2.0, 0.0, 2.0, 2.0 + 2.0, 0.0]]))


def test_gae_all_ones_mask_is_textbook_gae():
    rewards, values = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50,
                                                                           dtype=torch.float64)
    adv, _ = ops.gae(rewards, values, torch.ones(4, 50, dtype=torch.bool), gamma=0.9, lam=0.7)
    expected = torch.zeros_like(rewards)
    running = torch.zeros(4, dtype=torch.float64)
    for t in reversed(range(50)):
        next_value = values[:, t + 1] if t + 1 < 50 else 0.0
        running = rewards[:, t] + 0.9 * next_value - values[:, t] + 0.9 * 0.7 * running
        expected[:, t] = running
    torch.testing.assert_close(adv, expected)


def test_masked_positions_are_never_read():
    rewards, values = torch.randn(3, 20), torch.randn(3, 20)
    mask = _mask((3, 20), 0.5)
    mask[1] = False                                       # a fully masked row
    poisoned_r, poisoned_v = rewards.clone(), values.clone()
    poisoned_r[~mask], poisoned_v[~mask] = math.nan, 1e30
    r = poisoned_r.requires_grad_()
    v = poisoned_v.requires_grad_()
    adv, ret = ops.gae(r, v, mask, gamma=0.99, lam=0.95)
    clean_adv, clean_ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert torch.equal(adv, clean_adv) and torch.equal(ret, clean_ret)
    assert adv[~mask].eq(0).all() and ret[~mask].eq(0).all()
    (adv.sum() + ret.sum()).backward()
    assert r.grad[~mask].eq(0).all() and v.grad[~mask].eq(0).all()
    assert torch.isfinite(r.grad).all() and torch.isfinite(v.grad).all()
    returns = ops.discounted_returns(poisoned_r, mask, gamma=0.9)
    assert torch.equal(returns, ops.discounted_returns(rewards, mask, gamma=0.9))


def test_empty_and_single_step():
    adv, ret = ops.gae(torch.zeros(0, 5), torch.zeros(0, 5), torch.ones(0, 5), gamma=1.0, lam=1.0)
    assert adv.shape == (0, 5) and ret.shape == (0, 5)
    adv, ret = ops.gae(torch.zeros(3, 0), torch.zeros(3, 0), torch.ones(3, 0), gamma=1.0, lam=1.0)
    assert adv.shape == (3, 0)
    r, v = torch.tensor([[2.0]]), torch.tensor([[0.5]])
    adv, ret = ops.gae(r, v, torch.ones(1, 1), gamma=0.9, lam=0.9, last_values=torch.tensor([1.0]))
    torch.testing.assert_close(adv, torch.tensor([[2.0 + 0.9 - 0.5]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_discounted_returns_matches_reference_and_gae(dtype):
    rewards = torch.randn(7, 300).to(dtype).requires_grad_()
    last = torch.randn(7).to(dtype).requires_grad_()
    mask = _mask((7, 300))
    out = ops.discounted_returns(rewards, mask, gamma=0.97, last_values=last)
    r64, l64 = to64(rewards).requires_grad_(), to64(last).requires_grad_()
    ref = reference.discounted_returns(r64, mask, gamma=0.97, last_values=l64)
    assert_matches(out, ref, dtype, what="returns",
                   extra_atol=0 if dtype == torch.float64 else 1e-5)
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    assert_matches(rewards.grad, r64.grad, dtype, gradient=True, what="grad rewards",
                   extra_atol=0 if dtype == torch.float64 else 1e-4)
    assert_matches(last.grad, l64.grad, dtype, gradient=True, what="grad last_values",
                   extra_atol=0 if dtype == torch.float64 else 1e-4)
    _, gae_returns = ops.gae(rewards.detach(), torch.zeros_like(rewards.detach()), mask,
                             gamma=0.97, lam=1.0, last_values=last.detach())
    torch.testing.assert_close(out.detach(), gae_returns, atol=1e-5, rtol=1e-5)


def test_long_rows_float64():
    rewards, values = torch.randn(2, 10000, dtype=torch.float64), torch.randn(2, 10000,
                                                                              dtype=torch.float64)
    _check_gae(rewards, values, _mask((2, 10000), 0.9), gamma=1.0, lam=0.95)


def test_mixed_precision_inputs_promote():
    rewards = torch.randn(3, 9, requires_grad=True)
    values = torch.randn(3, 9).bfloat16().requires_grad_()
    adv, _ = ops.gae(rewards, values, torch.ones(3, 9), gamma=0.9, lam=0.9)
    assert adv.dtype == torch.float32
    adv.sum().backward()
    assert rewards.grad.dtype == torch.float32 and values.grad.dtype == torch.bfloat16


def test_strided_inputs_and_numeric_mask():
    wide_r, wide_v = torch.randn(4, 30), torch.randn(4, 30)
    r, v = wide_r[:, ::2], wide_v[:, 1::2]
    mask = (torch.rand(4, 15) < 0.7).float()
    _check_gae(r, v, mask.bool(), gamma=0.95, lam=0.9)
    torch.testing.assert_close(ops.gae(r, v, mask, gamma=0.95, lam=0.9),
                               ops.gae(r.contiguous(), v.contiguous(), mask.bool(), gamma=0.95,
                                       lam=0.9))


def test_gradcheck_float64():
    r = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    last = torch.randn(3, dtype=torch.float64, requires_grad=True)
    mask = _mask((3, 8), 0.6)
    assert torch.autograd.gradcheck(
        lambda r, v, l: ops.gae(r, v, mask, gamma=0.9, lam=0.8, last_values=l), (r, v, last))
    assert torch.autograd.gradcheck(
        lambda r, l: ops.discounted_returns(r, mask, gamma=0.9, last_values=l), (r, last))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    r = torch.randn(3, 11).to(dtype).requires_grad_()
    v = torch.randn(3, 11).to(dtype).requires_grad_()
    last = torch.randn(3).to(dtype).requires_grad_()
    mask = _mask((3, 11))
    torch.library.opcheck(torch.ops.rlengine.gae.default, (r, v, mask, last, 0.99, 0.95))
    torch.library.opcheck(torch.ops.rlengine.gae.default, (r, v, mask, None, 1.0, 0.5))
    torch.library.opcheck(torch.ops.rlengine.discounted_returns.default, (r, mask, last, 0.9))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(3, 11, dtype=acc)
    torch.library.opcheck(torch.ops.rlengine.gae_backward.default, (g, g, mask, 0.9, 0.9))
    torch.library.opcheck(torch.ops.rlengine.gae_backward.default, (None, g, mask, 0.9, 0.9))
    torch.library.opcheck(torch.ops.rlengine.discounted_returns_backward.default, (g, mask, 0.9))


def test_compiles_fullgraph():
    def loss(r, v, m):
        adv, ret = ops.gae(r, v, m, gamma=0.99, lam=0.95)
        return (adv * 2).sum() + ret.square().sum() + ops.discounted_returns(r, m,
                                                                            gamma=0.9).sum()

    r, v = torch.randn(3, 12, requires_grad=True), torch.randn(3, 12, requires_grad=True)
    m = _mask((3, 12))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    expected, actual = loss(r, v, m), compiled(r, v, m)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(torch.autograd.grad(actual, (r, v)),
                               torch.autograd.grad(expected, (r, v)))


# ---- property tests ---------------------------------------------------------------------------

@st.composite
def gae_cases(draw):
    batch, steps = draw(st.integers(0, 5)), draw(st.integers(0, 60))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    rewards = (torch.randn(batch, steps, dtype=torch.float64) * scale).to(dtype)
    values = (torch.randn(batch, steps, dtype=torch.float64) * scale).to(dtype)
    mask = _mask((batch, steps), draw(st.sampled_from([0.0, 0.3, 0.9, 1.0])))
    gamma = draw(st.sampled_from([0.0, 0.5, 0.99, 1.0]))
    lam = draw(st.sampled_from([0.0, 0.95, 1.0]))
    last = (torch.randn(batch) * scale).to(dtype) if draw(st.booleans()) else None
    if draw(st.booleans()) and steps > 1:                  # strided layout
        rewards = torch.cat([rewards, rewards], dim=1)[:, ::2]
    return rewards, values, mask, gamma, lam, last


@given(gae_cases())
def test_property_matches_reference(case):
    rewards, values, mask, gamma, lam, last = case
    _check_gae(rewards, values, mask, gamma=gamma, lam=lam, last_values=last)


# ---- bad input --------------------------------------------------------------------------------

def _good():
    return dict(rewards=torch.randn(2, 5), values=torch.randn(2, 5), mask=torch.ones(2, 5),
                gamma=0.9, lam=0.9)


@pytest.mark.parametrize("change, error, fragment", [
    (dict(gamma=1.5), ValueError, "gamma must be <= 1"),
    (dict(gamma=-0.1), ValueError, "gamma must be >= 0"),
    (dict(lam=math.nan), ValueError, "lam must be finite"),
    (dict(gamma="0.9"), TypeError, "gamma must be a real number"),
    (dict(values=torch.randn(2, 6)), ValueError, "values must have shape (2, 5)"),
    (dict(mask=torch.ones(5, 2)), ValueError, "mask must have shape (2, 5)"),
    (dict(rewards=torch.randn(10)), ValueError, "rewards must be 2-D"),
    (dict(rewards=torch.ones(2, 5, dtype=torch.long)), TypeError, "rewards must be float"),
    (dict(last_values=torch.randn(3)), ValueError, "last_values must have shape (2,)"),
    (dict(values=torch.randn(2, 5, device="meta")), ValueError, "is on meta"),
])
def test_bad_input_raises_named_error(change, error, fragment):
    args = {**_good(), **change}
    with pytest.raises(error, match="rlengine.gae") as info:
        ops.gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)
    assert fragment in str(info.value)


def test_discounted_returns_bad_input():
    with pytest.raises(ValueError, match="rlengine.discounted_returns: gamma"):
        ops.discounted_returns(torch.randn(2, 3), torch.ones(2, 3), gamma=2.0)
    with pytest.raises(ValueError, match="rlengine.discounted_returns: mask"):
        ops.discounted_returns(torch.randn(2, 3), torch.ones(3), gamma=0.5)
