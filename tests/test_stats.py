"""rlengine.ops.masked_mean / masked_var / masked_whiten against the references in float64."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPES,
    assert_compiles_fullgraph,
    assert_matches,
    incoming_gradient,
    noncontiguous,
    result_dtype,
    to64,
)
from hypothesis import assume, given
from hypothesis import strategies as st

from rlengine import _extension, ops
from rlengine.ops import reference

OPS = ("masked_mean", "masked_var", "masked_whiten")



def _call(name, impl, x, mask, dim=None, **kwargs):
    if name == "masked_whiten":
        assert dim is None
        return getattr(impl, name)(x, mask, **kwargs)
    return getattr(impl, name)(x, mask, dim, **kwargs)


def _check(name, x, mask, dim=None, *, grad=None, extra_atol=0.0, **kwargs):
    """Forward and backward (with a random incoming gradient) of ops.<name> equal
    reference.<name> evaluated in float64 on the same values, within x.dtype's tolerance.
    Returns the kernel's output."""
    dtype = x.dtype
    full_mask = mask.expand(x.shape) if mask.shape != x.shape else mask
    xk = x.detach().clone().requires_grad_()
    x64 = to64(x).requires_grad_()
    out = _call(name, ops, xk, mask, dim, **kwargs)
    ref = _call(name, reference, x64, full_mask, dim, **kwargs)
    assert out.dtype == result_dtype(dtype), f"{name}: result dtype {out.dtype}"
    assert_matches(out, ref, dtype, what=f"{name} dim={dim}", extra_atol=extra_atol)
    # the same incoming gradient for both: a given one rounded to out's dtype, or a random one
    grad = incoming_gradient(out) if grad is None else grad.to(out.dtype).double()
    (gk,) = torch.autograd.grad(out, xk, grad.to(out.dtype))
    (g64,) = torch.autograd.grad(ref, x64, grad)
    assert gk.dtype == dtype and gk.shape == x.shape
    assert_matches(gk, g64, dtype, gradient=True, what=f"grad {name} dim={dim}",
                   extra_atol=extra_atol)
    return out.detach()


def _dims(ndim):
    return [None, *sorted({0, ndim - 1, -1} | ({1} if ndim > 1 else set()))]


def _random_mask(shape, keep=0.6):
    return torch.rand(shape) < keep


# Shapes cover: 1 element, odd/prime sizes, 3-D x (reductions over a middle dim), more than one
# column tile (inner > 256), rows split into several parallel blocks (> 16384 elements).
SHAPES = [(1,), (7,), (5, 31), (3, 4, 17), (2, 5, 300), (2, 40000)]
REDUCE_CASES = [(shape, dim) for shape in SHAPES for dim in _dims(len(shape))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", REDUCE_CASES)
def test_mean_matches_reference(shape, dim, dtype):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    _check("masked_mean", x, _random_mask(shape), dim)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", REDUCE_CASES)
def test_var_matches_reference(shape, dim, dtype, unbiased):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    _check("masked_var", x, _random_mask(shape), dim, unbiased=unbiased)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (5, 31), (3, 4, 17), (8, 5000)])
def test_whiten_matches_reference(shape, dtype, shift_mean, unbiased):
    x = (torch.randn(shape) * 2 - 0.5).to(dtype)
    mask = _random_mask(shape, 0.7)
    if mask.sum() < 2:  # keep some shapes with zero / one selected element in the mix
        mask.view(-1)[0] = True
    _check("masked_whiten", x, mask, shift_mean=shift_mean, unbiased=unbiased)


@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-2, 10.0])
def test_whiten_eps(eps):
    x = torch.randn(6, 50) * 0.1
    mask = _random_mask((6, 50))
    out = _check("masked_whiten", x, mask, eps=eps)
    sel = x[mask].double()
    expected = (sel - sel.mean()) / torch.sqrt(sel.var() + eps)
    torch.testing.assert_close(out[mask].double(), expected, atol=1e-6, rtol=1e-5)


