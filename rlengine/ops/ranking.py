"""Ranking and preference losses: ``rlengine::sequence_scores``, ``rlengine::rrhf_rank_loss`` and
``rlengine::bt_loss``.

Kernels: csrc/cpu/ranking.cpp. References: ``reference.sequence_scores``,
``reference.rrhf_rank_loss`` and ``reference.bt_loss``.

RRHF (METHODS.md section 4) scores each of a query's K candidates by its length-normalized
log-probability (``sequence_scores`` over ``token_logprobs``) and ranks them with
``rrhf_rank_loss``; reward models train on ``bt_loss`` (METHODS.md section 1: margin, label
smoothing).
"""

from __future__ import annotations

import torch

from rlengine.ops import _checks

# ---- sequence_scores ----------------------------------------------------------------------------

def sequence_scores(token_logprobs: torch.Tensor, mask: torch.Tensor, *,
                    length_penalty: float = 1.0) -> torch.Tensor:
    """Score of each sequence: the sum of its masked token log-probs divided by
    ``(number of masked positions) ** length_penalty``.

    With ``length_penalty=1`` this is RRHF's length-normalized score p_i (the paper's formula:
    the real length, not the padded one); ``length_penalty=0`` gives the plain sum.

    Args:
        token_logprobs: ``[..., T]`` float32, bfloat16, float16 or float64 (e.g. the output of
            ``token_logprobs``); any leading dimensions.
        mask: the same shape; bool, or numeric with nonzero meaning True. Positions where it is
            False never contribute: not to the score, not to the length, and they get exactly 0
            gradient, even if they hold -inf or NaN.
        length_penalty: a finite real >= 0.

    Returns:
        ``token_logprobs.shape[:-1]`` scores in float32 (float64 for float64 input). A row with
        no masked position scores 0 and passes no gradient. Differentiable with respect to
        ``token_logprobs``; the gradient comes back in its dtype.
    """
    op = "sequence_scores"
    token_logprobs = _checks.float_tensor(op, "token_logprobs", token_logprobs)
    if token_logprobs.dim() < 1:
        _checks._fail(op, "token_logprobs must have a token dimension, got a 0-d tensor")
    mask = _checks.mask(op, "mask", mask, token_logprobs.shape)
    _checks.same_device(op, token_logprobs=token_logprobs, mask=mask)
    length_penalty = _checks.number(op, "length_penalty", length_penalty, low=0.0)
    return torch.ops.rlengine.sequence_scores.default(token_logprobs, mask, length_penalty)


@torch.library.register_fake("rlengine::sequence_scores")
def _(token_logprobs, mask, length_penalty):
    return token_logprobs.new_empty(token_logprobs.shape[:-1],
                                    dtype=_checks.result_dtype(token_logprobs))


@torch.library.register_fake("rlengine::sequence_scores_backward")
def _(grad_scores, mask, length_penalty, dtype):
    return mask.new_empty(mask.shape, dtype=dtype)


def _sequence_scores_setup(ctx, inputs, output):
    token_logprobs, mask, length_penalty = inputs
    ctx.save_for_backward(mask)
    ctx.length_penalty = length_penalty
    ctx.dtype = token_logprobs.dtype


def _sequence_scores_backward(ctx, grad_scores):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    (mask,) = ctx.saved_tensors
    grad = torch.ops.rlengine.sequence_scores_backward.default(
        grad_scores, mask, ctx.length_penalty, ctx.dtype)
    return grad, None, None


torch.library.register_autograd("rlengine::sequence_scores", _sequence_scores_backward,
                                setup_context=_sequence_scores_setup)


# ---- rrhf_rank_loss -----------------------------------------------------------------------------

