"""rlengine.ops.gae and discounted_returns against reference.gae / reference.discounted_returns
evaluated in float64."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPES,
    FP32_EPS,
    assert_compiles_fullgraph,
    assert_matches,
    incoming_gradient,
    noncontiguous,
    to64,
)
from hypothesis import given
from hypothesis import strategies as st

from rlengine import ops
from rlengine.ops import reference

# gae.cpp cuts a row into time blocks of at least this many steps (kMinBlockSteps), and only
# into 3 or more of them (kMinTimeBlocks), when there are fewer rows than threads.
MIN_BLOCK_STEPS = 16384

MASK_KINDS = ("turns", "random", "all", "none_rows")


def _mask(batch: int, steps: int, kind: str = "turns") -> torch.Tensor:
    """Masks as RL batches have them. "turns": per row a prompt prefix, then 1-4 separate valid
    spans (assistant turns) with masked tool output between them, then right padding;
    "random": independent positions; "all": every position; "none_rows": turns, with every
    other row fully masked."""
    if kind == "all":
        return torch.ones(batch, steps, dtype=torch.bool)
    if kind == "random":
        return torch.rand(batch, steps) < 0.7
    mask = torch.zeros(batch, steps, dtype=torch.bool)
    for b in range(batch):
        if steps == 0:
            break
        turns = int(torch.randint(1, 5, ()))
        cuts = sorted(torch.randint(0, steps + 1, (2 * turns,)).tolist())
        for start, end in zip(cuts[::2], cuts[1::2]):
            mask[b, start:end] = True
    if kind == "none_rows":
        mask[::2] = False
    return mask


def _inputs(batch, steps, dtype=torch.float32, *, with_last=True, scale=1.0):
    rewards = (torch.randn(batch, steps, dtype=torch.float64) * scale).to(dtype)
    values = (torch.randn(batch, steps, dtype=torch.float64) * scale).to(dtype)
    last = (torch.randn(batch, dtype=torch.float64) * scale).to(dtype) if with_last else None
    return rewards, values, last


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _out_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def _reference_grad(outputs, inputs, grads):
    if outputs[0].shape[-1] == 0:  # no time step: the reference builds no graph; all zeros
        return [torch.zeros_like(x) for x in inputs]
    return torch.autograd.grad(outputs, inputs, grads)


def _check_gae(rewards, values, mask, *, gamma, lam, last_values=None):
    """Kernel forward and backward (random incoming gradients for both outputs) equal the
    float64 reference's within the tolerance of the input dtype; returns the kernel's outputs.
    The kernel carries the recurrence in float64 and rounds each result once, so the dtype's
    relative tolerance covers rows of any length."""
    dtype = rewards.dtype
    r, v, lv = _leaf(rewards), _leaf(values), _leaf(last_values)
    r64, v64, lv64 = _leaf(to64(rewards)), _leaf(to64(values)), _leaf(to64(last_values))
    adv, ret = ops.gae(r, v, mask, gamma=gamma, lam=lam, last_values=lv)
    ref_adv, ref_ret = reference.gae(r64, v64, mask, gamma=gamma, lam=lam, last_values=lv64)
    out_dtype = _out_dtype(rewards, values, last_values)
    assert adv.dtype == out_dtype and ret.dtype == out_dtype
    assert_matches(adv, ref_adv, dtype, what="advantages", )
    assert_matches(ret, ref_ret, dtype, what="returns", )

    grads = [incoming_gradient(adv), incoming_gradient(ret)]
    inputs = [t for t in (r, v, lv) if t is not None]
    inputs64 = [t for t in (r64, v64, lv64) if t is not None]
    got = torch.autograd.grad((adv, ret), inputs, [g.to(out_dtype) for g in grads])
    expected = _reference_grad((ref_adv, ref_ret), inputs64, grads)
    for name, g, e, x in zip(("rewards", "values", "last_values"), got, expected, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_matches(g, e, x.dtype, gradient=True, what=f"grad {name}")
    return adv, ret


def _check_returns(rewards, mask, *, gamma, last_values=None):
    dtype = rewards.dtype
    r, lv = _leaf(rewards), _leaf(last_values)
    r64, lv64 = _leaf(to64(rewards)), _leaf(to64(last_values))
    out = ops.discounted_returns(r, mask, gamma=gamma, last_values=lv)
    ref = reference.discounted_returns(r64, mask, gamma=gamma, last_values=lv64)
    assert out.dtype == _out_dtype(rewards, last_values)
    assert_matches(out, ref, dtype, what="returns", )
    grad = incoming_gradient(out)
    inputs = [t for t in (r, lv) if t is not None]
    inputs64 = [t for t in (r64, lv64) if t is not None]
    got = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    expected = _reference_grad((ref,), inputs64, (grad,))
    for name, g, e, x in zip(("rewards", "last_values"), got, expected, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_matches(g, e, x.dtype, gradient=True, what=f"grad {name}")
    return out


def _two_pass_slack(*results):
    """The time-blocked scan rounds an fp32 result twice: its block-local value (which can be
    larger than the result) and then the result."""
    return 8 * FP32_EPS * max(float(t.abs().max()) if t.numel() else 0.0 for t in results)


# ---- the convention, pinned by hand -----------------------------------------------------------

# One row, valid positions 0, 2 and 3 (1 and 4 masked, holding garbage), gamma = lam = 0.5:
#   t=3: delta = 3 + 0.5 * 4 - 2 = 3        A = 3                        R = 3 + 2   = 5
#   t=2: delta = 2 + 0.5 * 2 - 1 = 2        A = 2 + 0.25 * 3    = 2.75   R = 2.75 + 1 = 3.75
#   t=0: delta = 1 + 0.5 * 1 - 0.5 = 1      A = 1 + 0.25 * 2.75 = 1.6875 R = 1.6875 + 0.5
# (position 1 is not a step: t=0 discounts V_2 and A_2 once). Without last_values delta_3 = 1.
HAND_REWARDS = [[1.0, 100.0, 2.0, 3.0, -100.0]]
HAND_VALUES = [[0.5, math.nan, 1.0, 2.0, math.inf]]
HAND_MASK = [[True, False, True, True, False]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_computed_example(dtype):
    r = torch.tensor(HAND_REWARDS, dtype=dtype, requires_grad=True)
    v = torch.tensor(HAND_VALUES, dtype=dtype, requires_grad=True)
    lv = torch.tensor([4.0], dtype=dtype, requires_grad=True)
    mask = torch.tensor(HAND_MASK)
    adv, ret = ops.gae(r, v, mask, gamma=0.5, lam=0.5, last_values=lv)
    assert adv.tolist() == [[1.6875, 0.0, 2.75, 3.0, 0.0]]
    assert ret.tolist() == [[2.1875, 0.0, 3.75, 5.0, 0.0]]
    # d(sum A)/d delta at t = 0, 2, 3 is 1, 1 + 0.25, 1 + 0.25 + 0.0625; V_2 enters delta_0
    # (+0.5) and delta_2 (-1), V_3 enters delta_2 (+0.5) and delta_3 (-1), last_values delta_3.
    adv.sum().backward()
    assert r.grad.tolist() == [[1.0, 0.0, 1.25, 1.3125, 0.0]]
    assert v.grad.tolist() == [[-1.0, 0.0, 0.5 - 1.25, 0.5 * 1.25 - 1.3125, 0.0]]
    assert lv.grad.tolist() == [0.5 * 1.3125]

    adv, ret = ops.gae(r, v, mask, gamma=0.5, lam=0.5)
    assert adv.tolist() == [[1.5625, 0.0, 2.25, 1.0, 0.0]]
    assert ret.tolist() == [[2.0625, 0.0, 3.25, 3.0, 0.0]]

    # G_3 = 3 + 0.5 * 4 = 5, G_2 = 2 + 0.5 * 5 = 4.5, G_0 = 1 + 0.5 * 4.5 = 3.25
    g = ops.discounted_returns(r, mask, gamma=0.5, last_values=lv)
    assert g.tolist() == [[3.25, 0.0, 4.5, 5.0, 0.0]]
    r.grad = lv.grad = None
    g.sum().backward()
    assert r.grad.tolist() == [[1.0, 0.0, 1.5, 1.75, 0.0]]
    assert lv.grad.tolist() == [0.5 * 1.75]


def test_masked_positions_are_not_time_steps():
    """The same valid data with masked positions inserted gives the same results there: a
    hole between two turns neither discounts nor adds anything."""
    rewards, values, last = _inputs(3, 20, torch.float64)
    mask = torch.ones(3, 20, dtype=torch.bool)
    adv, ret = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8, last_values=last)
    holes = torch.tensor([0, 1, 0, 0, 1, 1, 1] + [0] * 10 + [1] * 5 + [0] * 7 + [1] * 4,
                         dtype=torch.bool)
    wide = torch.zeros(3, holes.numel(), dtype=torch.bool)
    wide[:, ~holes] = True
    wr = torch.full((3, holes.numel()), 7.0, dtype=torch.float64)
    wv = torch.full((3, holes.numel()), -3.0, dtype=torch.float64)
    wr[:, ~holes], wv[:, ~holes] = rewards, values
    wadv, wret = ops.gae(wr, wv, wide, gamma=0.9, lam=0.8, last_values=last)
    torch.testing.assert_close(wadv[:, ~holes], adv, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(wret[:, ~holes], ret, rtol=1e-13, atol=1e-13)
    assert wadv[:, holes].eq(0).all() and wret[:, holes].eq(0).all()
    wg = ops.discounted_returns(wr, wide, gamma=0.9, last_values=last)
    g = ops.discounted_returns(rewards, mask, gamma=0.9, last_values=last)
    torch.testing.assert_close(wg[:, ~holes], g, rtol=1e-13, atol=1e-13)


# ---- against the reference --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (5, 31), (17, 257), (2, 1031)])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_matches_reference(shape, dtype, kind):
    rewards, values, last = _inputs(*shape, dtype, with_last=shape[0] != 3)
    mask = _mask(*shape, kind)
    adv, ret = _check_gae(rewards, values, mask, gamma=0.99, lam=0.95, last_values=last)
    _check_returns(rewards, mask, gamma=0.97, last_values=last)
    assert adv[~mask].eq(0).all() and ret[~mask].eq(0).all()


@pytest.mark.parametrize("gamma", [0.0, 1.0, 0.95])
@pytest.mark.parametrize("lam", [0.0, 1.0, 0.95])
def test_gamma_lam_corners(gamma, lam):
    for with_last in (False, True):
        rewards, values, last = _inputs(6, 83, torch.float32, with_last=with_last)
        mask = _mask(6, 83, "turns")
        _check_gae(rewards, values, mask, gamma=gamma, lam=lam, last_values=last)
        _check_returns(rewards, mask, gamma=gamma, last_values=last)


def test_gamma_zero_is_one_step():
    """gamma = 0: A = r - V at every valid position, whatever lam and last_values."""
    rewards, values, last = _inputs(4, 50, torch.float64)
    mask = _mask(4, 50, "random")
    adv, ret = ops.gae(rewards, values, mask, gamma=0.0, lam=0.7, last_values=last)
    torch.testing.assert_close(adv, torch.where(mask, rewards - values, 0.0))
    torch.testing.assert_close(ret, torch.where(mask, rewards, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_rows(dtype):
    """T = 10000 with gamma = lam = 1 (returns are sums over thousands of steps) and with
    gamma * lam < 1, in float64 and float32 against the float64 reference."""
    steps = 10000
    rewards, values, last = _inputs(2, steps, dtype)
    mask = _mask(2, steps, "turns")
    mask[0, :9000] = True
    with torch.no_grad():
        for gamma, lam in ((1.0, 1.0), (0.999, 0.95)):
            adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, last_values=last)
            ref_adv, ref_ret = reference.gae(to64(rewards), to64(values), mask, gamma=gamma,
                                             lam=lam, last_values=to64(last))
            # The kernel carries the scan in float64: fp32 results are rounded once, at the end.
            assert_matches(adv, ref_adv, dtype, what="advantages")
            assert_matches(ret, ref_ret, dtype, what="returns")
    # ... and its gradients too (one reference backward, through 10000 steps).
    _check_gae(rewards, values, mask, gamma=1.0, lam=1.0, last_values=last)


def _blocked_case(batch, threads, dtype, gamma, lam):
    """Results with `threads` threads (rows cut into 3 time blocks) and with one thread."""
    steps = 3 * MIN_BLOCK_STEPS + 1000
    rewards, values, last = _inputs(batch, steps, dtype)
    mask = _mask(batch, steps, "turns")
    mask[0] = torch.rand(steps) < 0.9
    mask[0, MIN_BLOCK_STEPS - 10: 2 * MIN_BLOCK_STEPS + 400] = False  # a fully masked block
    if batch > 1:
        mask[1] = False
        mask[1, 100:200] = True  # valid only in the first block
    grads = [torch.randn(batch, steps, dtype=dtype) for _ in range(2)]
    out = {}
    previous = torch.get_num_threads()
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            out[n] = (*ops.gae(rewards, values, mask, gamma=gamma, lam=lam, last_values=last),
                      *torch.ops.rlengine.gae_backward(*grads, mask, gamma, lam),
                      ops.discounted_returns(rewards, mask, gamma=gamma, last_values=last),
                      *torch.ops.rlengine.discounted_returns_backward(grads[0], mask, gamma))
    finally:
        torch.set_num_threads(previous)
    return out[1], out[threads]


@pytest.mark.parametrize("batch, threads", [(1, 4), (3, 8)])
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.999, 0.95)])
def test_time_blocked_scan(batch, threads, gamma, lam):
    """With fewer rows than threads, long rows are scanned in time blocks (two passes); the
    results equal the one-thread sequential scan's (validated against the reference above)."""
    sequential, blocked = _blocked_case(batch, threads, torch.float64, gamma, lam)
    for s, b in zip(sequential, blocked):
        # Both scans round in float64 along 50000 steps of results of size ~100; a wrong carry
        # would be off by O(1).
        torch.testing.assert_close(b, s, rtol=1e-10, atol=1e-9)
    sequential, blocked = _blocked_case(batch, threads, torch.float32, gamma, lam)
    for s, b in zip(sequential, blocked):
        assert_matches(b, to64(s), torch.float32, extra_atol=_two_pass_slack(s))
    # The two-pass fp32 results are rounded twice (block-local result, then the carry added),
    # so some differ from the one-pass results in the last bit: the blocked path did run.
    assert not torch.equal(blocked[0], sequential[0])