def test_whiten_is_global_over_the_batch():
    """PPO whitens advantages over all response tokens of the batch at once: the same as
    whitening the flat vector of selected values (torch's unbiased var), independently of the
    reference."""
    adv = torch.randn(8, 64) * 5 + 2
    mask = _random_mask((8, 64))
    out = ops.masked_whiten(adv, mask)
    sel = adv[mask].double()
    expected = (sel - sel.mean()) * torch.rsqrt(sel.var() + 1e-8)
    torch.testing.assert_close(out[mask].double(), expected, atol=1e-6, rtol=1e-6)
    assert out[~mask].eq(0).all()
    kept = ops.masked_whiten(adv, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask].double(), expected + sel.mean(), atol=1e-5, rtol=1e-6)
    assert abs(float(out[mask].double().mean())) < 1e-6
    assert abs(float(out[mask].double().var()) - 1.0) < 1e-5


# ---- edge cases -----------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [None, 0, 1])
def test_empty_selection_gives_zero_value_and_gradient(dim):
    x = torch.randn(4, 6, requires_grad=True)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for name in ("masked_mean", "masked_var"):
        out = getattr(ops, name)(x, mask, dim)
        assert out.eq(0).all(), name
        (g,) = torch.autograd.grad(out.sum(), x)
        assert g.eq(0).all(), name
    out = ops.masked_whiten(x, mask)
    assert out.eq(0).all()
    (g,) = torch.autograd.grad((out * torch.randn(4, 6)).sum(), x)
    assert g.eq(0).all()


def test_some_rows_empty_along_dim():
    x = torch.randn(5, 9)
    mask = _random_mask((5, 9))
    mask[1] = False
    mask[3] = False
    mask[3, 4] = True                           # one element: var 0 (unbiased and biased)
    mean = _check("masked_mean", x, mask, 1)
    var = _check("masked_var", x, mask, 1)
    assert mean[1] == 0 and var[1] == 0
    assert mean[3] == x[3, 4] and var[3] == 0
    assert ops.masked_var(x, mask, 1, unbiased=False)[3] == 0
    _check("masked_var", x, mask.t().contiguous().t(), 1, unbiased=False)


def test_single_selected_element():
    x = torch.randn(10, requires_grad=True)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[6] = True
    assert ops.masked_mean(x, mask) == x[6]
    for unbiased in (True, False):
        var = ops.masked_var(x, mask, unbiased=unbiased)
        assert var == 0
        (g,) = torch.autograd.grad(var, x)
        assert g.eq(0).all()
    white = ops.masked_whiten(x, mask)
    assert white.eq(0).all()
    kept = ops.masked_whiten(x, mask, shift_mean=False)
    assert kept[6] == x[6] and kept.count_nonzero() == 1
    grad = torch.randn(10)
    (g,) = torch.autograd.grad(kept, x, grad)
    # s (g - g_bar) = 0 and the variance term vanishes, leaving g_bar = g_6 at position 6.
    torch.testing.assert_close(g[6], grad[6])
    assert g.count_nonzero() <= 1
    _check("masked_whiten", x, mask, shift_mean=False)


def test_zero_size_and_zero_dim_inputs():
    empty = torch.randn(0)
    assert ops.masked_mean(empty, empty > 0).item() == 0
    assert ops.masked_var(empty, empty > 0).item() == 0
    assert ops.masked_whiten(empty, empty > 0).shape == (0,)
    x = torch.randn(3, 0)
    assert ops.masked_mean(x, x > 0, 1).tolist() == [0, 0, 0]
    assert ops.masked_var(x, x > 0, 0).shape == (0,)
    x = torch.randn(0, 4, 5)
    assert ops.masked_mean(x, x > 0, 0).eq(0).all() and ops.masked_mean(x, x > 0, 0).shape == (4, 5)
    assert ops.masked_var(x, x > 0, 1).shape == (0, 5)
    scalar = torch.tensor(2.5, requires_grad=True)
    for dim in (None, 0, -1):
        out = ops.masked_mean(scalar, torch.tensor(True), dim)
        assert out.shape == () and out == 2.5
        assert ops.masked_var(scalar, torch.tensor(True), dim) == 0
    assert ops.masked_mean(scalar, torch.tensor(False)) == 0


