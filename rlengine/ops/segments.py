"""Segment-level rewards (METHODS.md section 3): entropy segmentation, segment reduction and
location-aware dense rewards: ``rlengine::entropy_segments``, ``rlengine::segment_reduce`` and
``rlengine::segment_rewards_to_dense``.

Kernels: csrc/cpu/segments.cpp. References: ``reference.entropy_segments``,
``reference.segment_reduce``, ``reference.location_normalizer`` and
``reference.segment_rewards_to_dense``.

The three ops share one representation of a segmentation: ``segment_ids [B, T]`` (int64; the
segment of each position, ``-1`` where a position belongs to none) and ``counts [B]`` (int64;
the number of segments of each row). ``entropy_segments`` produces it; the other two consume it.
The kernels validate it while they use it, whatever its origin: ``0 <= counts[b] <= T``, and
every id is ``-1`` or in ``[0, counts[b])``; a violation is a ``ValueError`` naming the row,
position and value, never an out-of-bounds access. On CUDA that check would cost a host
synchronization per call, so it runs only with ``RLENGINE_CHECK_INPUTS=1`` (here, in the
wrappers, with the CPU kernel's messages); otherwise the CUDA kernels clamp ``counts[b]`` into
``[0, T]`` (``[0, min(T, Kmax)]`` for ``segment_rewards_to_dense``) and treat any other id as
``-1``, and still never read or write out of bounds. Ids need not be non-decreasing along a row
(segments are labels; a segment's tokens need not be adjacent and its *last* token is its
highest position), and a segment may have no tokens at all (it then contributes nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from rlengine.ops import _checks

Reduce = Literal["end_mean", "end", "sum", "mean"]
Spread = Literal["even", "repeat", "end"]
REDUCES = get_args(Reduce)
SPREADS = get_args(Spread)


def _segments(op: str, segment_ids: object, counts: object, batch: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """segment_ids [B, T] and counts [B] as int64 (int32 is accepted and converted)."""
    segment_ids = _checks.index_tensor(op, "segment_ids", segment_ids)
    counts = _checks.index_tensor(op, "counts", counts)
    if segment_ids.dim() != 2:
        _checks._fail(op, f"segment_ids must be 2-D [B, T], got shape {tuple(segment_ids.shape)}")
    rows = segment_ids.shape[0] if batch is None else batch
    _checks.shape(op, "counts", counts, (rows,), "one count per row")
    return segment_ids.long(), counts.long()


def _check_segment_data(op: str, segment_ids: torch.Tensor, counts: torch.Tensor,
                        max_segments: int | None = None) -> None:
    """The CPU kernel's validation of a segmentation, for the other devices (whose kernels do
    not validate: see the module docstring), with its messages; with RLENGINE_CHECK_INPUTS=1."""
    if segment_ids.device.type == "cpu" or not _checks.data_checks_enabled(segment_ids):
        return
    steps = segment_ids.shape[1]
    too_many = counts > steps
    if max_segments is not None:
        too_many = too_many | (counts > max_segments)
    where = _checks.first_bad_index((counts < 0) | too_many)
    if where is not None:
        (b,) = where
        k = int(counts[b])
        if 0 <= k <= steps:
            _checks._fail(op, f"counts[{b}] = {k} exceeds segment_rewards.shape[1] = "
                              f"{max_segments} (one reward column per segment)")
        _checks._fail(op, f"counts[{b}] = {k} is out of range: a row of T = {steps} positions "
                          f"has between 0 and {steps} segments")
    bad = (segment_ids < -1) | (segment_ids >= counts.unsqueeze(1))
    where = _checks.first_bad_index(bad)
    if where is not None:
        b, t = where
        k = int(counts[b])
        _checks._fail(op, f"segment_ids[{b}, {t}] = {int(segment_ids[b, t])} is out of range: a "
                          f"segment id must be -1 (no segment) or lie in [0, counts[{b}]) = "
                          f"[0, {k})")


# ---- entropy_segments -------------------------------------------------------------------------

def entropy_segments(entropy: torch.Tensor, response_mask: torch.Tensor, *, threshold: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each response into segments that end where the next token is uncertain.

    Among the response positions (``response_mask`` true) of each row, token ``t`` ends a
    segment iff ``entropy[b, t] > threshold``; the last response position always ends the last
    segment. Segments are numbered 0, 1, ... along the response.

    Alignment (the off-by-one METHODS.md warns about): ``entropy[b, t]`` must be the entropy of
    the reference model's next-token distribution *after* token ``t``, the distribution that
    predicts token ``t + 1``, held at the position of token ``t``. A segment ends at ``t`` when
    the model is unsure what follows ``t``. For a batch of full sequences ``ids [B, L]``
    (prompt + response) and the frozen reference model's ``logits [B, L, V]``::

        _, ent = rlengine.ops.token_logprobs(logits[:, :-1], ids[:, 1:], with_entropy=True)
        # ent[b, j] is the entropy of the distribution at position j, which predicts ids[b, j+1]:
        # it already sits at the position of token j. Pad one column at the end to get [B, L]:
        entropy = torch.nn.functional.pad(ent, (0, 1))        # aligned with ids
        segment_ids, counts = entropy_segments(entropy, response_mask, threshold=1.75)

    with ``response_mask [B, L]`` aligned with ``ids``. The padded last column is never
    compared usefully: the last position is at most the last response token, which ends its
    segment anyway. If you keep per-token arrays in the *label-aligned* layout of PPO code
    (length ``L - 1``, index ``j`` holding token ``ids[:, j + 1]``, like the log-probs above),
    token ``j + 1`` needs ``ent[:, j + 1]``, so shift the entropy left by one:
    ``entropy = F.pad(ent[:, 1:], (0, 1))``. Passing ``ent`` itself with a label-aligned mask is
    the classic mistake: each token would be judged by the entropy of the distribution that
    produced it, moving every boundary one token early.

    EOS, padding and the prompt must be excluded from ``response_mask`` by the caller. Then EOS
    never ends a segment (the last *content* token ends the last one, as METHODS.md says), gets
    id -1 and hence exactly 0 dense reward from ``segment_rewards_to_dense``::

        response_mask = response_mask & (ids != tokenizer.eos_token_id)

    Args:
        entropy: ``[B, T]`` float32, float64, bfloat16 or float16, any strides. NaN never ends
            a segment (the comparison is false), except through the last-position rule.
        response_mask: ``[B, T]`` bool (or numeric: nonzero is true). May have holes; positions
            outside it get id -1 and do not interrupt the numbering.
        threshold: finite real ``c`` (paper: 1.75 or 2.0). ``0`` gives token-level segments
            when every entropy is > 0 (an entropy of exactly 0 does not end a segment); a huge
            threshold gives one segment per response (the bandit case). The comparison is
            exact: ``entropy`` is compared with the float64 threshold, whatever its dtype.

    Returns:
        ``(segment_ids, counts)``: ``segment_ids [B, T]`` int64, ``0, 1, ...`` along each
        response and ``-1`` elsewhere (non-decreasing along the row); ``counts [B]`` int64, the
        number of segments, 0 for a row without response positions. Not differentiable
        (integer outputs).
    """
    op = "entropy_segments"
    entropy = _checks.float_tensor(op, "entropy", entropy, ndim=2)
    response_mask = _checks.mask(op, "response_mask", response_mask, entropy.shape)
    _checks.same_device(op, entropy=entropy, response_mask=response_mask)
    threshold = _checks.number(op, "threshold", threshold)
    return torch.ops.rlengine.entropy_segments.default(entropy, response_mask, threshold)


