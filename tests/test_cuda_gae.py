"""gae and discounted_returns on every device of helpers.DEVICES (the CUDA kernels of
csrc/cuda/gae.cu where a GPU is present; the CPU kernels always) against the float64 reference,
forward and backward, with the inputs that stress the CUDA scan: rows that span several of its
2048-position tiles or share one tile, row lengths that are not a multiple of a tile, long rows
with gamma = lam = 1, masked garbage, strided inputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICES,
    DTYPES,
    FP32_EPS,
    assert_matches,
    incoming_gradient,
    noncontiguous,
    result_dtype,
    to64,
)
from test_gae import HAND_MASK, HAND_REWARDS, HAND_VALUES, _inputs, _mask

import rlengine
from rlengine import ops
from rlengine.ops import reference

OPS = ("gae", "gae_backward", "discounted_returns", "discounted_returns_backward")
TILE = 2048  # positions per block of the CUDA scan (gae.cu: kThreads * kItems)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_kernels_are_registered():
    for name in OPS:
        assert rlengine._extension.has_kernel(name, "CUDA"), name


def _leaf(t, device):
    return None if t is None else t.detach().to(device).requires_grad_()


def _check(device, rewards, values, mask, *, gamma, lam, last_values=None, garbage=None):
    """gae and discounted_returns on `device`, forward and backward (random incoming gradients,
    NaN at masked positions, which must be ignored), equal the float64 reference on the CPU.
    With `garbage`, rewards and values at masked positions hold it (they must not matter)."""
    dtype = rewards.dtype
    if garbage is not None:
        rewards = torch.where(mask, rewards, torch.tensor(garbage, dtype=dtype))
        values = torch.where(mask, values, torch.tensor(-garbage, dtype=dtype))
    r, v, lv = (_leaf(t, device) for t in (rewards, values, last_values))
    m = mask.to(device)
    r64, v64, lv64 = (None if t is None else to64(t).requires_grad_()
                      for t in (rewards, values, last_values))
    clean_r = torch.where(mask, r64, 0.0)  # the reference multiplies: keep garbage out of it
    clean_v = torch.where(mask, v64, 0.0)

    adv, ret = ops.gae(r, v, m, gamma=gamma, lam=lam, last_values=lv)
    returns = ops.discounted_returns(r, m, gamma=gamma, last_values=lv)
    ref_adv, ref_ret = reference.gae(clean_r, clean_v, mask, gamma=gamma, lam=lam,
                                     last_values=lv64)
    ref_returns = reference.discounted_returns(clean_r, mask, gamma=gamma, last_values=lv64)
    out_dtype = result_dtype(dtype)
    for got, want, what in ((adv, ref_adv, "advantages"), (ret, ref_ret, "returns"),
                            (returns, ref_returns, "discounted_returns")):
        assert got.device.type == device and got.dtype == out_dtype
        assert_matches(got.cpu(), want, dtype, what=what)
        assert got.cpu()[~mask].eq(0).all(), f"{what}: nonzero at a masked position"

    if mask.shape[-1] == 0:
        return
    # Random incoming gradients exactly representable in the results' dtype, 0 where masked.
    grads = [incoming_gradient(t.detach().cpu(), where=mask) for t in (adv, ret, returns)]
    # NaN incoming gradients at masked positions (the gradients of constant zeros) are ignored.
    noisy = [torch.where(mask, g, math.nan).to(out_dtype).to(device) for g in grads]
    # One op at a time: autograd would add the two ops' gradients in the input dtype (bf16).
    for outputs, refs, names in (((adv, ret), (ref_adv, ref_ret), ("rewards", "values")),
                                 ((returns,), (ref_returns,), ("rewards",))):
        inputs = [r, v][:len(names)] + ([lv] if lv is not None else [])
        inputs64 = [r64, v64][:len(names)] + ([lv64] if lv64 is not None else [])
        k = 0 if len(outputs) == 2 else 2
        got = torch.autograd.grad(outputs, inputs, noisy[k:k + len(outputs)],
                                  retain_graph=True)
        want = torch.autograd.grad(refs, inputs64, grads[k:k + len(outputs)],
                                   retain_graph=True)
        for name, g, w, x in zip((*names, "last_values"), got, want, inputs):
            assert g.device.type == device and g.dtype == x.dtype and g.shape == x.shape
            assert_matches(g.cpu(), w, x.dtype, gradient=True, what=f"grad {name}")
            if name != "last_values":
                assert g.cpu()[~mask].eq(0).all(), f"grad {name}: nonzero at a masked position"


# ---- shapes around the CUDA tiles -------------------------------------------------------------

# (1, 1), (3, 1): T = 1; (600, 3): hundreds of rows in one tile; (5, 31): odd; every mask kind.
# Then rows that cross a tile boundary at different offsets, and rows of exactly one tile (every
# tile starts and ends a row), one mask kind each (the float64 reference loops over T).
CASES = [(shape, kind) for shape in [(1, 1), (3, 1), (600, 3), (5, 31)]
         for kind in ("turns", "random", "all", "none_rows")]
CASES += [((2, TILE + 1), "random"), ((3, 2100), "turns"), ((2, TILE), "all"),
          ((4, TILE - 1), "none_rows")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, kind", CASES)
def test_matches_reference_around_tiles(device, shape, kind):
    rewards, values, last = _inputs(*shape, torch.float32, with_last=shape[0] != 3)
    _check(device, rewards, values, _mask(*shape, kind), gamma=0.99, lam=0.95,
           last_values=last, garbage=math.nan)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(device, dtype):
    rewards, values, last = _inputs(7, 300, dtype)
    _check(device, rewards, values, _mask(7, 300, "turns"), gamma=0.97, lam=0.9,
           last_values=last, garbage=math.inf)


def _same_as_cpu_kernel(device, rewards, values, mask, *, gamma, lam, last_values=None):
    """The device's results and gradients equal the CPU kernel's (which test_gae.py checks
    against the reference): for rows too long for the reference's Python loop."""
    results = []
    for where in (device, "cpu"):
        r, v, lv = (_leaf(t, where) for t in (rewards, values, last_values))
        m = mask.to(where)
        adv, ret = ops.gae(r, v, m, gamma=gamma, lam=lam, last_values=lv)
        g = ops.discounted_returns(r, m, gamma=gamma, last_values=lv)
        weights = [torch.linspace(-1, 1, mask.numel()).reshape(mask.shape).to(where) * (i + 1)
                   for i in range(3)]
        inputs = [t for t in (r, v, lv) if t is not None]
        grads = torch.autograd.grad((adv, ret, g), inputs, weights)
        results.append([t.detach().cpu() for t in (adv, ret, g, *grads)])
    for a, b in zip(*results):
        assert_matches(a, to64(b), torch.float64 if a.dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma, lam", [(0.0, 0.5), (0.9, 0.0), (1.0, 1.0), (1.0, 0.0),
                                        (0.0, 1.0)])