def test_large_offset_variance():
    """Two-pass variance: data with a large common offset keeps the variance of the noise
    (a one-pass E[x^2] - E[x]^2 in fp32 loses every digit, as checked below)."""
    noise = torch.randn(64, 512, dtype=torch.float64) * 2
    mask = _random_mask((64, 512))
    for dtype in (torch.float32, torch.float64):
        x = (1e6 + noise).to(dtype)             # fp32: the noise is kept to 1/16
        sel = x[mask].double()
        expected = sel.var()
        actual = ops.masked_var(x, mask)
        assert abs(float(actual) - float(expected)) <= 1e-6 * float(expected), dtype
        biased = ops.masked_var(x, mask, unbiased=False)
        assert abs(float(biased) - float(sel.var(unbiased=False))) <= 1e-6 * float(expected)
        rows = ops.masked_var(x, mask, 1)
        cols = ops.masked_var(x, mask, 0)
        for out, ref in ((rows, reference.masked_var(x.double(), mask, 1)),
                         (cols, reference.masked_var(x.double(), mask, 0))):
            torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
        white = ops.masked_whiten(x, mask)
        expected_white = (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8)
        torch.testing.assert_close(white[mask].double(), expected_white, atol=1e-5, rtol=1e-5)
    xf = (1e6 + noise).float()[mask]
    naive = float((xf * xf).mean() - xf.mean() ** 2)
    assert abs(naive - float(xf.double().var(unbiased=False))) > 1.0  # the trap is real


def test_masked_out_values_are_never_used():
    """NaN and inf at masked-out positions change no value and give exactly 0 gradient."""
    x = torch.randn(6, 40)
    mask = _random_mask((6, 40))
    mask[:, 0] = True
    poisoned = x.clone()
    hidden = int((~mask).sum())
    poisoned[~mask] = torch.tensor([math.nan, math.inf, -math.inf]).repeat(hidden)[:hidden]
    for name, dims in (("masked_mean", (None, 0, 1)), ("masked_var", (None, 0, 1)),
                       ("masked_whiten", (None,))):
        for dim in dims:
            clean = _call(name, ops, x, mask, dim)
            xp = poisoned.clone().requires_grad_()
            dirty = _call(name, ops, xp, mask, dim)
            assert torch.equal(clean, dirty), (name, dim)
            (g,) = torch.autograd.grad(dirty, xp, torch.randn(dirty.shape))
            assert torch.isfinite(g).all() and g[~mask].eq(0).all(), (name, dim)
            _check(name, poisoned, mask, dim)


def test_nonfinite_selected_values_propagate():
    x = torch.randn(3, 8)
    mask = torch.ones(3, 8, dtype=torch.bool)
    x[1, 2] = math.nan
    x[2, 5] = math.inf
    mean = ops.masked_mean(x, mask, 1)
    assert math.isnan(mean[1]) and mean[2] == math.inf and math.isfinite(mean[0])
    var = ops.masked_var(x, mask, 1)
    assert torch.isnan(var[1:]).all() and math.isfinite(var[0])
    assert torch.isnan(ops.masked_whiten(x, mask)).all()