@torch.library.register_fake("rlengine::entropy_segments")
def _(entropy, response_mask, threshold):
    return (entropy.new_empty(entropy.shape, dtype=torch.int64),
            entropy.new_empty(entropy.shape[:1], dtype=torch.int64))


# ---- segment_reduce ---------------------------------------------------------------------------

def segment_reduce(values: torch.Tensor, segment_ids: torch.Tensor, counts: torch.Tensor, *,
                   reduce: Reduce = "end_mean") -> torch.Tensor:
    """Reduce per-token values over segments (the segment reward model's read-out).

    Args:
        values: ``[B, T]`` float32, float64, bfloat16 or float16 (e.g. a bias-free value head
            evaluated at every position), any strides.
        segment_ids, counts: a segmentation as returned by ``entropy_segments``
            (``[B, T]`` and ``[B]``, int64 or int32), validated by the kernel (see the module
            docstring).
        reduce:
            ``"end_mean"``: ``[B]``, the mean over the row's ``counts[b]`` segments of the
            value at each segment's last token: the sequence score ``S`` of the segment reward
            model, trained with Bradley-Terry on ``S``. 0 for a row with no segment. With
            token-level segments this is the mean over response tokens; with one segment
            (bandit) the value at the last response token.

            ``"end"``: ``[B, T]``, at ``[b, k]`` the value at segment ``k``'s last token (the
            raw segment rewards ``r_k`` to feed ``segment_rewards_to_dense``).

            ``"sum"`` / ``"mean"``: ``[B, T]``, at ``[b, k]`` the sum / mean of segment ``k``'s
            token values.

            The ``[B, T]`` results hold segment ``k`` in column ``k`` and are 0 for
            ``k >= counts[b]`` (and for a segment without tokens); ``[:, :counts.max()]``
            trims them.

    Returns:
        float32 (float64 for float64 values), accumulated in float64 per segment.
        Differentiable w.r.t. ``values``: the gradient (in ``values.dtype``) reaches only the
        tokens that the reduction read, and is exactly 0 elsewhere.
    """
    op = "segment_reduce"
    values = _checks.float_tensor(op, "values", values, ndim=2)
    segment_ids, counts = _segments(op, segment_ids, counts)
    _checks.shape(op, "segment_ids", segment_ids, values.shape, "values.shape")
    _checks.same_device(op, values=values, segment_ids=segment_ids, counts=counts)
    reduce = _checks.choice(op, "reduce", reduce, REDUCES)
    _check_segment_data(op, segment_ids, counts)
    return torch.ops.rlengine.segment_reduce.default(values, segment_ids, counts, reduce)