# ---- masked and degenerate inputs -------------------------------------------------------------

@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf, 3e38])
def test_masked_values_never_matter(garbage):
    """Rewards and values at masked positions (and incoming gradients there) change neither
    the results nor the gradients, which are exactly 0 at masked positions."""
    rewards, values, last = _inputs(5, 40, torch.float32)
    mask = _mask(5, 40, "none_rows")
    mask[1] = _mask(1, 40, "random")[0]
    clean_r = torch.where(mask, rewards, 0.0)
    clean_v = torch.where(mask, values, 0.0)
    dirty_r = torch.where(mask, rewards, garbage)
    dirty_v = torch.where(mask, values, -garbage)
    ga, gr = torch.randn(5, 40), torch.randn(5, 40)
    results = []
    for r_in, v_in, g_fill in ((clean_r, clean_v, 0.0), (dirty_r, dirty_v, garbage)):
        r, v, lv = _leaf(r_in), _leaf(v_in), _leaf(last)
        adv, ret = ops.gae(r, v, mask, gamma=0.95, lam=0.9, last_values=lv)
        g = ops.discounted_returns(r, mask, gamma=0.95, last_values=lv)
        grads = torch.autograd.grad(
            (adv, ret, g), (r, v, lv),
            [torch.where(mask, x, g_fill) for x in (ga, gr, ga)])
        results.append((adv, ret, g, *grads))
    for clean, dirty in zip(*results):
        assert torch.equal(clean, dirty)
    adv, ret, g, grad_r, grad_v, _ = results[1]
    for t in (adv, ret, g, grad_r, grad_v):
        assert torch.isfinite(t).all() and t[~mask].eq(0).all()
    assert grad_r[mask].ne(0).all() and grad_v[mask].ne(0).all()


