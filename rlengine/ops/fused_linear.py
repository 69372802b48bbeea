"""Fused linear + token log-probs: ``rlengine::fused_linear_logprobs``.

The log-prob (and entropy) of each label under ``softmax((hidden @ weight.T + bias) / T)``,
with gradients for hidden, weight and bias, without ever forming the N x V logits.

Ops (defined here in Python; the other families' schemas are in csrc/registration.cpp):
  ``rlengine::fused_linear_logprobs`` / ``..._backward``: ``torch.library.triton_op``s, so that
      torch.compile sees the Triton launches inside them. Their bodies pick a path with
      ``uses_triton``: the Triton kernels (rlengine/ops/triton/fused_linear.py), or
  ``rlengine::fused_linear_logprobs_chunked`` / ``..._backward``: the chunked path, opaque
      custom ops that run a bounded chunk of rows at a time through the token_logprobs kernels
      (csrc/cpu/logprobs.cpp on the CPU).
Reference: ``reference.fused_linear_logprobs``.
"""

import importlib.util
import os
from typing import Literal, Optional, overload

import torch

from rlengine.ops import _checks

OP = "fused_linear_logprobs"

# The chunked path's logits chunk (rows x V, fp32 or fp64) is at most this many bytes; its
# backward holds one more chunk of the same size (the logits' gradient).
CHUNK_BYTES = 64 * 2**20


def uses_triton(device: torch.device) -> bool:
    """Which path runs on tensors of this device: True for the Triton kernels, False for the
    chunked path through the token_logprobs kernels.

    CUDA tensors take the Triton kernels (the chunked path, through the CUDA token_logprobs
    kernels, if Triton is not installed). CPU tensors take the chunked path, except when
    ``TRITON_INTERPRET=1`` was set before rlengine first ran a Triton kernel: Triton decides
    when a kernel is decorated (on rlengine's first Triton call) whether it is compiled or
    interpreted, and interpreted kernels run on CPU tensors. That is how the tests run the
    Triton kernels without a GPU.
    """
    if device.type == "cuda":
        return _triton_kernels() is not None
    if device.type == "cpu" and "TRITON_INTERPRET" in os.environ:
        kernels = _triton_kernels()
        return kernels is not None and kernels.INTERPRETED
    return False


def _triton_kernels():
    """The Triton kernel module, imported on first use (None without Triton)."""
    try:
        from rlengine.ops.triton import fused_linear
    except ImportError:
        return None
    return fused_linear


@overload
def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: Optional[torch.Tensor] = ..., *, temperature: float = ...,
                          ignore_index: int = ...,
                          with_entropy: Literal[False] = ...) -> torch.Tensor: ...


@overload
def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: Optional[torch.Tensor] = ..., *, temperature: float = ...,
                          ignore_index: int = ..., with_entropy: Literal[True]
                          ) -> tuple[torch.Tensor, torch.Tensor]: ...


