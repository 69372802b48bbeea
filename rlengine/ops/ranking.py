"""Ranking and preference losses: ``rlengine::sequence_scores``, ``rlengine::rrhf_rank_loss``
and ``rlengine::bt_loss``.

Kernels: csrc/cpu/ranking.cpp. References: ``reference.sequence_scores``,
``reference.rrhf_rank_loss``, ``reference.bt_loss``.
"""

from __future__ import annotations

import torch

from rlengine.ops import _checks


def _result_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- sequence_scores ----------------------------------------------------------------------------

def sequence_scores(token_logprobs: torch.Tensor, mask: torch.Tensor, *,
                    length_penalty: float = 1.0) -> torch.Tensor:
    """Length-normalized sequence log-probability: RRHF's score p_i.

    Args:
        token_logprobs: ``[..., T]`` float (e.g. the output of ``token_logprobs``).
        mask: ``[..., T]`` bool (or 0/1 numbers): the response tokens that count.
        length_penalty: exponent >= 0 of the length: 1 gives the mean (RRHF's formula), 0 the
            plain sum.

    Returns:
        ``[...]`` float32 (float64 for float64 input): sum of the selected log-probs divided
        by (number selected) ** length_penalty. A row with nothing selected scores 0.
        Unselected positions are never read (a -inf or NaN there does not matter) and get 0
        gradient.
    """
    op = "sequence_scores"
    token_logprobs = _checks.float_tensor(op, "token_logprobs", token_logprobs)
    if token_logprobs.dim() < 1:
        _checks._fail(op, "token_logprobs must have a sequence dimension, got a 0-d tensor")
    mask = _checks.mask(op, "mask", mask, token_logprobs.shape)
    _checks.same_device(op, token_logprobs=token_logprobs, mask=mask)
    length_penalty = _checks.number(op, "length_penalty", length_penalty, low=0.0)
    return torch.ops.rlengine.sequence_scores.default(token_logprobs, mask, length_penalty)


@torch.library.register_fake("rlengine::sequence_scores")
def _(token_logprobs, mask, length_penalty):
    return token_logprobs.new_empty(token_logprobs.shape[:-1],
                                    dtype=_result_dtype(token_logprobs))


@torch.library.register_fake("rlengine::sequence_scores_backward")
def _(grad_scores, mask, length_penalty, dtype):
    return mask.new_empty(mask.shape, dtype=dtype)


def _scores_setup_context(ctx, inputs, output):
    token_logprobs, mask, length_penalty = inputs
    ctx.save_for_backward(mask)
    ctx.length_penalty = length_penalty
    ctx.dtype = token_logprobs.dtype


def _scores_backward(ctx, grad_scores):
    (mask,) = ctx.saved_tensors
    grad = torch.ops.rlengine.sequence_scores_backward.default(
        grad_scores, mask, ctx.length_penalty, ctx.dtype)
    return grad, None, None


torch.library.register_autograd("rlengine::sequence_scores", _scores_backward,
                                setup_context=_scores_setup_context)


# ---- rrhf_rank_loss -----------------------------------------------------------------------------