def test_fully_masked_rows():
    rewards, values, last = _inputs(4, 9, torch.float32)
    rewards[1] = math.nan
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1] = mask[3] = False
    r, v, lv = _leaf(rewards), _leaf(values), _leaf(last)
    adv, ret = ops.gae(r, v, mask, gamma=1.0, lam=0.95, last_values=lv)
    g = ops.discounted_returns(r, mask, gamma=1.0, last_values=lv)
    for t in (adv, ret, g):
        assert t[[1, 3]].eq(0).all() and t[[0, 2]].ne(0).all()
    (adv.sum() + ret.sum() + g.sum()).backward()
    assert r.grad[[1, 3]].eq(0).all() and v.grad[[1, 3]].eq(0).all()
    assert lv.grad[[1, 3]].eq(0).all() and lv.grad[[0, 2]].ne(0).all()


def test_single_step_rows():
    rewards, values, last = _inputs(6, 1, torch.float64)
    mask = torch.tensor([[True], [False], [True], [True], [False], [True]])
    adv, ret = ops.gae(rewards, values, mask, gamma=0.9, lam=0.5, last_values=last)
    expected = torch.where(mask, rewards + 0.9 * last[:, None] - values, 0.0)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.where(mask, expected + values, 0.0))
    _check_gae(rewards, values, mask, gamma=0.9, lam=0.5, last_values=last)
    _check_returns(rewards, mask, gamma=0.9, last_values=last)