def test_gamma_lam_corners(device, gamma, lam):
    """c = gamma * lam = 0 makes every step's map constant, gamma = 0 cuts the values out: the
    scan's summaries must stay exact there, inside a tile and across tiles."""
    rewards, values, last = _inputs(4, 300, torch.float64)
    _check(device, rewards, values, _mask(4, 300, "random"), gamma=gamma, lam=lam,
           last_values=last)
    rewards, values, last = _inputs(4, 3 * TILE + 37, torch.float32)
    _same_as_cpu_kernel(device, rewards, values, _mask(4, 3 * TILE + 37, "random"),
                        gamma=gamma, lam=lam, last_values=last)


# ---- masked and degenerate inputs -------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_masked_garbage_never_leaks(device):
    """All-masked rows, holes inside rows and a row masked over more than a tile: whatever the
    masked positions hold (NaN, +-inf, huge), results and gradients there are exactly 0 and
    every other result and gradient is bit-identical to the clean run's."""
    steps = 2 * TILE + 100
    mask = _mask(6, steps, "none_rows")
    mask[1] = torch.rand(steps) < 0.5
    mask[3] = True
    mask[3, 10:TILE + 500] = False
    rewards, values, last = _inputs(6, steps, torch.float32)
    _same_as_cpu_kernel(device, rewards, values, mask, gamma=0.999, lam=0.95, last_values=last)
    m = mask.to(device)
    ga, gr = (torch.randn(6, steps, device=device) for _ in range(2))

    def run(garbage):
        fill = torch.tensor(garbage, device=device)
        r = _leaf(torch.where(m, rewards.to(device), fill), device)
        v = _leaf(torch.where(m, values.to(device), -fill), device)
        lv = _leaf(last, device)
        adv, ret = ops.gae(r, v, m, gamma=0.999, lam=0.95, last_values=lv)
        g = ops.discounted_returns(r, m, gamma=0.999, last_values=lv)
        grads = torch.autograd.grad((adv, ret, g), (r, v, lv),
                                    [torch.where(m, x, fill) for x in (ga, gr, ga)])
        return adv, ret, g, *grads

    clean = run(0.0)
    for garbage in (math.nan, math.inf, -math.inf, 3e38):
        for a, b in zip(run(garbage), clean):
            assert torch.equal(a, b), garbage
    for t in clean[:3] + clean[3:5]:
        assert t[~m].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed_example(device):
    r = torch.tensor(HAND_REWARDS, device=device, requires_grad=True)
    v = torch.tensor(HAND_VALUES, device=device, requires_grad=True)
    lv = torch.tensor([4.0], device=device, requires_grad=True)
    mask = torch.tensor(HAND_MASK, device=device)
    adv, ret = ops.gae(r, v, mask, gamma=0.5, lam=0.5, last_values=lv)
    assert adv.tolist() == [[1.6875, 0.0, 2.75, 3.0, 0.0]]
    assert ret.tolist() == [[2.1875, 0.0, 3.75, 5.0, 0.0]]
    adv.sum().backward()  # an incoming gradient expanded from a scalar: strides 0
    assert r.grad.tolist() == [[1.0, 0.0, 1.25, 1.3125, 0.0]]
    assert v.grad.tolist() == [[-1.0, 0.0, 0.5 - 1.25, 0.5 * 1.25 - 1.3125, 0.0]]
    assert lv.grad.tolist() == [0.5 * 1.3125]
    g = ops.discounted_returns(r, mask, gamma=0.5, last_values=lv)
    assert g.tolist() == [[3.25, 0.0, 4.5, 5.0, 0.0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5), (0, 0), (3, 0), (0, TILE + 1)])