# ---- layouts and masks ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_noncontiguous_x_and_mask(dtype):
    base = torch.randn(6, 10, 8).to(dtype)
    mask = _random_mask((6, 10, 8))
    x_t = base.transpose(0, 2)                  # [8, 10, 6], strided
    m_t = mask.transpose(0, 2)
    x_s = noncontiguous(base)                   # every other element of the last dim
    m_s = noncontiguous(mask)
    for x, m in ((x_t, m_t), (x_s, m_s), (x_t, m_t.contiguous()), (x_s.contiguous(), m_s)):
        assert not (x.is_contiguous() and m.is_contiguous())
        for dim in (None, 0, 1, -1):
            _check("masked_mean", x, m, dim)
            _check("masked_var", x, m, dim)
        _check("masked_whiten", x, m)
    # Strided views give the same numbers as their contiguous copies, bit for bit.
    for name in ("masked_mean", "masked_var"):
        assert torch.equal(_call(name, ops, x_t, m_t, 1), _call(name, ops, x_t.contiguous(),
                                                                   m_t.contiguous(), 1))


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.int64, torch.int32,
                                        torch.uint8, torch.int8])
def test_numeric_masks_equal_bool_masks(mask_dtype):
    x = torch.randn(5, 13, requires_grad=True)
    mask = _random_mask((5, 13))
    numeric = mask.to(mask_dtype)
    if mask_dtype in (torch.int64, torch.int32):
        numeric = numeric * 3                   # any nonzero entry counts as true
    for name, dim in (("masked_mean", None), ("masked_mean", 1), ("masked_var", 0),
                      ("masked_whiten", None)):
        expected = _call(name, ops, x, mask, dim)
        actual = _call(name, ops, x, numeric, dim)
        assert torch.equal(actual, expected), name
        grad = torch.randn(expected.shape)
        (g_expected,) = torch.autograd.grad(expected, x, grad)
        (g_actual,) = torch.autograd.grad(actual, x, grad)
        assert torch.equal(g_actual, g_expected), name


def test_broadcast_masks():
    """A mask that broadcasts to x's shape acts as its expansion."""
    x = torch.randn(4, 7)
    rows = torch.tensor([[True], [False], [True], [True]])    # [4, 1]: keep whole rows
    steps = _random_mask((7,))                                 # [7]: shared by every row
    steps[0] = True
    for mask in (rows, steps, torch.tensor(True)):
        full = mask.expand(4, 7)
        for name, dim in (("masked_mean", None), ("masked_mean", 0), ("masked_var", 1),
                          ("masked_var", None), ("masked_whiten", None)):
            assert torch.equal(_call(name, ops, x, mask, dim), _call(name, ops, x, full, dim))
        _check("masked_var", x, mask, 0)
        _check("masked_whiten", x, mask)


def test_deterministic_across_thread_counts():
    """Partial sums are over fixed blocks combined in a fixed order: the results are bitwise
    the same for one thread and for several."""
    x = torch.randn(3, 70001) * 10 + 3
    mask = _random_mask((3, 70001))
    grad_white = torch.randn(3, 70001)

    def run_all():
        results = []
        for dim in (None, 0, 1):
            results.append(ops.masked_mean(x, mask, dim))
            results.append(ops.masked_var(x, mask, dim))
        xg = x.clone().requires_grad_()
        white = ops.masked_whiten(xg, mask)
        results.append(white)
        results.extend(torch.autograd.grad(white, xg, grad_white))
        return results

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_all()
        torch.set_num_threads(max(threads, 2))
        several = run_all()
        again = run_all()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, several, again):
        assert torch.equal(a, b) and torch.equal(b, c)


# ---- gradcheck, opcheck, compile ------------------------------------------------------------

