"""Fused token log-probs (and entropy) from logits: ``rlengine::token_logprobs``.

Kernels: csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cu. Reference: ``reference.token_logprobs``.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from rlengine.ops import _checks

OP = "token_logprobs"


@overload
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = ...,
                   ignore_index: int = ..., with_entropy: Literal[False] = ...,
                   inplace_backward: bool = ...) -> torch.Tensor: ...


@overload
def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = ...,
                   ignore_index: int = ..., with_entropy: Literal[True],
                   inplace_backward: bool = ...) -> tuple[torch.Tensor, torch.Tensor]: ...


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, with_entropy: bool = False,
                   inplace_backward: bool = False
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
        inplace_backward: let the backward write the logits gradient over the logits
            themselves instead of allocating an N x V gradient (the memory saving of Liger's
            cross entropy). The caller promises not to use ``logits`` (nor any tensor sharing
            its memory, such as the tensor it was sliced from) after the backward; see below.

    Returns:
        ``logprobs`` with the shape of ``labels``, in float32 (float64 for float64 logits), and
        ``(logprobs, entropy)`` if ``with_entropy``. Both are differentiable: the backward
        recomputes the softmax from a saved per-position logsumexp, so only O(N) is saved
        besides the logits themselves, and no N x V float32 temporary is ever made.

    Semantics follow ``torch.log_softmax`` in float64: a label whose logit is -inf gets -inf; a
    row that is all -inf, or holds a NaN or +inf, gives NaN. Labels outside ``[0, V)`` that are
    not ``ignore_index`` raise a ValueError here for CPU tensors, and for tensors on other
    devices when ``RLENGINE_CHECK_INPUTS=1`` (the check reads the labels, a host
    synchronization); otherwise (and in compiled graphs) the kernels never read such a label:
    its log-prob is NaN and its row of the logits gradient is NaN.

    In-place backward (``inplace_backward=True``):

    - The backward writes the gradient, in the logits' dtype, through the logits' own strides
      (a non-contiguous view such as ``logits[:, :-1]`` included) and hands autograd that same
      memory, as a tensor of the logits' shape and strides, as the logits' gradient. Nothing
      of size N x V is allocated, except for logits whose vocabulary dimension has stride
      != 1, which are worked on in a contiguous copy and then overwritten.
    - Where the logits are a leaf that requires grad, their ``.grad`` is that memory if they
      are contiguous (the values are gone, the gradient is there); for other layouts
      autograd's layout rule for ``.grad`` makes a contiguous copy of it. Where the logits are
      a view (e.g. of a leaf, or ``lm_head(hidden)[:, :-1]``), the memory they view is
      overwritten, and the base's own backward proceeds as usual.
    - The write bumps the logits' version counter (the op is declared as mutating them), so
      any other autograd node that saved the logits, or a view of the same memory, and runs
      later fails with torch's usual "modified by an inplace operation" error instead of
      silently reading the gradient; so does a second backward through the same graph
      (``retain_graph=True``). This op's own saved logits are unpacked before they are
      overwritten, so its own check does not fire.
    - Logits whose elements share memory (an ``expand()``-ed tensor) are rejected with a
      ValueError: the gradient cannot be written over them.
    - Double backward (``create_graph=True``) is not supported: that backward raises.
    - Under ``torch.compile(fullgraph=True)`` the op traces, its mutation functionalized; the
      compiled backward writes the gradient into the logits as well, and whether it avoids
      the N x V buffer is then up to the compiler.
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
    if not isinstance(inplace_backward, bool):
        _checks._fail(OP, "inplace_backward must be a bool, got "
                          f"{type(inplace_backward).__name__}", TypeError)
    if inplace_backward and not _elements_have_own_memory(logits):
        _checks._fail(OP, "inplace_backward needs logits whose elements do not share memory "
                          f"(an expand()ed tensor cannot hold its gradient), got shape "
                          f"{tuple(logits.shape)} with strides {logits.stride()}")
    if _checks.data_checks_enabled(labels) and labels.numel():
        _check_label_range(labels, vocab, ignore_index)
    logprobs, entropy, _ = torch.ops.rlengine.token_logprobs.default(
        logits, labels, temperature, ignore_index, bool(with_entropy), inplace_backward)
    return (logprobs, entropy) if with_entropy else logprobs


def _elements_have_own_memory(t: torch.Tensor) -> bool:
    """Whether no two elements of t share memory, by a sufficient test on the layout only:
    with the dimensions sorted by stride, each stride clears everything the smaller ones
    span (true of contiguous tensors, slices and permutations; false of expanded ones)."""
    extent = 1  # elements spanned by the dimensions taken so far
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return True


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    where = _checks.first_bad_index(bad)
    if where is not None:
        _checks._fail(OP, f"labels{list(where)} = {int(labels[where])} is outside [0, {vocab}) "
                          f"and is not ignore_index ({ignore_index})")


@torch.library.register_fake("rlengine::token_logprobs")
def _(logits, labels, temperature, ignore_index, with_entropy, inplace_backward=False):
    dtype = _checks.result_dtype(logits)
    logprobs = logits.new_empty(labels.shape, dtype=dtype)
    entropy = logits.new_empty(labels.shape if with_entropy else (0,), dtype=dtype)
    return logprobs, entropy, logits.new_empty(labels.shape, dtype=dtype)


@torch.library.register_fake("rlengine::token_logprobs_backward")
def _(grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy, temperature, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("rlengine::token_logprobs_inplace_backward")
def _(grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy, temperature, ignore_index):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, with_entropy, *rest = inputs
    _, entropy, logsumexp = output
    ctx.save_for_backward(logits, labels, logsumexp, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.with_entropy = with_entropy
    ctx.inplace_backward = bool(rest[0]) if rest else False
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_logsumexp):
    nothing = (None,) * len(ctx.needs_input_grad)
    if not ctx.needs_input_grad[0] or (grad_logprobs is None and grad_entropy is None):
        return nothing
    # Unpacking checks the saved logits' version: it must happen before they are overwritten.
    logits, labels, logsumexp, entropy = ctx.saved_tensors
    if not ctx.with_entropy:
        grad_entropy = None
    if not ctx.inplace_backward:
        grad_logits = torch.ops.rlengine.token_logprobs_backward.default(
            grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy, ctx.temperature,
            ctx.ignore_index)
        return grad_logits, *nothing[1:]
    if torch.is_grad_enabled():
        raise RuntimeError("rlengine.token_logprobs: inplace_backward=True does not support "
                           "double backward (create_graph=True); use inplace_backward=False")
    torch.ops.rlengine.token_logprobs_inplace_backward.default(
        grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy, ctx.temperature,
        ctx.ignore_index)
    # A new tensor over the same memory, rather than the saved tensor itself: for a leaf, the
    # saved tensor is the leaf, and making it its own .grad would be a reference cycle.
    return logits.detach(), *nothing[1:]


torch.library.register_autograd("rlengine::token_logprobs", _backward,
                                setup_context=_setup_context)