def rrhf_rank_loss(scores: torch.Tensor, rewards: torch.Tensor,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """RRHF's ranking loss of each query (METHODS.md section 4):
    ``L_rank = sum over candidate pairs (i, j) with r_i < r_j of max(0, p_i - p_j)``.

    Args:
        scores: ``[B, K]`` float32, bfloat16, float16 or float64: p_i of each of a query's K
            candidates (typically ``sequence_scores``). Differentiable.
        rewards: ``[B, K]`` float tensor (any float dtype, compared exactly in it); not
            differentiable (its gradient is None).
        valid: optional ``[B, K]`` bool (or numeric, nonzero = True) marking the candidates that
            exist; pairs with an invalid candidate never count, whatever its score or reward
            (queries with fewer than K candidates are padded this way).

    Returns:
        ``[B]`` float32 (float64 for float64 scores), one loss per query; reduce it as the
        trainer needs (RRHF sums over the pairs of one query). Ties (r_i == r_j) and pairs with
        a NaN reward contribute nothing; at p_i == p_j the subgradient is 0 (as ``torch.relu``).
        A query with fewer than two valid candidates has loss 0 and gradient 0; B = 0 and K of 0
        or 1 are fine. Cost O(K^2) per query, parallel over queries.
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
    return scores.new_empty((scores.shape[0],), dtype=_checks.result_dtype(scores))


@torch.library.register_fake("rlengine::rrhf_rank_loss_backward")
def _(grad_loss, scores, rewards, valid):
    return scores.new_empty(scores.shape)


def _rrhf_setup(ctx, inputs, output):
    scores, rewards, valid = inputs
    ctx.save_for_backward(scores, rewards, valid)


def _rrhf_backward(ctx, grad_loss):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    scores, rewards, valid = ctx.saved_tensors
    grad = torch.ops.rlengine.rrhf_rank_loss_backward.default(grad_loss, scores, rewards, valid)
    return grad, None, None


torch.library.register_autograd("rlengine::rrhf_rank_loss", _rrhf_backward,
                                setup_context=_rrhf_setup)


# ---- bt_loss ------------------------------------------------------------------------------------

def _scalar_or_tensor(op: str, name: str, value: object, chosen: torch.Tensor, *,
                      low: float | None = None, high: float | None = None,
                      allow_integer: bool = False) -> tuple[torch.Tensor | None, float]:
    """A per-pair argument as the schema takes it: (tensor or None, Python value)."""
    if not isinstance(value, torch.Tensor):
        return None, _checks.number(op, name, value, low=low, high=high)
    if allow_integer and not value.dtype.is_floating_point and not value.dtype.is_complex \
            and value.dtype != torch.bool:
        value = value.to(_checks.result_dtype(chosen))
    t = _checks.float_tensor(op, name, value)
    if t.dim() != 0 and t.shape != chosen.shape:
        _checks._fail(op, f"{name} must be a real number, a 0-d tensor or a tensor of the shape "
                          f"of chosen {tuple(chosen.shape)}, got shape {tuple(t.shape)}")
    return t, 0.0


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, *,
            margin: torch.Tensor | float | None = None,
            label_smoothing: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of each preference pair, with margin and label smoothing.

    ``delta = chosen - rejected - margin`` and
    ``loss = (1 - a) * softplus(-delta) + a * softplus(delta)`` with ``a = label_smoothing``:
    ``-log sigmoid(delta)`` for a = 0; the soft label of METHODS.md section 1 for a > 0; the
    adaptive margin (which may be negative) with ``margin``.

    Args:
        chosen, rejected: rewards of the chosen and rejected responses, the same shape (any,
            typically ``[B]``) and the same float dtype. Differentiable.
        margin: None (no margin), a Python real, or a tensor of chosen's shape or 0-d (float,
            or integer, which is converted to the loss's dtype). A float tensor margin that
            requires grad gets ``-dloss/ddelta`` (summed for a 0-d margin).
        label_smoothing: a real in [0, 1], or a float tensor of chosen's shape or 0-d (per-pair
            smoothing, e.g. only on pairs with negative preference strength). Its gradient,
            when it requires grad, is ``dloss/da = softplus(delta) - softplus(-delta) = delta``.
            Tensor values are checked to lie in [0, 1] where data checks run (CPU tensors in
            eager mode, other devices with RLENGINE_CHECK_INPUTS=1); elsewhere (under
            torch.compile) values outside [0, 1] are not rejected: the formula is applied
            as written.

    Returns:
        The per-pair loss with chosen's shape, in float32 (float64 for float64 input); reduce it
        as the trainer needs (usually ``.mean()``).

    Numerics: computed as ``log1p(exp(-|delta|)) + (1 - a) max(-delta, 0) + a max(delta, 0)``,
    exact in both tails (|delta| = 1e4 gives a finite loss and gradient); the gradient at
    delta = 0 is ``a - 1/2``. Infinite deltas follow the formula's IEEE arithmetic as the
    reference does (e.g. delta = +inf with a = 0 gives 0 * inf = NaN); a NaN gives NaN.
    """
    op = "bt_loss"
    chosen = _checks.float_tensor(op, "chosen", chosen)
    rejected = _checks.float_tensor(op, "rejected", rejected)
    if rejected.dtype != chosen.dtype:
        _checks._fail(op, f"rejected must have the dtype of chosen ({chosen.dtype}), got "
                          f"{rejected.dtype}", TypeError)
    _checks.shape(op, "rejected", rejected, chosen.shape, "chosen.shape")
    if margin is None:
        margin_tensor, margin_value = None, 0.0
    else:
        margin_tensor, margin_value = _scalar_or_tensor(op, "margin", margin, chosen,
                                                        allow_integer=True)
    smoothing_tensor, smoothing_value = _scalar_or_tensor(
        op, "label_smoothing", label_smoothing, chosen, low=0.0, high=1.0)
    _checks.same_device(op, chosen=chosen, rejected=rejected, margin=margin_tensor,
                        label_smoothing=smoothing_tensor)
    if smoothing_tensor is not None and _checks.data_checks_enabled(smoothing_tensor):
        _check_smoothing_range(smoothing_tensor)
    return torch.ops.rlengine.bt_loss.default(chosen, rejected, margin_tensor, smoothing_tensor,
                                              margin_value, smoothing_value)


def _check_smoothing_range(smoothing: torch.Tensor) -> None:
    values = smoothing.detach()
    where = _checks.first_bad_index(~((values >= 0) & (values <= 1)))  # NaN is outside too
    if where is not None:
        index = list(where) if where else ""
        _checks._fail("bt_loss", f"label_smoothing{index} = {float(values[where])} is outside "
                                 "[0, 1]")


@torch.library.register_fake("rlengine::bt_loss")
def _(chosen, rejected, margin, label_smoothing, margin_value, label_smoothing_value):
    return chosen.new_empty(chosen.shape, dtype=_checks.result_dtype(chosen))


@torch.library.register_fake("rlengine::bt_loss_backward")
def _(grad_loss, chosen, rejected, margin, label_smoothing, margin_value, label_smoothing_value):
    dtype = _checks.result_dtype(chosen)
    grad_smoothing_shape = chosen.shape if label_smoothing is not None else (0,)
    return (chosen.new_empty(chosen.shape, dtype=dtype),
            chosen.new_empty(grad_smoothing_shape, dtype=dtype))


def _bt_setup(ctx, inputs, output):
    chosen, rejected, margin, label_smoothing, margin_value, label_smoothing_value = inputs
    ctx.save_for_backward(chosen, rejected, margin, label_smoothing)
    ctx.margin_value = margin_value
    ctx.label_smoothing_value = label_smoothing_value


def _as_gradient_of(grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad (per pair) as the gradient of t: summed for a 0-d t, in t's dtype."""
    if grad.shape != t.shape:
        grad = grad.sum()
    return grad.to(t.dtype)


def _bt_backward(ctx, grad_loss):
    needs_chosen, needs_rejected, needs_margin, needs_smoothing = ctx.needs_input_grad[:4]
    if not (needs_chosen or needs_rejected or needs_margin or needs_smoothing):
        return None, None, None, None, None, None
    chosen, rejected, margin, label_smoothing = ctx.saved_tensors
    grad_delta, grad_smoothing = torch.ops.rlengine.bt_loss_backward.default(
        grad_loss, chosen, rejected, margin, label_smoothing, ctx.margin_value,
        ctx.label_smoothing_value)
    # delta = chosen - rejected - margin: rejected and margin share -grad_delta.
    negated = -grad_delta if (needs_rejected or needs_margin) else None
    return (_as_gradient_of(grad_delta, chosen) if needs_chosen else None,
            _as_gradient_of(negated, rejected) if needs_rejected else None,
            _as_gradient_of(negated, margin) if needs_margin else None,
            _as_gradient_of(grad_smoothing, label_smoothing) if needs_smoothing else None,
            None, None)


torch.library.register_autograd("rlengine::bt_loss", _bt_backward, setup_context=_bt_setup)