@torch.library.register_fake("rlengine::segment_reduce")
def _(values, segment_ids, counts, reduce):
    shape = values.shape[:1] if reduce == "end_mean" else values.shape
    return values.new_empty(shape, dtype=_checks.result_dtype(values))


@torch.library.register_fake("rlengine::segment_reduce_backward")
def _(grad, segment_ids, counts, reduce, dtype):
    return grad.new_empty(segment_ids.shape, dtype=dtype)


def _segment_reduce_setup_context(ctx, inputs, output):
    values, segment_ids, counts, reduce = inputs
    ctx.save_for_backward(segment_ids, counts)
    ctx.reduce = reduce
    ctx.values_dtype = values.dtype


def _segment_reduce_backward(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    segment_ids, counts = ctx.saved_tensors
    grad_values = torch.ops.rlengine.segment_reduce_backward.default(
        grad, segment_ids, counts, ctx.reduce, ctx.values_dtype)
    return grad_values, None, None, None


torch.library.register_autograd("rlengine::segment_reduce", _segment_reduce_backward,
                                setup_context=_segment_reduce_setup_context)


# ---- segment_rewards_to_dense -----------------------------------------------------------------

def segment_rewards_to_dense(segment_rewards: torch.Tensor, segment_ids: torch.Tensor,
                             counts: torch.Tensor, mask: torch.Tensor, *,
                             normalizer: Sequence[float] | None = None,
                             spread: Spread = "even",
                             clamp: float | None = 10.0) -> torch.Tensor:
    """Per-token rewards for PPO from per-segment rewards, with location-aware normalization.

    For segment ``k`` (0-based) of a row with ``K = counts[b]`` segments, reward
    ``r_k = segment_rewards[b, k]``:

    1. normalize (if ``normalizer`` is given): location ``p = (k + 1) / K`` (METHODS.md's
       ``k/K`` with 1-based k), ``mu(p) = a_mu log p + b_mu``,
       ``sigma(p) = max(a_sigma log p + b_sigma, reference.SIGMA_FLOOR)`` and
       ``r~_k = (r_k - mu(p)) / sigma(p)``; otherwise ``r~_k = r_k``.
    2. spread over the segment's *receiving* tokens, those with ``mask`` true and
       ``segment_ids == k``: ``"even"``, each gets ``r~_k / (number of receiving tokens)``
       (the paper's default; the row's dense rewards then sum to the segments' sum);
       ``"repeat"``, each gets ``r~_k``; ``"end"``, only the last receiving token gets ``r~_k``.
    3. clamp each token's reward to ``[-clamp, clamp]``.

    Every other position (``mask`` false, or id -1: prompt, EOS, padding) gets exactly 0.

    Args:
        segment_rewards: ``[B, Kmax]`` float (any of the four dtypes), ``Kmax >= counts.max()``
            (columns ``k >= counts[b]`` are never read), e.g. ``segment_reduce(values, ids,
            counts, reduce="end")[:, :Kmax]``.
        segment_ids, counts: ``[B, T]`` and ``[B]`` int64 or int32, as from
            ``entropy_segments``; validated by the kernel, which also requires
            ``counts[b] <= Kmax``.
        mask: ``[B, T]`` bool (or numeric, nonzero is true): the positions that may receive
            reward, normally the same ``response_mask`` that built the segments (EOS excluded).
        normalizer: ``(a_mu, b_mu, a_sigma, b_sigma)`` fitted for this reward model and
            threshold (e.g. Phi-3 at c = 1.75: ``(0.7668, 0.4705, 0.2569, 2.8339)``), as a
            sequence of 4 finite numbers or a 1-D numpy array / CPU tensor of 4, or None.
        spread: ``"even"``, ``"repeat"`` or ``"end"``.
        clamp: ``> 0`` bound of each token reward (paper: 10), or None (or ``math.inf``) for no
            clamp.

    Returns:
        ``[B, T]`` float32 (float64 for float64 rewards). Differentiable w.r.t.
        ``segment_rewards``: ``d dense / d r_k`` is ``1 / sigma(p)`` (divided by the number of
        receiving tokens for ``"even"``) at the segment's receiving tokens, and 0 where the
        clamp is active (as ``torch.clamp``: the bounds themselves pass the gradient).
    """
    op = "segment_rewards_to_dense"
    segment_rewards = _checks.float_tensor(op, "segment_rewards", segment_rewards, ndim=2)
    segment_ids, counts = _segments(op, segment_ids, counts)
    batch = segment_ids.shape[0]
    if segment_rewards.shape[0] != batch:
        _checks._fail(op, f"segment_rewards must have B = {batch} rows (segment_ids.shape[0]), "
                          f"got shape {tuple(segment_rewards.shape)}")
    mask = _checks.mask(op, "mask", mask, segment_ids.shape)
    _checks.same_device(op, segment_rewards=segment_rewards, segment_ids=segment_ids,
                        counts=counts, mask=mask)
    normalizer = _normalizer(op, normalizer)
    spread = _checks.choice(op, "spread", spread, SPREADS)
    clamp = _clamp(op, clamp)
    _check_segment_data(op, segment_ids, counts, segment_rewards.shape[1])
    return torch.ops.rlengine.segment_rewards_to_dense.default(
        segment_rewards, segment_ids, counts, mask, normalizer, spread, clamp)


def _normalizer(op: str, normalizer: object) -> list[float] | None:
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor) or type(normalizer).__module__ == "numpy":
        normalizer = normalizer.tolist()  # a fitted (4,) array
    if isinstance(normalizer, (str, bytes)) or not isinstance(normalizer, Sequence):
        _checks._fail(op, "normalizer must be None or a sequence (a_mu, b_mu, a_sigma, b_sigma), "
                          f"got {type(normalizer).__name__}", TypeError)
    if len(normalizer) != 4:
        _checks._fail(op, "normalizer must be (a_mu, b_mu, a_sigma, b_sigma), got "
                          f"{len(normalizer)} numbers")
    names = ("a_mu", "b_mu", "a_sigma", "b_sigma")
    return [_checks.number(op, f"normalizer {name}", value)
            for name, value in zip(names, normalizer)]