def test_empty(device, shape):
    rewards, values, last = (_leaf(t, device) for t in _inputs(*shape, torch.float32))
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    adv, ret = ops.gae(rewards, values, mask, gamma=0.9, lam=0.9, last_values=last)
    g = ops.discounted_returns(rewards, mask, gamma=0.9, last_values=last)
    assert adv.shape == ret.shape == g.shape == shape and adv.device.type == device
    (adv.sum() + ret.sum() + g.sum()).backward()
    assert rewards.grad.shape == shape and last.grad.shape == shape[:1]
    assert last.grad.eq(0).all()
    # The backward ops called directly: T = 0 gives a zero last_values gradient.
    grad_r, grad_v, grad_last = torch.ops.rlengine.gae_backward(
        torch.zeros(shape, device=device), None, mask, 0.9, 0.9)
    assert grad_last.eq(0).all() and grad_last.shape == shape[:1]


@pytest.mark.parametrize("device", DEVICES)
def test_last_values_none_or_given(device):
    rewards, values, last = _inputs(9, 700, torch.float32)
    mask = _mask(9, 700, "turns")
    _check(device, rewards, values, mask, gamma=0.95, lam=0.9)
    _check(device, rewards, values, mask, gamma=0.95, lam=0.9, last_values=last)
    zero = torch.zeros(9, device=device)
    m = mask.to(device)
    without = ops.gae(rewards.to(device), values.to(device), m, gamma=0.95, lam=0.9)
    with_zero = ops.gae(rewards.to(device), values.to(device), m, gamma=0.95, lam=0.9,
                        last_values=zero)
    assert all(torch.equal(a, b) for a, b in zip(without, with_zero))