def fused_linear_logprobs(hidden, weight, labels, bias=None, *, temperature=1.0,
                          ignore_index=-100, with_entropy=False):
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without the N x V logits.

    For a language model's head: hidden states in, the log-probability of each label out,
    with gradients for hidden, weight and bias. On CUDA, Triton kernels compute the logits a
    tile at a time (the forward keeps O(N) per row; the backward recomputes them a chunk of
    vocabulary columns at a time); on the CPU, a chunk of rows at a time goes through the
    token_logprobs kernels (at most ``CHUNK_BYTES`` of logits at once).

    Args:
        hidden: ``[..., H]`` float32, bfloat16, float16 or float64; any leading dimensions
            (``[B, T, H]`` hidden states with ``[B, T]`` labels), any strides.
        weight: ``[V, H]``, the dtype and device of hidden (the LM head's weight as stored).
        labels: ``hidden.shape[:-1]`` int64/int32 token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``, the dtype of weight.
        temperature: > 0; the logits are divided by it inside the kernels.
        ignore_index: label value of positions to skip: their log-prob (and entropy) is
            exactly 0 and they give exactly 0 gradient (and no matmul work where a whole block
            of rows is ignored, as prompt tokens are).
        with_entropy: also return the entropy of ``softmax(logits / temperature)``.

    Returns:
        ``logprobs`` with the shape of labels, in float32 (float64 for float64 inputs), and
        ``(logprobs, entropy)`` if ``with_entropy``. Gradients come back in the inputs' dtype.

    Semantics are token_logprobs's on the logits: a label whose logit is -inf (a -inf bias
    entry) gets -inf; a row whose logits hold a NaN or +inf, or are all -inf, gives NaN. Labels
    outside ``[0, V)`` raise an error for CPU tensors (and on other devices with
    ``RLENGINE_CHECK_INPUTS=1``); past that check (GPU, compiled graphs) they are never read:
    their log-prob and gradient are NaN.
    """
    hidden = _checks.float_tensor(OP, "hidden", hidden)
    weight = _checks.float_tensor(OP, "weight", weight, ndim=2)
    labels = _checks.index_tensor(OP, "labels", labels)
    if hidden.dim() < 1:
        _checks._fail(OP, "hidden must have a hidden dimension, got a 0-d tensor")
    vocab, width = weight.shape
    if hidden.shape[-1] != width:
        _checks._fail(OP, f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's "
                          f"second ({width}), the hidden size")
    if vocab < 1:
        _checks._fail(OP, "weight must have a vocabulary size >= 1, got 0 rows")
    _checks.shape(OP, "labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")
    if weight.dtype != hidden.dtype:
        _checks._fail(OP, f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}",
                      TypeError)
    if bias is not None:
        bias = _checks.float_tensor(OP, "bias", bias, ndim=1)
        _checks.shape(OP, "bias", bias, (vocab,), "weight.shape[0]")
        if bias.dtype != weight.dtype:
            _checks._fail(OP, f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}",
                          TypeError)
    _checks.same_device(OP, hidden=hidden, weight=weight, labels=labels, bias=bias)
    temperature = _checks.number(OP, "temperature", temperature, low=0.0, low_inclusive=False)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _checks._fail(OP, f"ignore_index must be an int, got {type(ignore_index).__name__}",
                      TypeError)
    if _checks.data_checks_enabled(labels) and labels.numel():
        _check_label_range(labels, vocab, ignore_index)
    logprobs, entropy, _ = torch.ops.rlengine.fused_linear_logprobs.default(
        hidden.reshape(-1, width), weight, bias, labels.reshape(-1), temperature, ignore_index,
        bool(with_entropy))
    logprobs = logprobs.view(labels.shape)
    return (logprobs, entropy.view(labels.shape)) if with_entropy else logprobs


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    where = _checks.first_bad_index(bad)
    if where is not None:
        _checks._fail(OP, f"labels{list(where)} = {int(labels[where])} is outside [0, {vocab}) "
                          f"and is not ignore_index ({ignore_index})")


# ---- the ops: Triton or chunked, chosen by uses_triton --------------------------------------
# The schemas are inferred from the annotations (so no `from __future__ import annotations`).

def _triton_can_compile() -> bool:
    """Whether Triton can compile kernels for this torch: a GPU build of torch with Triton
    installed."""
    if torch.version.cuda is None and torch.version.hip is None:
        return False
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _triton_op(name: str):
    """torch.library.triton_op where Triton compiles kernels (so that torch.compile sees their
    launches), else a custom op with the body as fake kernel, which is what triton_op registers
    too. On a CPU build of torch, triton_op would only cost time: registering one imports
    Triton and torch._inductor (about a second) to search the body for kernels that can run
    there only under the interpreter, which needs no compiler's view of them."""
    def define(fn):
        if _triton_can_compile():
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op
    return define


