"""The engine's kernels inside veRL (tested with veRL 0.9.1).

    from rlengine.integrations import verl as rlengine_verl
    patch = rlengine_verl.apply()          # every part; or apply(gae=True) for one
    ...                                    # veRL's trainer, unchanged
    patch.revert()                         # or: with rlengine_verl.apply(): ...

Parts (keywords of ``apply``):
- ``gae``: ``verl.trainer.ppo.core_algos.compute_gae_advantage_return``. veRL's is a Python
  loop over time (one step of several tensor ops per response token); the engine's ``gae`` op
  runs the same recursion in one kernel. veRL's convention is the op's: a masked position inside
  a response is skipped, the recursion carries across it. veRL's loop also leaves, at a masked
  position, the advantage of the next valid position (0 after the last), then whitens every
  position: the shim reproduces both.
- ``masked_stats``: ``verl.utils.torch_functional.masked_mean`` and ``masked_var``.
- ``whiten``: ``verl.utils.torch_functional.masked_whiten``.

Each shim matches veRL's result dtype, its errors (``masked_var`` raises for a mask that sums to
0 or 1) and its epsilon (1e-8 added to the count in ``masked_mean`` and to the variance in
``masked_whiten``: below float32's resolution for any count >= 1, so the shim's exact count
differs from it by less than one float32 ulp). Calls the ops do not cover run veRL's own code,
counted in ``Patch.calls()``: a mask with values other than 0 and 1 (veRL then weights by it),
non-finite rewards or values (veRL's loop propagates them through ``NaN * 0``), a device
without the engine's kernel, non-float inputs, and ``masked_mean`` along an axis other than a
single int or None.
"""

from __future__ import annotations

import functools

import torch

from rlengine.integrations._patching import (
    Patch,
    Replacement,
    Shim,
    apply_replacements,
    check_version,
    choose_parts,
)

DISTRIBUTION = "verl"
TESTED = ("0.9.1", "0.10")  # [low, high)
PARTS = ("gae", "masked_stats", "whiten")

_CORE_ALGOS = "verl.trainer.ppo.core_algos"
_TORCH_FUNCTIONAL = "verl.utils.torch_functional"
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def apply(**parts: bool) -> Patch:
    """Replace veRL's functions with the engine's: all parts by default, or those named True
    (``apply(gae=True)``), or all but those named False. Idempotent; ``revert()`` undoes it."""
    check_version(DISTRIBUTION, "verl", *TESTED)
    chosen = choose_parts("verl", PARTS, parts)
    return apply_replacements("verl", _replacements(), chosen)


def patched(**parts: bool) -> Patch:
    """``with patched(): ...``: the parts applied inside the block only."""
    return apply(**parts)


def _replacements() -> list[Replacement]:
    return [
        Replacement("gae", _CORE_ALGOS, "compute_gae_advantage_return", _fast_gae),
        Replacement("masked_stats", _TORCH_FUNCTIONAL, "masked_mean", _fast_masked_mean),
        Replacement("masked_stats", _TORCH_FUNCTIONAL, "masked_var", _fast_masked_var),
        Replacement("whiten", _TORCH_FUNCTIONAL, "masked_whiten", _fast_masked_whiten),
    ]


# ---- eligibility ------------------------------------------------------------------------------

def _has_kernel(tensor: torch.Tensor, op: str) -> bool:
    return _kernel_registered(op, tensor.device.type)


@functools.cache
def _kernel_registered(op: str, device_type: str) -> bool:
    from rlengine._extension import has_kernel

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and has_kernel(op, key)


def _binary_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as bool where every entry is 0 or 1 (veRL's masks multiply, so any other value
    weights a position); None otherwise. Reductions only (the range; for a float mask also the
    sum and the nonzero count: entries within [0, 1] whose sum equals the number of nonzero ones
    are all 0 or 1), then one comparison; NaN fails the range test."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or mask.numel() == 0:
        return None
    low, high = torch.aminmax(mask)
    if not (bool(low >= 0) and bool(high <= 1)):
        return None
    if mask.is_floating_point() and float(mask.sum(dtype=torch.float64)) != float(
            torch.count_nonzero(mask)):
        return None
    return mask != 0