@pytest.mark.parametrize("shape", [(0, 5), (0, 0), (3, 0)])
def test_empty(shape):
    rewards, values, last = _inputs(*shape, torch.float32)
    r, v, lv = _leaf(rewards), _leaf(values), _leaf(last)
    mask = torch.ones(shape, dtype=torch.bool)
    adv, ret = ops.gae(r, v, mask, gamma=0.9, lam=0.9, last_values=lv)
    g = ops.discounted_returns(r, mask, gamma=0.9, last_values=lv)
    assert adv.shape == ret.shape == g.shape == shape
    (adv.sum() + ret.sum() + g.sum()).backward()
    assert r.grad.shape == v.grad.shape == shape and lv.grad.shape == shape[:1]
    assert lv.grad.eq(0).all()


def test_last_values_none_is_zero_bootstrap():
    rewards, values, _ = _inputs(5, 30, torch.float32)
    mask = _mask(5, 30)
    r, v = _leaf(rewards), _leaf(values)
    adv, ret = ops.gae(r, v, mask, gamma=0.9, lam=0.8)
    zero = torch.zeros(5, requires_grad=True)
    adv0, ret0 = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8, last_values=zero)
    assert torch.equal(adv, adv0) and torch.equal(ret, ret0)
    assert torch.equal(ops.discounted_returns(rewards, mask, gamma=0.9),
                       ops.discounted_returns(rewards, mask, gamma=0.9, last_values=zero))
    # A bootstrap value changes every row that has a valid position (gamma > 0).
    adv1, _ = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8, last_values=torch.ones(5))
    has_valid = mask.any(-1)
    assert (adv1 - adv).abs().sum(-1)[has_valid].gt(0).all()
    # Without last_values there is no gradient slot for it; with it, there is.
    adv.sum().backward()
    assert r.grad is not None and v.grad is not None
    (adv0.sum() + ret0.sum()).backward()
    assert zero.grad is not None and zero.grad[has_valid].ne(0).all()


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_discounted_returns_is_gae_with_lam_one(gamma):
    rewards, _, last = _inputs(7, 60, torch.float64)
    mask = _mask(7, 60, "none_rows")
    for lv in (None, last):
        r, lv1 = _leaf(rewards), _leaf(lv)
        r2, lv2 = _leaf(rewards), _leaf(lv)
        g = ops.discounted_returns(r, mask, gamma=gamma, last_values=lv1)
        _, ret = ops.gae(r2, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0,
                         last_values=lv2)
        torch.testing.assert_close(g, ret, rtol=1e-14, atol=1e-14)
        weight = torch.randn(7, 60, dtype=torch.float64)
        (g * weight).sum().backward()
        (ret * weight).sum().backward()
        torch.testing.assert_close(r.grad, r2.grad, rtol=1e-14, atol=1e-14)
        if lv is not None:
            torch.testing.assert_close(lv1.grad, lv2.grad, rtol=1e-14, atol=1e-14)


