"""Advantages and returns: ``rlengine::gae`` and ``rlengine::discounted_returns``.

Kernels: csrc/cpu/gae.cpp. References: ``reference.gae``, ``reference.discounted_returns``.
"""

from __future__ import annotations

import torch

from rlengine.ops import _checks


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(op: str, rewards, mask, last_values, **others):
    """Validates [B, T] float rows, a same-shape mask and an optional [B] last_values; returns
    them (mask as bool) with every float input in one common dtype."""
    rewards = _checks.float_tensor(op, "rewards", rewards, ndim=2)
    floats = {"rewards": rewards}
    for name, t in others.items():
        t = _checks.float_tensor(op, name, t, ndim=2)
        _checks.shape(op, name, t, rewards.shape, "rewards.shape")
        floats[name] = t
    mask = _checks.mask(op, "mask", mask, rewards.shape)
    if last_values is not None:
        last_values = _checks.float_tensor(op, "last_values", last_values, ndim=1)
        _checks.shape(op, "last_values", last_values, rewards.shape[:1], "rewards.shape[0]")
        floats["last_values"] = last_values
    _checks.same_device(op, **floats, mask=mask)
    # Mixed precisions (bf16 values from the critic, fp32 rewards) meet in the wider dtype;
    # the casts are differentiable, so gradients come back in each input's own dtype.
    common = rewards.dtype
    for t in floats.values():
        common = torch.promote_types(common, t.dtype)
    cast = {name: t.to(common) for name, t in floats.items()}
    return cast, mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float, last_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation for a batch of rows, in one kernel call.

    Args:
        rewards, values: ``[B, T]`` float (any precision; mixed precisions are promoted).
        mask: ``[B, T]`` bool (or 0/1 numbers): the positions that are steps of the episode.
        gamma, lam: discount and GAE lambda, in [0, 1].
        last_values: optional ``[B]`` value after the last valid position of each row (to
            bootstrap a truncated episode); 0 if None (the episode ended).

    Returns:
        ``(advantages, returns)``, ``[B, T]`` float32 (float64 for float64 inputs).

    The rule: masked positions are skipped, not treated as steps (veRL's multi-turn
    convention, where tool or user tokens sit between the policy's tokens). For a valid
    position t, let t' be the next valid position of its row; then

        delta_t = r_t + gamma * V_t' - V_t,      A_t = delta_t + gamma * lam * A_t',
        returns_t = A_t + V_t,

    where, after the last valid position, V = last_values (or 0) and A = 0. Rewards and
    values at masked positions are never read; advantages and returns there are exactly 0.
    With a mask of all ones this is the textbook GAE. Differentiable w.r.t. rewards, values
    and last_values.
    """
    op = "gae"
    floats, mask = _rows(op, rewards, mask, last_values, values=values)
    gamma = _checks.number(op, "gamma", gamma, low=0.0, high=1.0)
    lam = _checks.number(op, "lam", lam, low=0.0, high=1.0)
    return torch.ops.rlengine.gae.default(floats["rewards"], floats["values"], mask,
                                          floats.get("last_values"), gamma, lam)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                       last_values: torch.Tensor | None = None) -> torch.Tensor:
    """Discounted returns over the valid positions of each row, in one kernel call.

    For a valid t with t' the next valid position of its row, ``G_t = r_t + gamma * G_t'``;
    after the last valid position G = last_values (or 0). Masked positions are skipped (their
    rewards are never read) and get exactly 0. Equal to ``gae(rewards, zeros, mask,
    gamma=gamma, lam=1).returns``. Returns ``[B, T]`` float32 (float64 for float64 rewards);
    differentiable w.r.t. rewards and last_values.
    """
    op = "discounted_returns"
    floats, mask = _rows(op, rewards, mask, last_values)
    gamma = _checks.number(op, "gamma", gamma, low=0.0, high=1.0)
    return torch.ops.rlengine.discounted_returns.default(floats["rewards"], mask,
                                                         floats.get("last_values"), gamma)


# ---- fake kernels -----------------------------------------------------------------------------

@torch.library.register_fake("rlengine::gae")
def _(rewards, values, mask, last_values, gamma, lam):
    dtype = _result_dtype(rewards)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape,
                                                                            dtype=dtype)


def _backward_dtype(*grads):
    return torch.float64 if any(g is not None and g.dtype == torch.float64 for g in grads) \
        else torch.float32


@torch.library.register_fake("rlengine::gae_backward")
def _(grad_advantages, grad_returns, mask, gamma, lam):
    dtype = _backward_dtype(grad_advantages, grad_returns)
    return (mask.new_empty(mask.shape, dtype=dtype), mask.new_empty(mask.shape, dtype=dtype),
            mask.new_empty(mask.shape[:1], dtype=dtype))


@torch.library.register_fake("rlengine::discounted_returns")
def _(rewards, mask, last_values, gamma):
    return rewards.new_empty(rewards.shape, dtype=_result_dtype(rewards))


@torch.library.register_fake("rlengine::discounted_returns_backward")
def _(grad_returns, mask, gamma):
    dtype = _backward_dtype(grad_returns)
    return mask.new_empty(mask.shape, dtype=dtype), mask.new_empty(mask.shape[:1], dtype=dtype)


# ---- autograd ---------------------------------------------------------------------------------

def _gae_setup_context(ctx, inputs, output):
    rewards, values, mask, last_values, gamma, lam = inputs
    ctx.save_for_backward(mask)
    ctx.gamma, ctx.lam = gamma, lam
    ctx.dtypes = (rewards.dtype, values.dtype, None if last_values is None else last_values.dtype)
    ctx.set_materialize_grads(False)


def _gae_backward(ctx, grad_advantages, grad_returns):
    (mask,) = ctx.saved_tensors
    if grad_advantages is None and grad_returns is None:
        return None, None, None, None, None, None
    g_rewards, g_values, g_last = torch.ops.rlengine.gae_backward.default(
        grad_advantages, grad_returns, mask, ctx.gamma, ctx.lam)
    rewards_dtype, values_dtype, last_dtype = ctx.dtypes
    return (g_rewards.to(rewards_dtype), g_values.to(values_dtype), None,
            None if last_dtype is None else g_last.to(last_dtype), None, None)


torch.library.register_autograd("rlengine::gae", _gae_backward, setup_context=_gae_setup_context)


def _returns_setup_context(ctx, inputs, output):
    rewards, mask, last_values, gamma = inputs
    ctx.save_for_backward(mask)
    ctx.gamma = gamma
    ctx.dtypes = (rewards.dtype, None if last_values is None else last_values.dtype)
    ctx.set_materialize_grads(False)


def _returns_backward(ctx, grad_returns):
    (mask,) = ctx.saved_tensors
    if grad_returns is None:
        return None, None, None, None
    g_rewards, g_last = torch.ops.rlengine.discounted_returns_backward.default(
        grad_returns, mask, ctx.gamma)
    rewards_dtype, last_dtype = ctx.dtypes
    return (g_rewards.to(rewards_dtype), None,
            None if last_dtype is None else g_last.to(last_dtype), None)


torch.library.register_autograd("rlengine::discounted_returns", _returns_backward,
                                setup_context=_returns_setup_context)
