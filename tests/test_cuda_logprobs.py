"""token_logprobs forward and backward on every device in helpers.DEVICES against the float64
reference (evaluated on the CPU): the CUDA kernels (csrc/cuda/logprobs.cu) where a GPU is
present, the CPU kernels everywhere. The cases aim at what a GPU kernel gets wrong: rows that
start off a 16-byte boundary, vocabularies that are not a multiple of the vector width, V = 1,
N = 0, special values in every position of a vector, huge magnitudes, out-of-range labels,
incoming gradients that are expanded scalars, and the in-place backward."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICES,
    DTYPES,
    FP32_EPS,
    assert_matches,
    incoming_gradient,
    result_dtype,
    to64,
)

import rlengine
from rlengine import ops
from rlengine.ops import reference

IGNORE = -100
OPS = ("token_logprobs", "token_logprobs_backward", "token_logprobs_inplace_backward")


def _labels(shape, vocab, ignore_fraction=0.2):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_fraction] = IGNORE
    return labels


def _placed(values: torch.Tensor, device: str, offset: int = 0, pad: int = 0) -> torch.Tensor:
    """values on device as a leaf whose rows start `offset` elements into rows padded by `pad`
    extra elements (offset = pad = 0: contiguous)."""
    if not offset and not pad:
        return values.to(device, copy=True).requires_grad_()
    vocab = values.shape[-1]
    padded = torch.zeros(*values.shape[:-1], vocab + pad, dtype=values.dtype)
    padded[..., offset:offset + vocab] = values
    return padded.to(device)[..., offset:offset + vocab].detach().requires_grad_()


def _check(logits, labels, *, temperature=1.0, with_entropy=True, inplace_backward=False,
           slack=None, expanded_grads=False):
    """Forward and backward of the op on logits' device equal the float64 reference's, within
    the tolerance of logits.dtype. logits is a leaf requiring grad (it is overwritten when
    inplace_backward). slack: extra absolute tolerance; by default it grows with the largest
    finite |logit / temperature|, the scale of fp32's rounding of the inputs."""
    dtype, device = logits.dtype, logits.device
    x64 = to64(logits).cpu().requires_grad_()
    labels_cpu = labels.cpu()
    if slack is None:
        finite = x64.detach()[torch.isfinite(x64.detach())]
        magnitude = float(finite.abs().max()) / temperature if finite.numel() else 0.0
        slack = 0.0 if dtype == torch.float64 else 16 * FP32_EPS * magnitude
    kwargs = dict(temperature=temperature, ignore_index=IGNORE, with_entropy=with_entropy)
    ref = reference.token_logprobs(x64, labels_cpu, **kwargs)
    out = ops.token_logprobs(logits, labels.to(device), inplace_backward=inplace_backward,
                             **kwargs)
    ref = ref if with_entropy else (ref,)
    out = out if with_entropy else (out,)
    for name, o, r in zip(("logprobs", "entropy"), out, ref):
        assert o.device == device and o.dtype == result_dtype(dtype)
        assert_matches(o.cpu(), r, dtype, what=name, extra_atol=slack)

    if expanded_grads:  # what .sum() sends back: a scalar expanded to the output's shape
        grads = [torch.tensor(0.75 + i, dtype=torch.float64).expand(r.shape)
                 for i, r in enumerate(ref)]
        device_grads = [torch.tensor(0.75 + i, dtype=o.dtype, device=device).expand(o.shape)
                        for i, o in enumerate(out)]
    else:
        grads = [incoming_gradient(r, where=torch.isfinite(r)) for r in ref]
        device_grads = [g.to(o.dtype).to(device) for g, o in zip(grads, out)]
    torch.autograd.backward(list(out), device_grads)
    torch.autograd.backward(list(ref), grads)
    grad = logits.grad
    assert grad.dtype == dtype and grad.shape == logits.shape and grad.device == device
    largest_grad = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)
    assert_matches(grad.cpu(), x64.grad, dtype, gradient=True, what="grad logits",
                   extra_atol=slack * largest_grad / temperature)
    if inplace_backward:  # the logits' memory holds the gradient
        torch.testing.assert_close(logits.detach().cpu(), grad.cpu(), rtol=0, atol=0,
                                   equal_nan=True)


def test_cuda_kernels_are_registered():
    for op in OPS:
        assert rlengine._extension.has_kernel(op, "CPU")
        if torch.cuda.is_available():
            assert rlengine._extension.has_kernel(op, "CUDA"), f"rlengine::{op} has no CUDA kernel"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (3, 7), (4, 8), (6, 13), (2, 3, 63),
                                   (5, 1031), (3, 4099)])