@_triton_op("rlengine::fused_linear_logprobs")
def _fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor], labels: torch.Tensor,
                           temperature: float, ignore_index: int, with_entropy: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs [N], entropy [N] or [0], logsumexp [N]) for hidden [N, H]."""
    if uses_triton(hidden.device):
        return _triton_kernels().forward(hidden, weight, bias, labels, temperature,
                                         ignore_index, with_entropy)
    return torch.ops.rlengine.fused_linear_logprobs_chunked.default(
        hidden, weight, bias, labels, temperature, ignore_index, with_entropy)


@_triton_op("rlengine::fused_linear_logprobs_backward")
def _fused_linear_logprobs_backward(
        grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        labels: torch.Tensor, logsumexp: torch.Tensor, entropy: torch.Tensor,
        temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
        need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtype; [0] for one not needed."""
    if uses_triton(hidden.device):
        return _triton_kernels().backward(
            grad_logprobs, grad_entropy, hidden, weight, bias, labels, logsumexp, entropy,
            temperature, ignore_index, need_hidden, need_weight, need_bias)
    return torch.ops.rlengine.fused_linear_logprobs_chunked_backward.default(
        grad_logprobs, grad_entropy, hidden, weight, bias, labels, logsumexp, entropy,
        temperature, ignore_index, need_hidden, need_weight, need_bias)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, with_entropy = inputs
    _, entropy, logsumexp = output
    ctx.save_for_backward(hidden, weight, bias, labels, logsumexp, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.with_entropy = with_entropy
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_logsumexp):
    hidden, weight, bias, labels, logsumexp, entropy = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = bias is not None and ctx.needs_input_grad[2]
    if not ctx.with_entropy:
        grad_entropy = None
    if not (need_hidden or need_weight or need_bias) or \
            (grad_logprobs is None and grad_entropy is None):
        return None, None, None, None, None, None, None
    grad_hidden, grad_weight, grad_bias = torch.ops.rlengine.fused_linear_logprobs_backward.default(
        grad_logprobs, grad_entropy, hidden, weight, bias, labels, logsumexp, entropy,
        ctx.temperature, ctx.ignore_index, need_hidden, need_weight, need_bias)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None, None, None, None)


_fused_linear_logprobs.register_autograd(_backward, setup_context=_setup_context)


# ---- the chunked path ---------------------------------------------------------------------------

def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (vocab * dtype.itemsize))


def _active_row_chunks(labels: torch.Tensor, ignore_index: int, rows: int):
    """Indices of the rows that are not ignored, in chunks of at most `rows`: ignored rows
    (prompt tokens) cost no matmul work."""
    active = (labels != ignore_index).nonzero().squeeze(1)
    return active.split(rows)