@functools.cache
def _result_dtype(original, *signature) -> torch.dtype:
    """The dtype ``original`` returns for arguments of these dtypes and ranks: found once per
    signature by running it on empty meta tensors (no data, no device work)."""
    args = []
    for item in signature:
        if isinstance(item, tuple):
            dtype, ndim = item
            args.append(torch.empty((1,) * ndim, dtype=dtype, device="meta"))
        else:
            args.append(item)
    return original(*args).dtype


# ---- masked statistics --------------------------------------------------------------------------

def _fast_masked_mean(original):
    from rlengine import ops

    def masked_mean(values, mask, axis=None):
        if not _stats_eligible(values, mask, "masked_mean") or not (
                axis is None or isinstance(axis, int)):
            return Shim.FALLBACK
        binary = _binary_mask(mask)
        if binary is None:
            return Shim.FALLBACK
        dtype = _result_dtype(original, (values.dtype, values.dim()), (mask.dtype, mask.dim()),
                              axis)
        mean = ops.masked_mean(values, binary, axis)
        return _verl_mean(mean, mask, binary, axis).to(dtype)
    return masked_mean


def _fast_masked_var(original):
    return _over_binary_mask(_verl_variance, "unbiased")


def _fast_masked_whiten(original):
    return _over_binary_mask(_whiten_every_position, "shift_mean")


def _over_binary_mask(compute, flag_name: str):
    """The shim of a veRL statistic ``f(values, mask, flag=True)`` (masked_var's ``unbiased``,
    masked_whiten's ``shift_mean``): ``compute(values, mask, binary_mask, flag)`` where the op
    covers the call (any other argument: veRL's own code, and its TypeError)."""
    def fast(values, mask, *flag, **named):
        if (len(flag) + len(named) > 1 or set(named) - {flag_name}
                or not _stats_eligible(values, mask, "masked_var")):
            return Shim.FALLBACK
        binary = _binary_mask(mask)
        if binary is None:
            return Shim.FALLBACK
        on = flag[0] if flag else named.get(flag_name, True)
        return compute(values, mask, binary, bool(on))
    return fast


def _mean_dtype(values: torch.Tensor, mask: torch.Tensor) -> torch.dtype:
    """The dtype of veRL's masked_mean(values, mask) over all positions."""
    from verl.utils import torch_functional

    original = getattr(torch_functional.masked_mean, "__rlengine_original__",
                       torch_functional.masked_mean)
    return _result_dtype(original, (values.dtype, values.dim()), (mask.dtype, mask.dim()), None)


def _whiten_every_position(values: torch.Tensor, mask: torch.Tensor, binary: torch.Tensor,
                           shift_mean: bool) -> torch.Tensor:
    """veRL's masked_whiten: the mean and the Bessel-corrected variance of the masked positions
    (the same errors for a mask summing to 0 or 1), applied to every position."""
    from rlengine import ops

    dtype = _mean_dtype(values, mask)
    var = _verl_variance(values, mask, binary, True)  # first: it raises for a count of 0 or 1
    mean = _verl_mean(ops.masked_mean(values, binary), mask, binary).to(dtype)
    whitened = values - mean
    whitened.mul_(torch.rsqrt(var + 1e-8))
    if not shift_mean:
        whitened += mean
    return whitened


def _verl_mean(mean: torch.Tensor, mask: torch.Tensor, binary: torch.Tensor,
               axis: int | None = None) -> torch.Tensor:
    """The op's exact mean rescaled to veRL's divisor, ``mask.sum() + 1e-8`` in the dtype torch
    gives it (float32 for an integer or bool mask, where the 1e-8 rounds away; float64 for a
    float64 mask, where it does not). Only float64 results can show the difference."""
    if mean.dtype != torch.float64:
        return mean
    count = binary.sum() if axis is None else binary.sum(axis)
    divisor = (mask.sum() if axis is None else mask.sum(axis)) + 1e-8
    return mean * (count.double() / divisor.double())