def rrhf_rank_loss(scores: torch.Tensor, rewards: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """RRHF's ranking loss, for any number of queries at once.

    Args:
        scores: ``[B, K]`` float: the score p of each of the K candidates of each query
            (e.g. ``sequence_scores(...).view(B, K)``); differentiable.
        rewards: ``[B, K]`` float: their rewards (not differentiated).
        valid: optional ``[B, K]`` bool: candidates to use (queries may have fewer than K).

    Returns:
        ``[B]`` float32 (float64 for float64 scores): for each query, the sum over pairs of
        valid candidates (i, j) with r_i < r_j of max(0, p_i - p_j): a worse candidate must not
        score higher than a better one. Ties in reward, and NaN rewards, add nothing; at
        p_i == p_j the gradient is 0 (as torch.relu). Total RRHF loss = this + the SFT loss of
        the best candidate.
    """
    op = "rrhf_rank_loss"
    scores = _checks.float_tensor(op, "scores", scores, ndim=2)
    rewards = _checks.float_tensor(op, "rewards", rewards)
    _checks.shape(op, "rewards", rewards, scores.shape, "scores.shape")
    if valid is not None:
        valid = _checks.mask(op, "valid", valid, scores.shape)
    _checks.same_device(op, scores=scores, rewards=rewards, valid=valid)
    return torch.ops.rlengine.rrhf_rank_loss.default(scores, rewards, valid)


@torch.library.register_fake("rlengine::rrhf_rank_loss")
def _(scores, rewards, valid):
    return scores.new_empty(scores.shape[:1], dtype=_result_dtype(scores))


@torch.library.register_fake("rlengine::rrhf_rank_loss_backward")
def _(grad_loss, scores, rewards, valid):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


def _rank_setup_context(ctx, inputs, output):
    scores, rewards, valid = inputs
    ctx.save_for_backward(scores, rewards, valid)


def _rank_backward(ctx, grad_loss):
    scores, rewards, valid = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.rlengine.rrhf_rank_loss_backward.default(grad_loss, scores, rewards, valid)
    return grad, None, None


torch.library.register_autograd("rlengine::rrhf_rank_loss", _rank_backward,
                                setup_context=_rank_setup_context)


# ---- bt_loss --------------------------------------------------------------------------------------

def _scalar_or_tensor(op: str, name: str, value, shape, *, low=None, high=None):
    """(tensor or None, scalar) for an argument that is a real number or a tensor of the pairs'
    shape (a 0-d tensor is broadcast to it)."""
    if isinstance(value, torch.Tensor):
        t = _checks.float_tensor(op, name, value)
        if t.dim() == 0:
            t = t.expand(shape)
        _checks.shape(op, name, t, shape, "chosen.shape")
        if (low is not None or high is not None) and _checks.data_checks_enabled(t) and t.numel():
            outside = ~((t >= low) & (t <= high))
            where = _checks.first_bad_index(outside)
            if where is not None:
                _checks._fail(op, f"{name}{list(where)} = {float(t[where])} is outside "
                                  f"[{low}, {high}]")
        return t, 0.0  # the kernel reads it in double, whatever its dtype
    return None, _checks.number(op, name, value, low=low, high=high)


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, *,
            margin: torch.Tensor | float | None = None,
            label_smoothing: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley-Terry preference loss per pair, with margin and label smoothing.

    With ``delta = chosen - rejected - margin`` and ``a = label_smoothing``:
    ``loss = (1 - a) * softplus(-delta) + a * softplus(delta)``, i.e.
    ``-(1 - a) log sigmoid(delta) - a log sigmoid(-delta)``. a = 0 is the plain BT loss; a
    per-pair margin is the adaptive margin of Secrets of RLHF II (it may be negative); a
    per-pair smoothing tensor allows smoothing only some pairs (e.g. where strength < 0).

    Args:
        chosen, rejected: rewards of the two responses, same shape, float (different
            precisions are promoted).
        margin: None, a real number, or a tensor of the same shape (or 0-d).
        label_smoothing: a real in [0, 1], or such a tensor (values outside [0, 1] are an error).

    Returns:
        The per-pair loss, float32 (float64 for float64 input), computed stably for any delta
        (exact in both tails; |delta| of 1e4 and more are fine). Differentiable w.r.t. chosen,
        rejected, and margin and label_smoothing when they are tensors.
    """
    op = "bt_loss"
    chosen = _checks.float_tensor(op, "chosen", chosen)
    rejected = _checks.float_tensor(op, "rejected", rejected)
    _checks.shape(op, "rejected", rejected, chosen.shape, "chosen.shape")
    dtype = torch.promote_types(chosen.dtype, rejected.dtype)
    margin_tensor, margin_value = (None, 0.0) if margin is None else \
        _scalar_or_tensor(op, "margin", margin, chosen.shape)
    smoothing_tensor, smoothing_value = _scalar_or_tensor(
        op, "label_smoothing", label_smoothing, chosen.shape, low=0.0, high=1.0)
    _checks.same_device(op, chosen=chosen, rejected=rejected, margin=margin_tensor,
                        label_smoothing=smoothing_tensor)
    return torch.ops.rlengine.bt_loss.default(chosen.to(dtype), rejected.to(dtype), margin_tensor,
                                              smoothing_tensor, margin_value, smoothing_value)


@torch.library.register_fake("rlengine::bt_loss")
def _(chosen, rejected, margin, label_smoothing, margin_value, label_smoothing_value):
    return chosen.new_empty(chosen.shape, dtype=_result_dtype(chosen))


@torch.library.register_fake("rlengine::bt_loss_backward")
def _(grad_loss, chosen, rejected, margin, label_smoothing, margin_value, label_smoothing_value):
    dtype = _result_dtype(chosen)
    return chosen.new_empty(chosen.shape, dtype=dtype), chosen.new_empty(chosen.shape, dtype=dtype)


def _bt_setup_context(ctx, inputs, output):
    chosen, rejected, margin, label_smoothing, margin_value, label_smoothing_value = inputs
    ctx.save_for_backward(chosen, rejected, margin, label_smoothing)
    ctx.values = (margin_value, label_smoothing_value)


def _bt_backward(ctx, grad_loss):
    chosen, rejected, margin, label_smoothing = ctx.saved_tensors
    grad_delta, grad_smoothing = torch.ops.rlengine.bt_loss_backward.default(
        grad_loss, chosen, rejected, margin, label_smoothing, *ctx.values)
    needs = ctx.needs_input_grad
    return (grad_delta.to(chosen.dtype) if needs[0] else None,
            (-grad_delta).to(rejected.dtype) if needs[1] else None,
            (-grad_delta).to(margin.dtype) if needs[2] else None,
            grad_smoothing.to(label_smoothing.dtype) if needs[3] else None,
            None, None)


torch.library.register_autograd("rlengine::bt_loss", _bt_backward, setup_context=_bt_setup_context)