@torch.library.custom_op("rlengine::fused_linear_logprobs_chunked", mutates_args=())
def _chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     labels: torch.Tensor, temperature: float, ignore_index: int,
                     with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward a chunk of rows at a time: logits = hidden[rows] @ W^T (+ b) in fp32 (fp64
    for fp64 inputs), then token_logprobs on them. 16-bit weights are converted to fp32 once
    per call (V x H x 4 bytes): CPU GEMMs on 16-bit inputs round their result to 16 bits, which
    the log-probs must not see (the Triton path accumulates in fp32 as well)."""
    n = hidden.shape[0]
    acc = _accumulator_dtype(hidden.dtype)
    logprobs = hidden.new_zeros((n,), dtype=acc)
    logsumexp = hidden.new_zeros((n,), dtype=acc)
    entropy = hidden.new_zeros((n if with_entropy else 0,), dtype=acc)
    weight_t = weight.to(acc).t()
    bias_acc = bias.to(acc) if bias is not None else None
    rows = _chunk_rows(weight.shape[0], acc)
    logits_buffer = hidden.new_empty((min(rows, n), weight.shape[0]), dtype=acc)
    for index in _active_row_chunks(labels, ignore_index, rows):
        logits = _chunk_logits(hidden, weight_t, bias_acc, index, logits_buffer)
        lp, ent, lse = torch.ops.rlengine.token_logprobs.default(
            logits, labels.index_select(0, index), temperature, ignore_index, with_entropy)
        logprobs.index_copy_(0, index, lp)
        logsumexp.index_copy_(0, index, lse)
        if with_entropy:
            entropy.index_copy_(0, index, ent)
    return logprobs, entropy, logsumexp


def _chunk_logits(hidden, weight_t, bias, index, buffer):
    """hidden[index] @ weight_t (+ bias) into the reused buffer (fresh N x V-sized blocks
    would be page-faulted in on every chunk)."""
    rows = hidden.index_select(0, index).to(weight_t.dtype)
    out = buffer[:index.numel()]
    if bias is None:
        return torch.mm(rows, weight_t, out=out)
    return torch.addmm(bias, rows, weight_t, out=out)


@torch.library.custom_op("rlengine::fused_linear_logprobs_chunked_backward", mutates_args=())
def _chunked_backward(
        grad_logprobs: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
        hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        labels: torch.Tensor, logsumexp: torch.Tensor, entropy: torch.Tensor,
        temperature: float, ignore_index: int, need_hidden: bool, need_weight: bool,
        need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward a chunk of rows at a time: the chunk's logits recomputed, their gradient
    from token_logprobs_backward, then grad_hidden[rows] = dlogits @ W and
    grad_weight += dlogits^T @ hidden[rows] (accumulated in fp32 for 16-bit inputs)."""
    n, width = hidden.shape
    vocab = weight.shape[0]
    dtype = hidden.dtype
    acc = _accumulator_dtype(dtype)
    nothing = (0,)  # the shape of a gradient not asked for
    grad_hidden = hidden.new_zeros((n, width) if need_hidden else nothing)
    grad_weight = hidden.new_zeros((vocab, width) if need_weight else nothing, dtype=acc)
    grad_bias = hidden.new_zeros((vocab,) if need_bias else nothing, dtype=acc)
    weight_acc = weight.to(acc)
    bias_acc = bias.to(acc) if bias is not None else None
    rows = _chunk_rows(vocab, acc)
    logits_buffer = hidden.new_empty((min(rows, n), vocab), dtype=acc)
    for index in _active_row_chunks(labels, ignore_index, rows):
        logits = _chunk_logits(hidden, weight_acc.t(), bias_acc, index, logits_buffer)
        dlogits = torch.ops.rlengine.token_logprobs_backward.default(
            None if grad_logprobs is None else grad_logprobs.index_select(0, index),
            None if grad_entropy is None else grad_entropy.index_select(0, index),
            logits, labels.index_select(0, index), logsumexp.index_select(0, index),
            entropy.index_select(0, index) if grad_entropy is not None else entropy,
            temperature, ignore_index)
        if need_hidden:
            grad_hidden.index_copy_(0, index, torch.mm(dlogits, weight_acc).to(dtype))
        if need_weight:
            grad_weight.addmm_(dlogits.t(), hidden.index_select(0, index).to(acc))
        if need_bias:
            grad_bias += dlogits.sum(0)
        del logits, dlogits  # before the next chunk's are made: one chunk of each at a time
    return grad_hidden, grad_weight.to(dtype), grad_bias.to(dtype)


@_chunked_forward.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, with_entropy):
    n = hidden.shape[0]
    dtype = _checks.result_dtype(hidden)
    return (hidden.new_empty((n,), dtype=dtype),
            hidden.new_empty((n if with_entropy else 0,), dtype=dtype),
            hidden.new_empty((n,), dtype=dtype))


@_chunked_backward.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, logsumexp, entropy,
      temperature, ignore_index, need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty((0,)),
            hidden.new_empty(weight.shape) if need_weight else hidden.new_empty((0,)),
            hidden.new_empty((weight.shape[0],)) if need_bias else hidden.new_empty((0,)))
