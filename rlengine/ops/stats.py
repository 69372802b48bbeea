"""Masked statistics: ``rlengine::masked_mean``, ``masked_var`` and ``masked_whiten``.

The reductions PPO implementations run over padded ``[batch, steps]`` tensors (the mean of a
per-token loss over response tokens, advantage whitening over the whole batch), with float64
accumulation, a two-pass variance, and exactly 0 value and gradient at masked-out positions.

Kernels: csrc/cpu/stats.cpp. Reference: ``reference.masked_mean``, ``reference.masked_var``,
``reference.masked_whiten``.

Common conventions:

* ``x`` is float32, float64, bfloat16 or float16, of any shape and layout (non-contiguous
  tensors are read through a contiguous copy). Results are float32 (float64 for float64 ``x``);
  the gradient w.r.t. ``x`` has ``x``'s dtype. Sums are accumulated in float64.
* ``mask`` is a bool tensor (a numeric mask counts nonzero entries as true) of ``x``'s shape,
  or of a shape that broadcasts to it (e.g. ``[B, 1]`` to keep whole rows, or ``[T]`` shared by
  every row); it is on ``x``'s device and is never differentiated.
* Values of ``x`` at masked-out positions are never used: NaN or inf there cannot reach a
  result or a gradient.
* The results are bitwise reproducible for a given machine: partial sums are formed over fixed
  blocks of elements and combined in a fixed order, whatever the number of threads.
"""

from __future__ import annotations

import torch

from rlengine.ops import _checks

__all__ = ["masked_mean", "masked_var", "masked_whiten"]


def _inputs(op: str, x: object, mask: object) -> tuple[torch.Tensor, torch.Tensor]:
    """x as a float tensor and mask as a bool tensor of x's shape (expanded if it broadcasts)."""
    x = _checks.float_tensor(op, "x", x)
    _checks.same_device(op, x=x, mask=_checks.tensor(op, "mask", mask))
    return x, _checks.mask(op, "mask", mask, x.shape, broadcast=True, what="x's")


def _dim(op: str, x: torch.Tensor, dim: object) -> int | None:
    """dim wrapped to [0, x.dim()), or None for all of x (a 0-d x accepts dim 0 or -1, as torch's
    reductions do, and is then reduced whole)."""
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int):
        _checks._fail(op, f"dim must be an int or None, got {type(dim).__name__}", TypeError)
    limit = max(x.dim(), 1)
    if not -limit <= dim < limit:
        _checks._fail(op, f"dim must be in [{-limit}, {limit - 1}] for a {x.dim()}-D x, got {dim}")
    if x.dim() == 0:
        return None
    return dim % x.dim()