def _verl_variance(values: torch.Tensor, mask: torch.Tensor, binary: torch.Tensor,
                   unbiased: bool) -> torch.Tensor:
    """veRL's masked_var: the mean of squared deviations over count + 1e-8, times its Bessel
    factor ``mask.sum() / (mask.sum() - 1)``, computed as veRL does (a float32 tensor for an
    integer or float32 mask), and its errors for a mask summing to 0 or 1."""
    from rlengine import ops

    dtype = _mean_dtype(values, mask)
    variance = _verl_mean(ops.masked_var(values, binary, unbiased=False), mask, binary)
    if unbiased:
        mask_sum = mask.sum()  # of a 0/1 mask: the count
        count = float(mask_sum)
        if count == 0:
            raise ValueError("At least one element in the mask has to be 1.")
        if count == 1:
            raise ValueError("The sum of the mask is one, which can cause a division by zero.")
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance.to(dtype)


def _stats_eligible(values: object, mask: object, op: str) -> bool:
    return (isinstance(values, torch.Tensor) and isinstance(mask, torch.Tensor)
            and values.dtype in _FLOATS and mask.shape == values.shape
            and mask.device == values.device and values.numel() > 0
            and _has_kernel(values, op))


# ---- GAE --------------------------------------------------------------------------------------

def _fast_gae(original):
    from rlengine import ops

    def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
        rewards = token_level_rewards
        if not (isinstance(rewards, torch.Tensor) and isinstance(values, torch.Tensor)
                and isinstance(response_mask, torch.Tensor) and rewards.dim() == 2
                and rewards.shape == values.shape == response_mask.shape
                and rewards.dtype in _FLOATS and values.dtype in _FLOATS
                and rewards.device == values.device == response_mask.device
                and response_mask.dtype != torch.bool  # veRL's `1 - mask` raises for bool
                and _has_kernel(rewards, "gae")):
            return Shim.FALLBACK
        gamma, lam = _scalar(gamma), _scalar(lam)
        if gamma is None or lam is None or not (0 <= gamma <= 1 and 0 <= lam <= 1):
            return Shim.FALLBACK
        with torch.no_grad():
            binary = _binary_mask(response_mask)
            # one reduction each: a NaN or inf anywhere makes the sum non-finite (so does a
            # float32 overflow of finite values: veRL's own loop then, merely slower)
            if binary is None or not (bool(torch.isfinite(rewards.sum()))
                                      and bool(torch.isfinite(values.sum()))):
                return Shim.FALLBACK
            dtype = _gae_dtype(rewards, values, response_mask)
            advantages, _ = ops.gae(rewards, values, binary, gamma=gamma, lam=lam)
            advantages = _carry_into_masked(advantages, binary).to(dtype)
            returns = advantages + values
            # veRL whitens through its module attribute: a replacement that is neither veRL's
            # nor ours is honoured; otherwise the mask's check above is not repeated
            from verl.utils import torch_functional

            whiten = torch_functional.masked_whiten
            if getattr(whiten, "__rlengine_original__", whiten).__module__ == _TORCH_FUNCTIONAL:
                advantages = _whiten_every_position(advantages, response_mask, binary, True)
            else:
                advantages = whiten(advantages, response_mask)
        return advantages, returns
    return compute_gae_advantage_return


def _scalar(x) -> float | None:
    if isinstance(x, torch.Tensor):
        return float(x) if x.numel() == 1 else None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _gae_dtype(rewards, values, mask) -> torch.dtype:
    """The dtype of veRL's loop: rewards and values promoted, and a float mask too (it
    multiplies)."""
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    if mask.is_floating_point():
        dtype = torch.promote_types(dtype, mask.dtype)
    return dtype


def _carry_into_masked(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """veRL's loop leaves, at a masked position, the advantage of the next valid position of
    its row (0 when none follows). The op writes 0 there; for right padding only (no valid
    position after a masked one) that is already veRL's result."""
    if not bool((~mask[:, :-1] & mask[:, 1:]).any()):
        return advantages
    rows, steps = mask.shape
    positions = torch.arange(steps, device=mask.device).expand(rows, steps)
    next_valid = torch.where(mask, positions, steps)
    next_valid = next_valid.flip(1).cummin(1).values.flip(1)
    padded = torch.cat([advantages, advantages.new_zeros(rows, 1)], dim=1)
    return padded.gather(1, next_valid)