# ---- layouts and dtypes -----------------------------------------------------------------------

def test_noncontiguous_inputs_and_expanded_gradients():
    rewards, values, last = _inputs(6, 45, torch.float32)
    mask = _mask(6, 45, "random")
    r_nc = noncontiguous(rewards)
    v_t = values.t().contiguous().t()                       # column-major
    lv_nc = torch.stack([last, last], -1)[:, 0]             # stride 2
    m_nc = noncontiguous(mask)
    assert not (r_nc.is_contiguous() or v_t.is_contiguous() or lv_nc.is_contiguous()
                or m_nc.is_contiguous())
    _check_gae(r_nc, v_t, m_nc, gamma=0.97, lam=0.9, last_values=lv_nc)
    _check_returns(r_nc, m_nc, gamma=0.97, last_values=lv_nc)
    # values[:, :-1] of a [B, T + 1] critic output, read in place.
    full = torch.randn(6, 46)
    _check_gae(rewards, full[:, :-1], mask, gamma=0.97, lam=0.9)
    # .sum() gives incoming gradients expanded from a scalar (strides 0).
    r, v = _leaf(rewards), _leaf(values)
    adv, ret = ops.gae(r, v, mask, gamma=0.97, lam=0.9)
    (adv.sum() + 2 * ret.sum()).backward()
    r64, v64 = _leaf(to64(rewards)), _leaf(to64(values))
    ref_adv, ref_ret = reference.gae(r64, v64, mask, gamma=0.97, lam=0.9)
    (ref_adv.sum() + 2 * ref_ret.sum()).backward()
    assert_matches(r.grad, r64.grad, torch.float32, gradient=True)
    assert_matches(v.grad, v64.grad, torch.float32, gradient=True)