def test_random_logits(device, dtype, shape):
    logits = _placed((torch.randn(shape) * 4).to(dtype), device)
    _check(logits, _labels(shape[:-1], shape[-1]), temperature=0.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.45, 3.0])
def test_temperature_entropy_and_inplace(device, temperature, with_entropy, inplace_backward):
    logits = _placed(torch.randn(7, 301) * 3, device)
    _check(logits, _labels((7,), 301), temperature=temperature, with_entropy=with_entropy,
           inplace_backward=inplace_backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset, pad", [(1, 3), (3, 5), (7, 9), (2, 2)])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_rows_off_vector_boundaries(device, dtype, offset, pad, inplace_backward):
    """logits[..., offset:offset + V] of a padded buffer: every row starts at a different
    distance from a 16-byte boundary (the row stride V + pad is odd or not a multiple of the
    vector width), so heads, tails and the input/output phase of the backward all vary."""
    vocab = 97
    logits = _placed((torch.randn(9, vocab) * 3).to(dtype), device, offset, pad)
    assert not logits.is_contiguous()
    _check(logits, _labels((9,), vocab), temperature=0.8, inplace_backward=inplace_backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_special_values_everywhere_in_a_vector(device, dtype, inplace_backward):
    """One row per (special value, position in a 16-byte vector, position of the label)."""
    vocab = 37
    rows, labels = [], []
    for special in (-math.inf, math.nan, math.inf, 30.0, -30.0):
        for position in range(9):  # every lane of an 8-wide vector, and the scalar tail
            for label in (position, (position + 5) % vocab):
                row = torch.randn(vocab) * 2
                row[position] = special
                rows.append(row)
                labels.append(label)
    logits = _placed(torch.stack(rows).to(dtype), device)
    labels = torch.tensor(labels)
    labels[::7] = IGNORE
    _check(logits, labels, temperature=1.3, inplace_backward=inplace_backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_rows(device, dtype):
    vocab = 2053
    logits = torch.randn(9, vocab) * 2
    labels = torch.randint(0, vocab, (9,))
    logits[0] = -math.inf                                # all -inf: NaN
    logits[1, labels[1]] = -math.inf                     # -inf label logit: -inf log-prob
    logits[2, ::3] = -math.inf                           # many -inf: finite entropy
    logits[3] = torch.randn(vocab) * 1e4                 # huge magnitudes
    logits[4] = 0.0                                      # uniform: entropy log V
    logits[5, 17] = 1e4                                  # one-hot
    logits[6, :-1] = -math.inf                           # only the last token possible
    logits[7, 100] = math.nan                            # NaN: NaN row
    logits[8, 5] = math.inf                              # +inf: NaN row
    x = _placed(logits.to(dtype), device)
    _check(x, labels)
    lp, ent = ops.token_logprobs(logits.to(dtype).to(device), labels.to(device),
                                 with_entropy=True)
    lp, ent = lp.cpu(), ent.cpu()
    assert torch.isnan(lp[[0, 7, 8]]).all() and torch.isnan(ent[[0, 7, 8]]).all()
    assert lp[1] == -math.inf and math.isfinite(ent[1])
    assert abs(ent[4] - math.log(vocab)) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_huge_fp32_magnitudes_are_exact(device, inplace_backward):
    """Logits of +-1e30 in fp32 where one maximum dominates: log-probs, entropy and gradients
    are then exact in fp32 too, so no tolerance scaled by the magnitude is needed. (Ties or
    uniform rows at such magnitudes are another matter: the fp32 logsumexp saved for the
    backward cannot hold log(count) next to 1e30, on any device; the magnitude-scaled
    tolerance of the other tests covers them.)"""
    vocab = 203
    logits = torch.randn(4, vocab)
    labels = torch.tensor([11, 12, 40, 41])
    logits[0, 11] = 1e30                                 # label at the maximum: log-prob 0
    logits[1, 11] = 1e30                                 # label elsewhere: -1e30
    logits[2, ::2] = -1e30                               # -1e30 weighs nothing (label on one)
    logits[3, 40] = 1e30
    logits[3, 41] = -1e30
    _check(_placed(logits, device), labels, slack=0.0, inplace_backward=inplace_backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bfloat16_extremes(device, temperature):
    """The largest finite bf16 values (3.39e38) with temperature >= 1, so that logit /
    temperature stays finite in fp32 (a smaller temperature overflows it; the row is then NaN,
    on the CPU and the GPU alike), and the smallest normal ones."""
    big = torch.finfo(torch.bfloat16).max
    tiny = torch.finfo(torch.bfloat16).tiny
    vocab = 19
    logits = torch.randn(4, vocab)
    logits[0, 3] = big
    logits[1, 3], logits[1, 4] = big, -big
    logits[2, ::2] = tiny
    logits[3, 7] = -big
    labels = torch.tensor([3, 5, 1, 7])
    _check(_placed(logits.bfloat16(), device), labels, temperature=temperature, slack=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_incoming_gradients(device):
    """Incoming gradients of a .sum(): scalars expanded to the outputs' shape."""
    logits = _placed(torch.randn(4, 5, 77), device)
    _check(logits, _labels((4, 5), 77), expanded_grads=True, temperature=0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary(device, dtype):
    vocab = 151936
    logits = _placed((torch.randn(3, vocab) * 2).to(dtype), device)
    _check(logits, _labels((3,), vocab, 0.0), temperature=0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_empty_batches(device, inplace_backward):
    for shape in [(0, 9), (2, 0, 9)]:
        logits = torch.randn(shape, device=device, requires_grad=True)
        labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
        lp, ent = ops.token_logprobs(logits, labels, with_entropy=True,
                                     inplace_backward=inplace_backward)
        assert lp.shape == shape[:-1] and ent.shape == shape[:-1]
        (lp.sum() + ent.sum()).backward()
        assert logits.grad.shape == shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
def test_out_of_range_labels_give_nan_never_a_fault(device, label_dtype):
    """Past the Python check (as compiled graphs are), labels outside [0, V) are never read:
    their log-prob and their row of gradient are NaN, every other row is exact."""
    vocab = 10
    logits = torch.randn(5, vocab, device=device)
    labels = torch.tensor([2, 10**9 if label_dtype == torch.int64 else 2**31 - 1, -5, vocab, 9],
                          dtype=label_dtype, device=device)
    lp, _, lse = torch.ops.rlengine.token_logprobs(logits, labels, 1.0, IGNORE, False)
    lp = lp.cpu()
    assert torch.isnan(lp[1:4]).all() and torch.isfinite(lp[[0, 4]]).all()
    expected = torch.log_softmax(logits.cpu(), -1)
    torch.testing.assert_close(lp[[0, 4]], expected[[0, 4], [2, 9]])
    grad = torch.ops.rlengine.token_logprobs_backward(
        torch.ones(5, device=device), None, logits, labels, lse, torch.empty(0, device=device),
        1.0, IGNORE).cpu()
    assert torch.isnan(grad[1:4]).all() and torch.isfinite(grad[[0, 4]]).all()
    inplace = logits.clone()
    torch.ops.rlengine.token_logprobs_inplace_backward(
        torch.ones(5, device=device), None, inplace, labels, lse, torch.empty(0, device=device),
        1.0, IGNORE)
    assert torch.equal(inplace.cpu().nan_to_num(7.0), grad.nan_to_num(7.0))


@pytest.mark.parametrize("device", DEVICES)
def test_debug_switch_checks_labels_on_any_device(device, monkeypatch):
    """RLENGINE_CHECK_INPUTS=1 makes the wrapper read the labels on every device (on the CPU
    it always does) and raise before any kernel runs."""
    monkeypatch.setenv("RLENGINE_CHECK_INPUTS", "1")
    logits = torch.randn(3, 10, device=device)
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside \[0, 10\)"):
        ops.token_logprobs(logits, torch.tensor([0, 10, IGNORE], device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_outputs_are_fully_written(dtype):
    """Freshly allocated outputs whose memory was filled with NaN just before (the caching
    allocator hands the same block back) hold no NaN afterwards: every element is written,
    ignored rows included."""
    rows, vocab = 37, 1003
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(dtype)
    labels = _labels((rows,), vocab).cuda()
    poison = torch.full((rows, vocab), math.nan, dtype=dtype, device="cuda")
    poison_ptr = poison.data_ptr()
    del poison
    grad = torch.ops.rlengine.token_logprobs_backward(
        torch.randn(rows, device="cuda"), torch.randn(rows, device="cuda"), logits, labels,
        torch.logsumexp(logits.float(), -1), torch.rand(rows, device="cuda"), 1.0, IGNORE)
    assert not torch.isnan(grad).any()
    small = torch.full((3 * rows,), math.nan, device="cuda")
    del small
    lp, ent, lse = torch.ops.rlengine.token_logprobs(logits, labels, 1.0, IGNORE, True)
    assert not (torch.isnan(lp).any() or torch.isnan(ent).any() or torch.isnan(lse).any())
    if grad.data_ptr() != poison_ptr:
        pytest.skip("the allocator did not hand the poisoned block back; values still checked")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_inplace_backward_allocates_nothing_vocabulary_sized():
    rows, vocab = 256, 32000
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    lp, ent = ops.token_logprobs(logits, labels, with_entropy=True, inplace_backward=True)
    loss = lp.sum() + ent.sum()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < rows * vocab * 2 // 8, f"backward allocated {extra} bytes"
    assert logits.grad.data_ptr() == logits.data_ptr()