def _flag(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        _checks._fail(op, f"{name} must be a bool, got {type(value).__name__}", TypeError)
    return value


def _reduced_shape(x: torch.Tensor, dim: int | None) -> list[int]:
    if dim is None or x.dim() == 0:
        return []
    dim = dim % x.dim()
    return [s for d, s in enumerate(x.shape) if d != dim]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true.

    Args:
        x: float tensor of any shape.
        mask: bool (or numeric) tensor of ``x``'s shape or broadcastable to it.
        dim: reduce along this dim (negative counts from the end); None reduces all of ``x``.

    Returns:
        float32 (float64 for float64 ``x``): a 0-d tensor for ``dim=None``, else ``x.shape``
        without ``dim``. An output with no selected element is 0 and passes 0 gradient.
        ``d out / d x_i = mask_i / count``.
    """
    op = "masked_mean"
    x, mask = _inputs(op, x, mask)
    dim = _dim(op, x, dim)
    return torch.ops.rlengine.masked_mean.default(x, mask, dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, *,
               unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the positions where ``mask`` is true, around their mean.

    Two-pass in float64 (the mean, then the squared deviations from it), so a large common
    offset (``x = 1e6 + noise``) keeps the variance of the noise.

    Args:
        x: float tensor of any shape.
        mask: bool (or numeric) tensor of ``x``'s shape or broadcastable to it.
        dim: reduce along this dim (negative counts from the end); None reduces all of ``x``.
        unbiased: divide by ``count - 1`` (Bessel's correction, as TRL's ``masked_var`` and the
            PPO implementations built on it), else by ``count``.

    Returns:
        float32 (float64 for float64 ``x``), shaped as ``masked_mean``'s. 0 where fewer than two
        positions are selected (``unbiased``) or none (TRL raises or gives NaN there); NaN or inf
        at a selected position makes that output NaN.
    """
    op = "masked_var"
    x, mask = _inputs(op, x, mask)
    dim = _dim(op, x, dim)
    unbiased = _flag(op, "unbiased", unbiased)
    return torch.ops.rlengine.masked_var.default(x, mask, dim, unbiased)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with the mean and variance of all its masked positions (PPO's advantage
    whitening over the whole batch).

    ``out = (x - mean) * rsqrt(var + eps)``, plus ``mean`` again if not ``shift_mean``, at the
    positions where ``mask`` is true; exactly 0 (with 0 gradient) elsewhere. ``mean`` and
    ``var`` are ``masked_mean(x, mask)`` and ``masked_var(x, mask, unbiased=unbiased)``.

    Args:
        x: float tensor of any shape.
        mask: bool (or numeric) tensor of ``x``'s shape or broadcastable to it.
        shift_mean: leave the whitened values centred at 0 (True) or add the mean back (False,
            TRL's ``shift_mean=False``: rescale only).
        unbiased: Bessel-corrected variance, as in ``masked_var``.
        eps: finite and >= 0, added to the variance. With ``eps=0`` a constant (or single)
            selection has zero variance and gives NaN, as the formula does.

    Returns:
        ``x.shape``, float32 (float64 for float64 ``x``). Differentiable through the mean and
        the variance: with ``s = (var + eps)^-1/2``, ``c`` the variance's divisor and ``g_bar``
        the masked mean of the incoming gradient ``g``,
        ``dx_i = s (g_i - g_bar) - s^3 (x_i - mean) / c * sum_j g_j (x_j - mean)``
        (``+ g_bar`` if not ``shift_mean``) at selected positions, 0 elsewhere.
    """
    op = "masked_whiten"
    x, mask = _inputs(op, x, mask)
    shift_mean = _flag(op, "shift_mean", shift_mean)
    unbiased = _flag(op, "unbiased", unbiased)
    eps = _checks.number(op, "eps", eps, low=0.0)
    return torch.ops.rlengine.masked_whiten.default(x, mask, shift_mean, unbiased, eps)


# ---- fake kernels -----------------------------------------------------------------------------

@torch.library.register_fake("rlengine::masked_mean")
def _(x, mask, dim):
    return x.new_empty(_reduced_shape(x, dim), dtype=_checks.result_dtype(x))


@torch.library.register_fake("rlengine::masked_mean_backward")
def _(grad, mask, dim, dtype):
    return mask.new_empty(mask.shape, dtype=dtype)


@torch.library.register_fake("rlengine::masked_var")
def _(x, mask, dim, unbiased):
    return x.new_empty(_reduced_shape(x, dim), dtype=_checks.result_dtype(x))


@torch.library.register_fake("rlengine::masked_var_backward")
def _(grad, x, mask, dim, unbiased):
    return x.new_empty(x.shape)


@torch.library.register_fake("rlengine::masked_whiten")
def _(x, mask, shift_mean, unbiased, eps):
    return x.new_empty(x.shape, dtype=_checks.result_dtype(x))


@torch.library.register_fake("rlengine::masked_whiten_backward")
def _(grad, x, mask, shift_mean, unbiased, eps):
    return x.new_empty(x.shape)


# ---- autograd ---------------------------------------------------------------------------------

def _mean_setup_context(ctx, inputs, output):
    x, mask, dim = inputs
    ctx.save_for_backward(mask)
    ctx.dim = dim
    ctx.x_dtype = x.dtype


def _mean_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    (mask,) = ctx.saved_tensors
    grad_x = torch.ops.rlengine.masked_mean_backward.default(grad, mask, ctx.dim, ctx.x_dtype)
    return grad_x, None, None


def _var_setup_context(ctx, inputs, output):
    x, mask, dim, unbiased = inputs
    ctx.save_for_backward(x, mask)
    ctx.dim = dim
    ctx.unbiased = unbiased


def _var_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    x, mask = ctx.saved_tensors
    grad_x = torch.ops.rlengine.masked_var_backward.default(grad, x, mask, ctx.dim, ctx.unbiased)
    return grad_x, None, None, None


def _whiten_setup_context(ctx, inputs, output):
    x, mask, shift_mean, unbiased, eps = inputs
    ctx.save_for_backward(x, mask)
    ctx.shift_mean = shift_mean
    ctx.unbiased = unbiased
    ctx.eps = eps


def _whiten_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    x, mask = ctx.saved_tensors
    grad_x = torch.ops.rlengine.masked_whiten_backward.default(
        grad, x, mask, ctx.shift_mean, ctx.unbiased, ctx.eps)
    return grad_x, None, None, None, None


torch.library.register_autograd("rlengine::masked_mean", _mean_backward,
                                setup_context=_mean_setup_context)
torch.library.register_autograd("rlengine::masked_var", _var_backward,
                                setup_context=_var_setup_context)
torch.library.register_autograd("rlengine::masked_whiten", _whiten_backward,
                                setup_context=_whiten_setup_context)