def _clamp(op: str, clamp: object) -> float:
    if clamp is None:
        return math.inf
    if isinstance(clamp, float) and clamp == math.inf:
        return math.inf
    return _checks.number(op, "clamp", clamp, low=0.0, low_inclusive=False)


@torch.library.register_fake("rlengine::segment_rewards_to_dense")
def _(segment_rewards, segment_ids, counts, mask, normalizer, spread, clamp):
    return segment_rewards.new_empty(segment_ids.shape, dtype=_checks.result_dtype(segment_rewards))


@torch.library.register_fake("rlengine::segment_rewards_to_dense_backward")
def _(grad_rewards, segment_rewards, segment_ids, counts, mask, normalizer, spread, clamp):
    return torch.empty_like(segment_rewards, memory_format=torch.contiguous_format)


def _dense_setup_context(ctx, inputs, output):
    segment_rewards, segment_ids, counts, mask, normalizer, spread, clamp = inputs
    ctx.save_for_backward(segment_rewards, segment_ids, counts, mask)
    ctx.normalizer = normalizer
    ctx.spread = spread
    ctx.clamp = clamp


def _dense_backward(ctx, grad_rewards):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    segment_rewards, segment_ids, counts, mask = ctx.saved_tensors
    grad = torch.ops.rlengine.segment_rewards_to_dense_backward.default(
        grad_rewards, segment_rewards, segment_ids, counts, mask, ctx.normalizer, ctx.spread,
        ctx.clamp)
    return grad, None, None, None, None, None, None


torch.library.register_autograd("rlengine::segment_rewards_to_dense", _dense_backward,
                                setup_context=_dense_setup_context)