# ---- layouts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_read_in_place(device):
    """values[:, :-1] of a [B, T + 1] critic output (rows not aligned), a transposed rewards
    tensor, last_values with stride 2, a strided mask; expanded incoming gradients."""
    batch, steps = 5, TILE + 3
    critic = torch.randn(batch, steps + 1, device=device)
    rewards = torch.randn(steps, batch, device=device).t()
    last = torch.randn(batch, 2, device=device)[:, 0]
    mask = noncontiguous(_mask(batch, steps, "turns").to(device))
    assert not (critic[:, :-1].is_contiguous() or rewards.is_contiguous()
                or last.is_contiguous() or mask.is_contiguous())
    got = ops.gae(rewards, critic[:, :-1], mask, gamma=0.97, lam=0.9, last_values=last)
    want = ops.gae(rewards.contiguous(), critic[:, :-1].contiguous(), mask.contiguous(),
                   gamma=0.97, lam=0.9, last_values=last.contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # .sum() makes the incoming gradients expanded scalars (strides 0), read in place.
    rewards, critic, mask = rewards[:, :300], critic[:, :301], mask[:, :300]
    r, v = _leaf(rewards, device), _leaf(critic[:, :-1], device)
    adv, ret = ops.gae(r, v, mask, gamma=0.97, lam=0.9)
    (adv.sum() + 2 * ret.sum()).backward()
    r64, v64 = (to64(t).cpu().requires_grad_() for t in (rewards, critic[:, :-1]))
    m = mask.cpu()
    ref_adv, ref_ret = reference.gae(r64, v64, m, gamma=0.97, lam=0.9)
    (ref_adv.sum() + 2 * ref_ret.sum()).backward()
    assert_matches(r.grad.cpu(), r64.grad, torch.float32, gradient=True, what="grad rewards")
    assert_matches(v.grad.cpu(), v64.grad, torch.float32, gradient=True, what="grad values")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_reproducible(device, dtype):
    """The CUDA scan composes the same summaries in the same order whatever the order its tiles
    run in (its look-back stops only at row boundaries), so repeated calls agree bit for bit."""
    rewards, values, last = (t.to(device) for t in _inputs(3, 20 * TILE + 5, dtype))
    mask = _mask(3, 20 * TILE + 5, "random").to(device)
    grads = [torch.randn(3, 20 * TILE + 5, dtype=result_dtype(dtype), device=device)
             for _ in range(2)]

    def run():
        return (*ops.gae(rewards, values, mask, gamma=0.999, lam=0.97, last_values=last),
                *torch.ops.rlengine.gae_backward(*grads, mask, 0.999, 0.97))

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(run(), first))


# ---- long rows: gamma = lam = 1 over 1e5 steps ------------------------------------------------

