"""Fused token log-probs (and entropy) from logits: ``rlengine::token_logprobs``.

Kernels: csrc/cpu/logprobs.cpp. Reference: ``reference.token_logprobs``.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from rlengine.ops import _checks

OP = "token_logprobs"


@overload
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = ...,
                   ignore_index: int = ..., with_entropy: Literal[False] = ...) -> torch.Tensor: ...


@overload
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = ...,
                   ignore_index: int = ...,
                   with_entropy: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, with_entropy: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax(logits / temperature)``, in one pass.

    Args:
        logits: ``[..., V]`` float32, bfloat16, float16 or float64. The leading dimensions may
            have any strides (``logits[:, :-1]`` is read in place); the last must be contiguous
            or it is copied.
        labels: ``logits.shape[:-1]`` int64/int32 token ids in ``[0, V)`` or ``ignore_index``.
        temperature: > 0; the logits are divided by it inside the kernel.
        ignore_index: label value of positions to skip: their log-prob (and entropy) is exactly
            0 and they get exactly 0 gradient.
        with_entropy: also return the entropy of ``softmax(logits / temperature)`` per position.

    Returns:
        ``logprobs`` with the shape of ``labels``, in float32 (float64 for float64 logits), and
        ``(logprobs, entropy)`` if ``with_entropy``. Both are differentiable: the backward
        recomputes the softmax from a saved per-position logsumexp, so only O(N) is saved
        besides the logits themselves, and no N x V float32 temporary is ever made.

    Semantics follow ``torch.log_softmax`` in float64: a label whose logit is -inf gets -inf; a
    row that is all -inf, or holds a NaN or +inf, gives NaN.
    """
    logits = _checks.float_tensor(OP, "logits", logits)
    labels = _checks.index_tensor(OP, "labels", labels)
    if logits.dim() < 1:
        _checks._fail(OP, "logits must have a vocabulary dimension, got a 0-d tensor")
    _checks.shape(OP, "labels", labels, logits.shape[:-1], "logits.shape[:-1]")
    _checks.same_device(OP, logits=logits, labels=labels)
    vocab = logits.shape[-1]
    if vocab < 1:
        _checks._fail(OP, "logits must have a vocabulary size >= 1, got 0")
    temperature = _checks.number(OP, "temperature", temperature, low=0.0, low_inclusive=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _checks._fail(OP, f"ignore_index must be an int, got {type(ignore_index).__name__}",
                      TypeError)
    if _checks.data_checks_enabled(labels) and labels.numel():
        _check_label_range(labels, vocab, ignore_index)
    logprobs, entropy, _ = torch.ops.rlengine.token_logprobs.default(
        logits, labels, temperature, ignore_index, bool(with_entropy))
    return (logprobs, entropy) if with_entropy else logprobs


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    where = _checks.first_bad_index(bad)
    if where is not None:
        _checks._fail(OP, f"labels{list(where)} = {int(labels[where])} is outside [0, {vocab}) "
                          f"and is not ignore_index ({ignore_index})")


@torch.library.register_fake("rlengine::token_logprobs")
def _(logits, labels, temperature, ignore_index, with_entropy):
    dtype = _checks.result_dtype(logits)
    logprobs = logits.new_empty(labels.shape, dtype=dtype)
    entropy = logits.new_empty(labels.shape if with_entropy else (0,), dtype=dtype)
    return logprobs, entropy, logits.new_empty(labels.shape, dtype=dtype)


@torch.library.register_fake("rlengine::token_logprobs_backward")
def _(grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy = inputs
    _, entropy, logsumexp = output
    ctx.save_for_backward(logits, labels, logsumexp, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.with_entropy = with_entropy
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_logsumexp):
    if not ctx.needs_input_grad[0] or (grad_logprobs is None and grad_entropy is None):
        return None, None, None, None, None
    logits, labels, logsumexp, entropy = ctx.saved_tensors
    if not ctx.with_entropy:
        grad_entropy = None
    grad_logits = torch.ops.rlengine.token_logprobs_backward.default(
        grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy, ctx.temperature,
        ctx.ignore_index)
    return grad_logits, None, None, None, None


torch.library.register_autograd("rlengine::token_logprobs", _backward,
                                setup_context=_setup_context)
