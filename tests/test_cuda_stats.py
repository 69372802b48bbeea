"""masked_mean, masked_var and masked_whiten, forward and backward, on every device in
helpers.DEVICES against the float64 reference (evaluated on the CPU): the CUDA kernels
(csrc/cuda/stats.cu) where a GPU is present, the CPU kernels everywhere. The shapes walk the
GPU kernels' plans: a warp per short row (up to 1024), a block per longer row, column tiles of
2 to 32 reduced rows when the reduced dim is not the last (partial last tiles included), rows
and columns split over several blocks whose partial statistics are merged by a second kernel
(long rows, dim=None, whitening of 3e5 elements), and the 16-byte pack path next to the
misaligned scalar one. Adversarial inputs: all-masked outputs, NaN and inf at selected and
unselected positions, a single selected element under Bessel's correction, a 1e6 offset with
unit noise, empty tensors; and bitwise reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICES,
    DTYPES,
    assert_matches,
    incoming_gradient,
    result_dtype,
    to64,
)

import rlengine
from rlengine import ops
from rlengine.ops import reference

OPS = ("masked_mean", "masked_mean_backward", "masked_var", "masked_var_backward",
       "masked_whiten", "masked_whiten_backward")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("name", OPS)
def test_cuda_kernels_are_registered(name):
    assert rlengine._extension.has_kernel(name, "CUDA")


def _call(name, impl, x, mask, dim=None, **kwargs):
    if name == "masked_whiten":
        assert dim is None
        return impl.masked_whiten(x, mask, **kwargs)
    return getattr(impl, name)(x, mask, dim, **kwargs)


def _placed(values: torch.Tensor, device: str, layout: str = "contiguous") -> torch.Tensor:
    """values on device: 'contiguous'; 'offset' (contiguous, but one element past a 16-byte
    boundary, so the kernels take their scalar path); 'strided' (every other element of the
    last dim: a copy is made by the op)."""
    if layout == "contiguous" or values.dim() == 0:
        return values.to(device, copy=True)
    flat = values.reshape(-1)
    if layout == "offset":
        buffer = torch.zeros(flat.numel() + 1, dtype=values.dtype)
        buffer[1:] = flat
        return buffer.to(device)[1:].view(values.shape)
    assert layout == "strided"
    wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
    wide[..., ::2] = values
    return wide.to(device)[..., ::2]


def _check(name, x, mask, device, dim=None, *, layout="contiguous", expanded_grad=False,
           slack=0.0, **kwargs):
    """Forward and backward of ops.<name> on device equal reference.<name> in float64 on the
    same values, within x.dtype's tolerance plus slack (absolute). mask may
    broadcast to x. Returns the output and the gradient, on the CPU."""
    dtype = x.dtype
    xd = _placed(x, device, layout).requires_grad_()
    out = _call(name, ops, xd, mask.to(device), dim, **kwargs)
    x64 = to64(x).requires_grad_()
    expected = _call(name, reference, x64, mask.expand(x.shape), dim, **kwargs)
    assert out.device == xd.device and out.dtype == result_dtype(dtype), name
    assert_matches(out.cpu(), expected, dtype, what=f"{name} dim={dim}", extra_atol=slack)
    if expanded_grad:  # what .sum() sends back: a scalar expanded to the output's shape
        grad = torch.tensor(0.75, dtype=torch.float64).expand(expected.shape)
        device_grad = torch.tensor(0.75, dtype=out.dtype, device=device).expand(out.shape)
    else:
        grad = incoming_gradient(expected, where=torch.isfinite(expected))
        device_grad = grad.to(out.dtype).to(device)
    (gd,) = torch.autograd.grad(out, xd, device_grad)
    (g64,) = torch.autograd.grad(expected, x64, grad)
    assert gd.dtype == dtype and gd.shape == x.shape
    assert_matches(gd.cpu(), g64, dtype, gradient=True, what=f"grad {name} dim={dim}",
                   extra_atol=slack)
    return out.detach().cpu(), gd.cpu()


def _mask(shape, keep=0.6):
    return torch.rand(shape) < keep


# (shape, dim): which plan of the GPU kernels each exercises.
REDUCTIONS = [
    ((1,), None),
    ((7,), 0),
    ((5, 31), -1),            # warp per row
    ((5, 31), 0),             # 32-column tiles, one partial
    ((3, 4, 17), 1),          # a middle dim: one 32-column tile per outer index, 17 valid
    ((2, 5, 300), 1),         # 10 tiles per outer index, the last one partial
    ((6, 1024), -1),          # the longest warp rows
    ((3, 1025), -1),          # a block per row
    ((2, 40000), -1),         # long rows split over 5 blocks each, merged by a second kernel
    ((40000, 3), 0),          # 4-column tiles along 40000 steps, split over 10 blocks
    ((300_000,), None),       # the whole tensor over 37 blocks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_mean_and_var_match_reference(device, shape, dim, dtype):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    mask = _mask(shape)
    _check("masked_mean", x, mask, device, dim)
    _check("masked_var", x, mask, device, dim, unbiased=True)
    _check("masked_var", x, mask, device, dim, unbiased=False, expanded_grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (5, 31), (1024,), (8193,), (300_000,)])
@pytest.mark.parametrize("device", DEVICES)
def test_whiten_matches_reference(device, shape, dtype):
    x = (torch.randn(shape) * 2 - 0.5).to(dtype)
    mask = _mask(shape, 0.7)
    mask.view(-1)[0] = True
    _check("masked_whiten", x, mask, device)
    _check("masked_whiten", x, mask, device, shift_mean=False, unbiased=False, eps=1e-3,
           expanded_grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["offset", "strided"])
@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_broadcast_masks(device, layout, dtype):
    x = torch.randn(6, 1500).to(dtype)
    for mask in (_mask((6, 1500)), _mask((6, 1)), _mask((1500,))):
        for dim in (None, -1, 0):
            _check("masked_mean", x, mask, device, dim, layout=layout)
            _check("masked_var", x, mask, device, dim, layout=layout)
        _check("masked_whiten", x, mask, device, layout=layout)
    # A bool mask whose bytes are not 0/1 still selects (nonzero is true), as on the CPU.
    raw = torch.randint(0, 4, (6, 1500), dtype=torch.uint8)
    out = ops.masked_var(x.to(device), raw.to(device).view(torch.bool), 1)
    assert_matches(out.cpu(), reference.masked_var(x.double(), raw != 0, 1), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_selection_and_single_element(device):
    for shape, dim in [((4, 6), None), ((4, 6), 0), ((4, 6), 1), ((2, 9000), 1), ((9000, 2), 0)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        mask = torch.zeros(shape, dtype=torch.bool, device=device)
        for name in ("masked_mean", "masked_var"):
            out = getattr(ops, name)(x, mask, dim)
            assert out.eq(0).all(), (name, shape, dim)
            (g,) = torch.autograd.grad(out, x, torch.full_like(out, math.nan))
            assert g.eq(0).all(), (name, shape, dim)
        out = ops.masked_whiten(x, mask)
        assert out.eq(0).all()
        (g,) = torch.autograd.grad(out, x, torch.randn_like(out))
        assert g.eq(0).all()
    # One selected element: the unbiased variance is 0 (divisor clamped to 1), so are its
    # gradient and the whitened value (with eps > 0).
    for shape, dim in [((5, 31), None), ((5, 31), 1), ((5, 31), 0), ((9000,), None)]:
        x = torch.randn(shape)
        mask = torch.zeros(shape, dtype=torch.bool)
        mask.view(-1)[3] = True
        out, grad = _check("masked_var", x, mask, device, dim)
        assert out.eq(0).all() and grad.eq(0).all()
        if dim is None:
            out, _ = _check("masked_whiten", x, mask, device)
            assert out.eq(0).all()


@pytest.mark.parametrize("shape", [(6, 40), (4, 9000)])
@pytest.mark.parametrize("device", DEVICES)
def test_masked_out_values_are_never_used(device, shape):
    """NaN and inf at unselected positions change no value and give exactly 0 gradient."""
    x = torch.randn(shape)
    mask = _mask(shape)
    mask[:, 0] = True
    poisoned = x.clone()
    hidden = int((~mask).sum())
    poisoned[~mask] = torch.tensor([math.nan, math.inf, -math.inf]).repeat(hidden)[:hidden]
    for name, dims in (("masked_mean", (None, 0, 1)), ("masked_var", (None, 0, 1)),
                       ("masked_whiten", (None,))):
        for dim in dims:
            clean, _ = _check(name, x, mask, device, dim)
            dirty, grad = _check(name, poisoned, mask, device, dim)
            assert torch.equal(clean, dirty), (name, dim)
            assert torch.isfinite(grad).all() and grad[~mask].eq(0).all(), (name, dim)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_selected_values_propagate(device):
    for shape in [(3, 8), (3, 9000)]:
        x = torch.randn(shape)
        mask = torch.ones(shape, dtype=torch.bool)
        x[1, 2] = math.nan
        x[2, 5] = math.inf
        mean = ops.masked_mean(x.to(device), mask.to(device), 1).cpu()
        assert math.isnan(mean[1]) and mean[2] == math.inf and math.isfinite(mean[0])
        var = ops.masked_var(x.to(device), mask.to(device), 1).cpu()
        assert torch.isnan(var[1:]).all() and math.isfinite(var[0])
        assert torch.isnan(ops.masked_whiten(x.to(device), mask.to(device))).all()
        for dim in (None, 0, 1):
            _check("masked_mean", x, mask, device, dim)
            _check("masked_var", x, mask, device, dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_large_offset_keeps_the_variance(device, dtype):
    """1e6 + unit noise: the two-pass (chunk-exact, Chan-merged) variance keeps the noise's
    variance, through the single-block and the split plans alike."""
    # Two float64 evaluations of x - mean (in the whitened values and the gradients) agree
    # only to about eps * 1e6.
    slack = 1e-9 if dtype == torch.float64 else 0.0
    for shape in [(64, 512), (3, 40000), (300_000,)]:
        noise = torch.randn(shape, dtype=torch.float64)
        x = (1e6 + noise).to(dtype)                           # fp32 keeps the noise to 1/16
        mask = _mask(shape)
        for dim in ((None, -1, 0) if len(shape) == 2 else (None,)):
            out, _ = _check("masked_var", x, mask, device, dim, slack=slack)
            expected = reference.masked_var(x.double(), mask, dim)
            torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)
        _check("masked_whiten", x, mask, device, slack=slack)
        _check("masked_whiten", x, mask, device, shift_mean=False, slack=slack)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_size_inputs(device):
    for shape, dim in [((0,), None), ((0,), 0), ((3, 0), 1), ((0, 4), 0), ((3, 0), None),
                       ((2, 0, 3), 1)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        mask = torch.ones(shape, dtype=torch.bool, device=device)
        for name in ("masked_mean", "masked_var"):
            out = getattr(ops, name)(x, mask, dim)
            expected = getattr(reference, name)(x.detach().cpu().double(), mask.cpu(), dim)
            assert out.shape == expected.shape and out.eq(0).all(), (name, shape, dim)
            (g,) = torch.autograd.grad(out.sum(), x)
            assert g.shape == shape
        out = ops.masked_whiten(x, mask)
        assert out.shape == shape
        (g,) = torch.autograd.grad(out.sum(), x)
        assert g.shape == shape


@pytest.mark.parametrize("device", DEVICES)
def test_results_are_bitwise_reproducible(device):
    x = torch.randn(300_000, device=device) * 5 + 3
    mask = torch.rand(300_000, device=device) < 0.8
    g = torch.randn(300_000, device=device)
    x2 = x.view(600, 500)
    m2 = mask.view(600, 500)

    def run():
        leaf = x.clone().requires_grad_()
        white = ops.masked_whiten(leaf, mask)
        (grad,) = torch.autograd.grad(white, leaf, g)
        return (ops.masked_mean(x, mask), ops.masked_var(x, mask), white, grad,
                ops.masked_var(x2, m2, 0), ops.masked_var(x2, m2, 1))

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)