def _telescoped(rewards, values, mask, last, ga, gr):
    """gae with gamma = lam = 1 in closed form, in float64: A_t = (sum of the valid rewards from
    t on) + last_values - V_t, and its backward G_t = sum of the valid incoming gradients up
    to t (so no 1e5-step Python loop is needed)."""
    r = torch.where(mask, to64(rewards), 0.0)
    suffix = r.flip(-1).cumsum(-1).flip(-1) + to64(last)[:, None]
    adv = torch.where(mask, suffix - to64(values), 0.0)
    ret = torch.where(mask, suffix, 0.0)
    g = torch.where(mask, to64(ga) + to64(gr), 0.0).cumsum(-1)
    before = g - torch.where(mask, to64(ga) + to64(gr), 0.0)  # G at the previous valid position
    grad_r = torch.where(mask, g, 0.0)
    grad_v = torch.where(mask, to64(gr) - g + before, 0.0)
    return adv, ret, grad_r, grad_v, g[:, -1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_rows_gamma_lam_one(device, dtype):
    """T = 1e5 with gamma = lam = 1: every result is a sum of up to 1e5 terms. The kernels carry
    the scan in float64 and round each fp32 result once, so they stay within a few fp32 ulps of
    the float64 values (an fp32 scan would be off by ~1e-3 here)."""
    steps = 100_000
    rewards, values, last = _inputs(2, steps, dtype)
    mask = torch.ones(2, steps, dtype=torch.bool)
    mask[1] = torch.rand(steps) < 0.8
    ga, gr = (torch.randn(2, steps, dtype=result_dtype(dtype)) for _ in range(2))
    want = _telescoped(rewards, values, mask, last, ga, gr)
    m = mask.to(device)
    adv, ret = ops.gae(rewards.to(device), values.to(device), m, gamma=1.0, lam=1.0,
                       last_values=last.to(device))
    grads = torch.ops.rlengine.gae_backward(ga.to(device), gr.to(device), m, 1.0, 1.0)
    returns = ops.discounted_returns(rewards.to(device), m, gamma=1.0,
                                     last_values=last.to(device))
    for got, w, what in zip((adv, ret, *grads, returns), (*want, want[1]),
                            ("A", "R", "dr", "dV", "dlast", "G")):
        got = got.cpu().double()
        scale = float(w.abs().max())
        if dtype == torch.float64:
            torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12 * scale, msg=what)
        else:  # one rounding to fp32 (2 ulps of slack for the float64 sums' own rounding)
            err = (got - w).abs() - 2 * FP32_EPS * w.abs()
            assert float(err.max()) <= 1e-12 * scale, f"{what}: {float(err.max())}"


# ---- dtype promotion and gradients across devices -------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_gradient_dtypes(device):
    rewards, _, _ = _inputs(4, 50, torch.float32)
    values = torch.randn(4, 50).bfloat16()
    last = torch.randn(4).half()
    mask = _mask(4, 50, "turns")
    r, v, lv = (_leaf(t, device) for t in (rewards, values, last))
    adv, ret = ops.gae(r, v, mask.to(device), gamma=0.95, lam=0.9, last_values=lv)
    assert adv.dtype == ret.dtype == torch.float32
    (adv.sum() + ret.sum()).backward()
    assert (r.grad.dtype, v.grad.dtype, lv.grad.dtype) == (torch.float32, torch.bfloat16,
                                                           torch.float16)
    # float64 incoming gradients give float64 gradients; an fp16 one is read as fp32.
    m = mask.to(device)
    out = torch.ops.rlengine.gae_backward(torch.randn(4, 50, device=device).half(),
                                          torch.randn(4, 50, device=device, dtype=torch.float64),
                                          m, 0.9, 0.9)
    assert all(t.dtype == torch.float64 for t in out)
    out = torch.ops.rlengine.gae_backward(torch.randn(4, 50, device=device).half(), None, m,
                                          0.9, 0.9)
    assert all(t.dtype == torch.float32 for t in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (CPU: test_gae.py)")
def test_opcheck_cuda():
    device = "cuda"
    rewards, values, last = (_leaf(t, device) for t in _inputs(3, 13, torch.float32))
    mask = _mask(3, 13, "turns").to(device)
    torch.library.opcheck(torch.ops.rlengine.gae.default,
                          (rewards, values, mask, last, 0.95, 0.9))
    torch.library.opcheck(torch.ops.rlengine.discounted_returns.default,
                          (rewards, mask, None, 0.95))
    ga, gr = torch.randn(3, 13, device=device), torch.randn(3, 13, device=device)
    torch.library.opcheck(torch.ops.rlengine.gae_backward.default, (ga, None, mask, 0.95, 0.9))
    torch.library.opcheck(torch.ops.rlengine.gae_backward.default, (ga, gr, mask, 0.95, 0.9))
    torch.library.opcheck(torch.ops.rlengine.discounted_returns_backward.default,
                          (ga, mask, 0.95))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_kernel_checks_devices():
    """The CUDA kernels called directly refuse tensors on another device."""
    rewards = torch.randn(2, 5, device="cuda")
    with pytest.raises(ValueError, match="mask must be on"):
        torch.ops.rlengine.gae(rewards, rewards, torch.ones(2, 5, dtype=torch.bool,
                                                             device="cuda").cpu(), None, 0.9,
                               0.9)