def test_extension_kernels_are_loaded():
    for name in OPS:
        assert _extension.has_kernel(name) and _extension.has_kernel(f"{name}_backward")


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_gradcheck_mean_and_var_float64(dim):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = _random_mask((3, 4, 5))
    mask[0, 0, 0] = True
    assert torch.autograd.gradcheck(lambda t: ops.masked_mean(t, mask, dim), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.masked_var(t, mask, dim), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.masked_var(t, mask, dim, unbiased=False), (x,))


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_gradcheck_whiten_float64(shift_mean, unbiased):
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    mask = _random_mask((4, 9))
    mask[0, :2] = True
    assert torch.autograd.gradcheck(
        lambda t: ops.masked_whiten(t, mask, shift_mean=shift_mean, unbiased=unbiased, eps=1e-3),
        (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    x = torch.randn(3, 5, 7).to(dtype).requires_grad_()
    mask = _random_mask((3, 5, 7))
    rlengine = torch.ops.rlengine
    for dim in (None, 1):
        torch.library.opcheck(rlengine.masked_mean.default, (x, mask, dim))
        torch.library.opcheck(rlengine.masked_var.default, (x, mask, dim, True))
        shape = (3, 7) if dim == 1 else ()
        grad = torch.randn(shape, dtype=result_dtype(dtype))
        torch.library.opcheck(rlengine.masked_mean_backward.default, (grad, mask, dim, dtype))
        torch.library.opcheck(rlengine.masked_var_backward.default,
                              (grad, x.detach(), mask, dim, False))
    torch.library.opcheck(rlengine.masked_whiten.default, (x, mask, False, True, 1e-6))
    torch.library.opcheck(rlengine.masked_whiten_backward.default,
                          (torch.randn(3, 5, 7, dtype=result_dtype(dtype)), x.detach(), mask,
                           True, False, 1e-6))


def test_compiles_fullgraph():
    def loss(x, values, mask):
        per_token = ops.masked_mean(x * x, mask, 1)
        spread = ops.masked_var(values, mask, -1)
        white = ops.masked_whiten(values, mask.float(), shift_mean=False)
        return per_token.sum() + 0.5 * spread.sum() + (white * x).sum()

    x = torch.randn(4, 9, requires_grad=True)
    values = torch.randn(4, 9, requires_grad=True)
    assert_compiles_fullgraph(loss, x, values, _random_mask((4, 9)), wrt=(x, values))


# ---- property tests -------------------------------------------------------------------------

@st.composite
def masked_cases(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0 if ndim > 1 else 1, 6)) for _ in range(ndim))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 10.0, -1e4]))
    if dtype == torch.float64:
        # Two float64 evaluations of x - mean agree only to about eps * |offset| / scale (the
        # conditioning of the variance); keep that within the float64 tolerance of 1e-10.
        assume(abs(offset) / scale < 1e5)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))  # replayable
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + offset
    mask = torch.rand(shape, generator=generator) < draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    if x.numel() and draw(st.booleans()):       # poison masked-out positions
        x[~mask] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))
    dim = draw(st.sampled_from([None, *range(-ndim, ndim)]))
    return x.to(dtype), mask, dim


@given(masked_cases(), st.booleans())
def test_property_mean_and_var_match_reference(case, unbiased):
    x, mask, dim = case
    _check("masked_mean", x, mask, dim)
    _check("masked_var", x, mask, dim, unbiased=unbiased)