def test_mixed_dtypes_are_promoted():
    rewards, _, _ = _inputs(4, 25, torch.float32)
    values = torch.randn(4, 25).bfloat16()
    last = torch.randn(4).half()
    mask = _mask(4, 25)
    adv, ret = _check_gae(rewards, values, mask, gamma=0.95, lam=0.9, last_values=last)
    assert adv.dtype == torch.float32
    out = _check_returns(rewards.bfloat16(), mask, gamma=0.95, last_values=last.double())
    assert out.dtype == torch.float64


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.uint8, torch.float32])
def test_numeric_masks(mask_dtype):
    rewards, values, last = _inputs(3, 17, torch.float32)
    mask = _mask(3, 17, "random")
    numeric = (mask.to(mask_dtype) * 3)
    for a, b in zip(ops.gae(rewards, values, numeric, gamma=0.9, lam=0.9, last_values=last),
                    ops.gae(rewards, values, mask, gamma=0.9, lam=0.9, last_values=last)):
        assert torch.equal(a, b)
    assert torch.equal(ops.discounted_returns(rewards, numeric, gamma=0.9),
                       ops.discounted_returns(rewards, mask, gamma=0.9))


# ---- autograd, opcheck, compile ---------------------------------------------------------------

def test_gradcheck_float64():
    rewards, values, last = _inputs(3, 11, torch.float64)
    mask = _mask(3, 11, "turns")
    mask[1] = False
    r, v, lv = _leaf(rewards), _leaf(values), _leaf(last)
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.gae(a, b, mask, gamma=0.9, lam=0.8, last_values=c), (r, v, lv))
    assert torch.autograd.gradcheck(lambda a, b: ops.gae(a, b, mask, gamma=1.0, lam=1.0), (r, v))
    assert torch.autograd.gradcheck(
        lambda a, c: ops.discounted_returns(a, mask, gamma=0.9, last_values=c), (r, lv))
    assert torch.autograd.gradcheck(lambda a: ops.discounted_returns(a, mask, gamma=0.5), (r,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_last", [False, True])
def test_opcheck(dtype, with_last):
    rewards, values, last = _inputs(3, 13, dtype, with_last=with_last)
    mask = _mask(3, 13, "turns")
    leaves = [_leaf(t) for t in (rewards, values, last)]
    torch.library.opcheck(torch.ops.rlengine.gae.default,
                          (leaves[0], leaves[1], mask, leaves[2], 0.95, 0.9))
    torch.library.opcheck(torch.ops.rlengine.discounted_returns.default,
                          (leaves[0], mask, leaves[2], 0.95))
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ga, gr = torch.randn(3, 13, dtype=out_dtype), torch.randn(3, 13, dtype=out_dtype)
    op = torch.ops.rlengine.gae_backward.default
    torch.library.opcheck(op, (ga, gr, mask, 0.95, 0.9))
    one_gradient = (None, gr) if with_last else (ga, None)
    torch.library.opcheck(op, (*one_gradient, mask, 0.95, 0.9))
    torch.library.opcheck(torch.ops.rlengine.discounted_returns_backward.default,
                          (ga, mask, 0.95))


def test_compiles_fullgraph():
    def loss(r, v, m, lv):
        adv, ret = ops.gae(r, v, m, gamma=0.99, lam=0.95, last_values=lv)
        g = ops.discounted_returns(r, m, gamma=0.9)
        return (adv * 2).sum() + (ret ** 2).sum() + (g * 0.5).sum()

    r, v, lv = (_leaf(t) for t in _inputs(3, 21, torch.float32))
    assert_compiles_fullgraph(loss, r, v, _mask(3, 21), lv, wrt=(r, v, lv))


# ---- property tests: fresh adversarial inputs ---------------------------------------------------

@st.composite
def gae_cases(draw):
    batch = draw(st.integers(0, 5))
    steps = draw(st.integers(0, 40))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(MASK_KINDS))
    gamma = draw(st.sampled_from([0.0, 0.5, 0.95, 0.99, 1.0]))
    lam = draw(st.sampled_from([0.0, 0.5, 0.95, 1.0]))
    scale = draw(st.sampled_from([0.01, 1.0, 100.0]))
    rewards, values, last = _inputs(batch, steps, dtype, with_last=draw(st.booleans()),
                                    scale=scale)
    mask = _mask(batch, steps, kind)
    garbage = draw(st.sampled_from([0.0, math.nan, math.inf, 1e4]))
    rewards = torch.where(mask, rewards, torch.tensor(garbage, dtype=dtype))
    values = torch.where(mask, values, torch.tensor(-garbage, dtype=dtype))
    return rewards, values, mask, last, gamma, lam


@given(gae_cases())
def test_property_matches_reference(case):
    rewards, values, mask, last, gamma, lam = case
    _check_gae(rewards, values, mask, gamma=gamma, lam=lam, last_values=last)
    _check_returns(rewards, mask, gamma=gamma, last_values=last)


# ---- bad input ----------------------------------------------------------------------------------

def _good():
    return dict(rewards=torch.randn(4, 6), values=torch.randn(4, 6),
                mask=torch.ones(4, 6, dtype=torch.bool), last_values=torch.randn(4))


@pytest.mark.parametrize("change, error, fragment", [
    (dict(rewards=torch.randn(6)), ValueError, "rewards must be 2-D"),
    (dict(rewards=torch.randn(2, 4, 6)), ValueError, "rewards must be 2-D"),
    (dict(values=torch.randn(4, 7)), ValueError, "values must have shape (4, 6)"),
    (dict(mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "mask must have shape (4, 6)"),
    (dict(rewards=torch.ones(4, 6, dtype=torch.long)), TypeError, "rewards must be float"),
    (dict(values=torch.ones(4, 6, dtype=torch.int32)), TypeError, "values must be float"),
    (dict(mask=torch.ones(4, 6, dtype=torch.complex64)), TypeError, "mask must be a bool or real"),
    (dict(last_values=torch.randn(5)), ValueError, "last_values must have shape (4,)"),
    (dict(last_values=torch.randn(4, 1)), ValueError, "last_values must be 1-D"),
    (dict(last_values=torch.ones(4, dtype=torch.long)), TypeError, "last_values must be float"),
    (dict(rewards=[[0.0] * 6] * 4), TypeError, "rewards must be a torch.Tensor"),
    (dict(mask=[[True] * 6] * 4), TypeError, "mask must be a torch.Tensor"),
    (dict(values=torch.randn(4, 6, device="meta")), ValueError, "values is on meta"),
])
def test_bad_input_raises_named_error(change, error, fragment):
    args = {**_good(), **change}
    with pytest.raises(error, match="rlengine.gae") as info:
        ops.gae(args["rewards"], args["values"], args["mask"], gamma=0.9, lam=0.9,
                last_values=args["last_values"])
    assert fragment in str(info.value)
    if "values" not in fragment or "last_values" in fragment:
        with pytest.raises(error, match="rlengine.discounted_returns") as info:
            ops.discounted_returns(args["rewards"], args["mask"], gamma=0.9,
                                   last_values=args["last_values"])
        assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["gamma", "lam"])
@pytest.mark.parametrize("value, error", [
    (-0.1, ValueError), (1.0001, ValueError), (math.nan, ValueError), (math.inf, ValueError),
    ("0.9", TypeError), (True, TypeError), (torch.tensor(0.9), TypeError), (None, TypeError),
])
def test_bad_gamma_lam(name, value, error):
    args = _good()
    kwargs = {"gamma": 0.9, "lam": 0.9, name: value}
    with pytest.raises(error, match=f"rlengine.gae: {name}"):
        ops.gae(args["rewards"], args["values"], args["mask"], **kwargs)
    if name == "gamma":
        with pytest.raises(error, match="rlengine.discounted_returns: gamma"):
            ops.discounted_returns(args["rewards"], args["mask"], gamma=value)


def test_gamma_lam_bounds_are_inclusive():
    a = _good()
    for gamma, lam in ((0, 0), (1, 1), (0.0, 1.0), (1, 0)):
        adv, ret = ops.gae(a["rewards"], a["values"], a["mask"], gamma=gamma, lam=lam)
        ref_adv, ref_ret = reference.gae(a["rewards"], a["values"], a["mask"], gamma=gamma,
                                         lam=lam)
        torch.testing.assert_close(adv, ref_adv)
        torch.testing.assert_close(ret, ref_ret)


def _gae_op(a, values=None, mask=None, last_values=None, gamma=0.9, lam=0.9):
    return torch.ops.rlengine.gae(a["rewards"], a["values"] if values is None else values,
                                  a["mask"] if mask is None else mask, last_values, gamma, lam)


@pytest.mark.parametrize("call, error, fragment", [
    (lambda a: _gae_op(a, values=a["values"][:, :5]), ValueError, "values must have shape"),
    (lambda a: _gae_op(a, values=a["values"].double()), TypeError,
     "values must have the dtype of rewards"),
    (lambda a: _gae_op(a, mask=a["mask"].float()), TypeError, "mask must be a bool tensor"),
    (lambda a: _gae_op(a, last_values=a["last_values"][:3]), ValueError,
     "last_values must have shape"),
    (lambda a: _gae_op(a, gamma=1.5), ValueError, "gamma must be a finite number in [0, 1]"),
    (lambda a: _gae_op(a, lam=math.nan), ValueError, "lam must be a finite number in [0, 1]"),
    (lambda a: torch.ops.rlengine.gae_backward(a["rewards"][:, :2], None, a["mask"], 0.9, 0.9),
     ValueError, "grad_advantages must have shape"),
    (lambda a: torch.ops.rlengine.discounted_returns(a["rewards"][0], a["mask"][0], None, 0.9),
     ValueError, "rewards must be 2-D"),
    (lambda a: torch.ops.rlengine.discounted_returns_backward(a["rewards"], a["mask"][:2], 0.9),
     ValueError, "grad_returns must have shape"),
    (lambda a: torch.ops.rlengine.discounted_returns_backward(a["rewards"], a["mask"], -1.0),
     ValueError, "gamma must be a finite number in [0, 1]"),
])
def test_kernels_check_their_arguments(call, error, fragment):
    """The ops called directly (as compiled graphs do, past the Python checks) refuse inputs
    that would make them read out of bounds or compute something else."""
    with pytest.raises(error) as info:
        call(_good())
    assert fragment in str(info.value)
