"""Generalized advantage estimation and discounted returns over masked rows:
``rlengine::gae`` and ``rlengine::discounted_returns``.

Kernels: csrc/cpu/gae.cpp. References: ``reference.gae`` and ``reference.discounted_returns``.
"""

from __future__ import annotations

import torch

from rlengine.ops import _checks

GAE = "gae"
RETURNS = "discounted_returns"


def _float_inputs(op: str, rewards: object, values: object | None, mask: object,
                  last_values: object | None):
    """Validated (rewards, values, mask, last_values), the float ones in their common dtype."""
    rewards = _checks.float_tensor(op, "rewards", rewards, ndim=2)
    if values is not None:
        values = _checks.float_tensor(op, "values", values, ndim=2)
        _checks.shape(op, "values", values, rewards.shape, "rewards.shape")
    mask = _checks.mask(op, "mask", mask, rewards.shape)
    if last_values is not None:
        last_values = _checks.float_tensor(op, "last_values", last_values, ndim=1)
        _checks.shape(op, "last_values", last_values, rewards.shape[:1], "rewards.shape[:1]")
    _checks.same_device(op, rewards=rewards, values=values, mask=mask, last_values=last_values)
    dtype = rewards.dtype
    for t in (values, last_values):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    return cast(rewards), cast(values), mask, cast(last_values)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float, last_values: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the valid positions of each row, in one kernel.

    Masked positions are skipped, not treated as time steps. For a row whose valid positions
    (``mask`` true) are ``t_1 < t_2 < ... < t_n``, with ``V`` the values, ``r`` the rewards and,
    past the last valid position, ``V_(t_(n+1)) = last_values`` (0 if None) and
    ``A_(t_(n+1)) = 0``:

        delta_(t_i) = r_(t_i) + gamma * V_(t_(i+1)) - V_(t_i)
        A_(t_i)     = delta_(t_i) + gamma * lam * A_(t_(i+1))
        returns_(t_i) = A_(t_i) + V_(t_i)

    So gamma and lam are applied once between two consecutive valid positions, however many
    masked positions lie between them (the multi-turn convention of veRL, where tool and
    observation tokens inside a response are masked out). With an all-true mask and no
    last_values this is the textbook loop of TRL and OpenRLHF.

    Args:
        rewards: ``[B, T]`` float32, bfloat16, float16 or float64, per-token rewards.
        values: ``[B, T]`` float, the critic's values at each position.
        mask: ``[B, T]`` bool (a numeric mask counts nonzero entries as true).
        gamma: discount, a finite number in ``[0, 1]``.
        lam: GAE lambda, a finite number in ``[0, 1]``.
        last_values: optional ``[B]`` float, the bootstrap value after each row's last valid
            position (e.g. the critic's value of the state after a truncated response).

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` in float32 (float64 when the inputs are
        float64), exactly 0 at masked positions. Mixed input dtypes are promoted to a common one
        first. The results are differentiable w.r.t. rewards, values and last_values; the
        gradients come back in each input's dtype.

    Rewards and values at masked positions are never read into a result (NaN or inf there
    changes nothing) and get exactly 0 gradient; incoming gradients at masked positions are
    ignored. A row with no valid position is all zeros, and its last_values gets 0 gradient.
    The recurrence is carried in float64 whatever the input dtype, so long rows stay accurate.
    """
    rewards, values, mask, last_values = _float_inputs(GAE, rewards, values, mask, last_values)
    gamma = _checks.number(GAE, "gamma", gamma, low=0.0, high=1.0)
    lam = _checks.number(GAE, "lam", lam, low=0.0, high=1.0)
    return torch.ops.rlengine.gae.default(rewards, values, mask, last_values, gamma, lam)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float,
                       last_values: torch.Tensor | None = None) -> torch.Tensor:
    """Discounted returns over the valid positions of each row, in one kernel.

    For a row whose valid positions are ``t_1 < ... < t_n``, with ``G_(t_(n+1)) = last_values``
    (0 if None):

        G_(t_i) = r_(t_i) + gamma * G_(t_(i+1))

    and 0 at masked positions, which are skipped rather than counted as steps (as in ``gae``;
    this equals ``gae(rewards, zeros, mask, gamma=gamma, lam=1, last_values=...)``'s returns).

    Args:
        rewards: ``[B, T]`` float32, bfloat16, float16 or float64.
        mask: ``[B, T]`` bool (a numeric mask counts nonzero entries as true).
        gamma: discount, a finite number in ``[0, 1]``.
        last_values: optional ``[B]`` float, the bootstrap return after each row's last valid
            position.

    Returns:
        ``[B, T]`` returns in float32 (float64 for float64 inputs), differentiable w.r.t.
        rewards and last_values (gradients in each input's dtype). Rewards at masked positions
        are never read into a result and get exactly 0 gradient.
    """
    rewards, _, mask, last_values = _float_inputs(RETURNS, rewards, None, mask, last_values)
    gamma = _checks.number(RETURNS, "gamma", gamma, low=0.0, high=1.0)
    return torch.ops.rlengine.discounted_returns.default(rewards, mask, last_values, gamma)


# ---- fake kernels ------------------------------------------------------------------------------

def _gradient_dtype(*grads: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(g is not None and g.dtype == torch.float64 for g in grads) \
        else torch.float32


@torch.library.register_fake("rlengine::gae")
def _(rewards, values, mask, last_values, gamma, lam):
    dtype = _checks.result_dtype(rewards.dtype)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape,
                                                                            dtype=dtype)


@torch.library.register_fake("rlengine::gae_backward")
def _(grad_advantages, grad_returns, mask, gamma, lam):
    dtype = _gradient_dtype(grad_advantages, grad_returns)
    return (mask.new_empty(mask.shape, dtype=dtype), mask.new_empty(mask.shape, dtype=dtype),
            mask.new_empty(mask.shape[:1], dtype=dtype))


@torch.library.register_fake("rlengine::discounted_returns")
def _(rewards, mask, last_values, gamma):
    return rewards.new_empty(rewards.shape, dtype=_checks.result_dtype(rewards.dtype))


@torch.library.register_fake("rlengine::discounted_returns_backward")
def _(grad_returns, mask, gamma):
    dtype = _gradient_dtype(grad_returns)
    return mask.new_empty(mask.shape, dtype=dtype), mask.new_empty(mask.shape[:1], dtype=dtype)


# ---- autograd ----------------------------------------------------------------------------------

def _cast(grad: torch.Tensor, like: torch.dtype | None, needed: bool) -> torch.Tensor | None:
    return grad.to(like) if needed and like is not None else None


def _setup_gae(ctx, inputs, output):
    rewards, values, mask, last_values, gamma, lam = inputs
    ctx.save_for_backward(mask)
    ctx.gamma, ctx.lam = gamma, lam
    ctx.dtypes = (rewards.dtype, values.dtype,
                  None if last_values is None else last_values.dtype)
    ctx.set_materialize_grads(False)


def _gae_backward(ctx, grad_advantages, grad_returns):
    if grad_advantages is None and grad_returns is None:
        return None, None, None, None, None, None
    (mask,) = ctx.saved_tensors
    grad_rewards, grad_values, grad_last = torch.ops.rlengine.gae_backward.default(
        grad_advantages, grad_returns, mask, ctx.gamma, ctx.lam)
    rewards_dtype, values_dtype, last_dtype = ctx.dtypes
    return (_cast(grad_rewards, rewards_dtype, ctx.needs_input_grad[0]),
            _cast(grad_values, values_dtype, ctx.needs_input_grad[1]), None,
            _cast(grad_last, last_dtype, ctx.needs_input_grad[3]), None, None)


def _setup_returns(ctx, inputs, output):
    rewards, mask, last_values, gamma = inputs
    ctx.save_for_backward(mask)
    ctx.gamma = gamma
    ctx.dtypes = (rewards.dtype, None if last_values is None else last_values.dtype)
    ctx.set_materialize_grads(False)


def _returns_backward(ctx, grad_returns):
    if grad_returns is None:
        return None, None, None, None
    (mask,) = ctx.saved_tensors
    grad_rewards, grad_last = torch.ops.rlengine.discounted_returns_backward.default(
        grad_returns, mask, ctx.gamma)
    rewards_dtype, last_dtype = ctx.dtypes
    return (_cast(grad_rewards, rewards_dtype, ctx.needs_input_grad[0]), None,
            _cast(grad_last, last_dtype, ctx.needs_input_grad[2]), None)


torch.library.register_autograd("rlengine::gae", _gae_backward, setup_context=_setup_gae)
torch.library.register_autograd("rlengine::discounted_returns", _returns_backward,
                                setup_context=_setup_returns)