@given(masked_cases(), st.booleans(), st.booleans())
def test_property_whiten(case, shift_mean, unbiased):
    x, mask, _ = case
    out = _check("masked_whiten", x, mask, shift_mean=shift_mean, unbiased=unbiased,
                 eps=1e-6)
    assert out[~mask].eq(0).all()
    sel = to64(x)[mask]
    if shift_mean and sel.numel() > 2 and float(sel.var()) > 1e-2:
        white = out[mask].double()
        assert abs(float(white.mean())) < 1e-5
        assert abs(float(white.var(unbiased=unbiased)) - 1.0) < 1e-4


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("make_args, error, fragment", [
    (lambda: (torch.randn(4, 5), torch.ones(4, 6, dtype=torch.bool)), ValueError,
     "mask must have shape (4, 5) (x's) or broadcast to it, got (4, 6)"),
    (lambda: (torch.randn(4, 5), torch.ones(2, 4, 5, dtype=torch.bool)), ValueError,
     "mask must have shape"),
    (lambda: (torch.randint(0, 5, (4, 5)), torch.ones(4, 5, dtype=torch.bool)), TypeError,
     "x must be float32, float64, bfloat16 or float16, got torch.int64"),
    (lambda: (torch.randn(4, 5), torch.ones(4, 5, dtype=torch.complex64)), TypeError,
     "mask must be a bool or real tensor"),
    (lambda: ([1.0, 2.0], torch.ones(2, dtype=torch.bool)), TypeError, "x must be a torch.Tensor"),
    (lambda: (torch.randn(4, 5), [[True] * 5] * 4), TypeError, "mask must be a torch.Tensor"),
    (lambda: (torch.randn(4, 5), torch.ones(4, 5, dtype=torch.bool, device="meta")), ValueError,
     "mask is on meta but x is on cpu"),
])
def test_bad_input_raises_named_error(name, make_args, error, fragment):
    x, mask = make_args()
    with pytest.raises(error, match=f"rlengine.{name}") as info:
        getattr(ops, name)(x, mask)
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["masked_mean", "masked_var"])
@pytest.mark.parametrize("dim, error, fragment", [
    (2, ValueError, "dim must be in [-2, 1] for a 2-D x, got 2"),
    (-3, ValueError, "dim must be in [-2, 1] for a 2-D x, got -3"),
    (1.0, TypeError, "dim must be an int or None, got float"),
    (True, TypeError, "dim must be an int or None, got bool"),
    ((0, 1), TypeError, "dim must be an int or None, got tuple"),
])
def test_bad_dim(name, dim, error, fragment):
    with pytest.raises(error, match=f"rlengine.{name}") as info:
        getattr(ops, name)(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool), dim)
    assert fragment in str(info.value)


@pytest.mark.parametrize("eps, error, fragment", [
    (-1e-8, ValueError, "eps must be >= 0.0"),
    (math.nan, ValueError, "eps must be finite"),
    (math.inf, ValueError, "eps must be finite"),
    ("1e-8", TypeError, "eps must be a real number"),
])
def test_bad_eps(eps, error, fragment):
    with pytest.raises(error, match="rlengine.masked_whiten") as info:
        ops.masked_whiten(torch.randn(3), torch.ones(3, dtype=torch.bool), eps=eps)
    assert fragment in str(info.value)


def test_bad_flags():
    x, mask = torch.randn(3), torch.ones(3, dtype=torch.bool)
    with pytest.raises(TypeError, match="rlengine.masked_var: unbiased must be a bool"):
        ops.masked_var(x, mask, unbiased=1)
    with pytest.raises(TypeError, match="rlengine.masked_whiten: shift_mean must be a bool"):
        ops.masked_whiten(x, mask, shift_mean="no")


def test_kernel_guards_direct_calls():
    """Calling the ops directly (as compiled graphs do, past the Python checks) with bad
    arguments raises a named error from the kernel, never reads out of bounds."""
    rl = torch.ops.rlengine
    x = torch.randn(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="masked_mean: mask must have shape"):
        rl.masked_mean(x, mask[:, :4], None)
    with pytest.raises(TypeError, match="masked_var: mask must be a bool tensor"):
        rl.masked_var(x, mask.float(), None, True)
    with pytest.raises(ValueError, match="masked_var: dim must be in"):
        rl.masked_var(x, mask, 2, True)
    with pytest.raises(ValueError, match="masked_whiten: eps must be a finite number >= 0"):
        rl.masked_whiten(x, mask, True, True, -1.0)
    with pytest.raises(ValueError, match="masked_mean_backward: grad must have shape"):
        rl.masked_mean_backward(torch.randn(5), mask, 1, torch.float32)
    with pytest.raises(ValueError, match="masked_var_backward: grad must have shape"):
        rl.masked_var_backward(torch.randn(4, 5), x, mask, 0, True)
    with pytest.raises(ValueError, match="masked_whiten_backward: grad must have shape"):
        rl.masked_whiten_backward(torch.randn(4, 4), x, mask, True, True, 1e-8)
    with pytest.raises(TypeError, match="masked_mean_backward: dtype must be float32, float64, bfloat16 or float16"):
        rl.masked_mean_backward(torch.randn(4), mask, 1, torch.int64)
