"""rlengine.ops.token_logprobs against reference.token_logprobs evaluated in float64."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPES,
    FP32_EPS,
    assert_compiles_fullgraph,
    assert_matches,
    incoming_gradient,
    result_dtype,
    to64,
)
from hypothesis import given
from hypothesis import strategies as st

from rlengine import ops
from rlengine.ops import reference

IGNORE = -100


def _labels(shape, vocab, ignore_fraction=0.2):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_fraction] = IGNORE
    return labels


def _check_forward_backward(logits, labels, *, temperature=1.0, ignore_index=IGNORE,
                            with_entropy=True):
    """Kernel forward and backward (with random incoming gradients for both outputs) equal
    the float64 reference's, within the tolerance of logits.dtype."""
    dtype = logits.dtype
    # fp32 arithmetic on z = logits / temperature is exact to about eps * |z| (absolute), which
    # matters for the adversarial rows with |z| ~ 1e4 (log_softmax in fp32 would do no better).
    finite = logits.double()[torch.isfinite(logits)]
    magnitude = float(finite.abs().max()) / temperature if finite.numel() else 0.0
    slack = 0.0 if dtype == torch.float64 else 16 * FP32_EPS * magnitude
    x = logits.detach().clone().requires_grad_()
    x64 = to64(logits).requires_grad_()
    kwargs = dict(temperature=temperature, ignore_index=ignore_index)
    out = ops.token_logprobs(x, labels, with_entropy=with_entropy, **kwargs)
    ref = reference.token_logprobs(x64, labels, with_entropy=with_entropy, **kwargs)
    out = out if with_entropy else (out,)
    ref = ref if with_entropy else (ref,)
    for name, o, r in zip(("logprobs", "entropy"), out, ref):
        assert o.dtype == result_dtype(dtype)
        assert_matches(o, r, dtype, what=name, extra_atol=slack)
    finite = [incoming_gradient(o, where=torch.isfinite(r)) for o, r in zip(out, ref)]
    torch.autograd.backward([o for o in out], [g.to(o.dtype) for o, g in zip(out, finite)])
    torch.autograd.backward(list(ref), finite)
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    largest_grad = max((float(g.abs().max()) for g in finite if g.numel()), default=0.0)
    assert_matches(x.grad, x64.grad, dtype, gradient=True, what="grad logits",
                   extra_atol=slack * largest_grad / temperature)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7), (5, 31), (17, 2049), (4, 2, 4099),
                                   (6, 32003)])
def test_matches_reference(shape, dtype):
    logits = (torch.randn(shape) * 4).to(dtype)
    _check_forward_backward(logits, _labels(shape[:-1], shape[-1]), temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary(dtype):
    vocab = 128256
    logits = (torch.randn(3, vocab) * 2).to(dtype)
    _check_forward_backward(logits, _labels((3,), vocab, 0.0))


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
def test_temperature_and_outputs(temperature, with_entropy):
    logits = torch.randn(9, 300) * 3
    _check_forward_backward(logits, _labels((9,), 300), temperature=temperature,
                            with_entropy=with_entropy)


def test_strided_logits_are_read_in_place():
    # logits[:, :-1] of a causal LM: leading dims strided, vocabulary contiguous.
    full = torch.randn(3, 8, 513)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    _check_forward_backward(logits, _labels((3, 7), 513))
    # A vocabulary dimension with stride != 1 is copied, with the same results.
    transposed = torch.randn(513, 6).t()
    _check_forward_backward(transposed, _labels((6,), 513))


def test_labels_noncontiguous_and_int32():
    logits = torch.randn(7, 50)
    labels = _labels((7, 2), 50)[:, 0]
    assert not labels.is_contiguous()
    _check_forward_backward(logits, labels.to(torch.int32))


def test_ignored_positions_are_exactly_zero():
    logits = torch.randn(6, 40, requires_grad=True)
    labels = torch.full((6,), 7)
    labels[[1, 4]] = IGNORE
    logprobs, entropy = ops.token_logprobs(logits, labels, with_entropy=True)
    assert logprobs[[1, 4]].eq(0).all() and entropy[[1, 4]].eq(0).all()
    (logprobs.sum() + entropy.sum()).backward()
    assert logits.grad[[1, 4]].eq(0).all()
    assert logits.grad[[0, 2, 3, 5]].ne(0).any(dim=1).all()


def test_custom_ignore_index():
    logits = torch.randn(5, 11)
    labels = torch.tensor([0, 3, 10, 3, 1])
    out = ops.token_logprobs(logits, labels, ignore_index=3)
    assert out[1] == 0 and out[3] == 0
    torch.testing.assert_close(out, reference.token_logprobs(logits, labels, ignore_index=3))


def test_every_position_ignored_and_empty_batch():
    logits = torch.randn(4, 9, requires_grad=True)
    out, entropy = ops.token_logprobs(logits, torch.full((4,), IGNORE), with_entropy=True)
    assert out.eq(0).all() and entropy.eq(0).all()
    (out.sum() + entropy.sum()).backward()
    assert logits.grad.eq(0).all()
    empty = torch.randn(0, 9, requires_grad=True)
    lp, ent = ops.token_logprobs(empty, torch.zeros(0, dtype=torch.long), with_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    lp.sum().backward()
    assert empty.grad.shape == (0, 9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_values(dtype):
    vocab = 2053
    logits = torch.randn(8, vocab) * 2
    labels = torch.randint(0, vocab, (8,))
    logits[0] = -math.inf                                # all -inf: NaN, as log_softmax gives
    logits[1, labels[1]] = -math.inf                     # -inf label logit: -inf log-prob
    logits[2, ::3] = -math.inf                           # many -inf logits: finite entropy
    logits[3] = torch.randn(vocab) * 1e4                 # huge magnitudes
    logits[4] = 1e4 * torch.sign(torch.randn(vocab))
    logits[5] = 0.0                                      # uniform: entropy log V
    logits[6, 17] = 1e4                                  # one-hot: entropy 0, log-prob -1e4
    logits[7, :-1] = -math.inf                           # only the last token possible
    logits = logits.to(dtype)                            # all of these fit float16 too
    _check_forward_backward(logits, labels)
    lp, ent = ops.token_logprobs(logits, labels, with_entropy=True)
    assert torch.isnan(lp[0]) and torch.isnan(ent[0])
    assert lp[1] == -math.inf and math.isfinite(ent[1])
    assert abs(ent[5] - math.log(vocab)) < 1e-4


def test_nan_and_posinf_rows_are_nan():
    logits = torch.randn(3, 100)
    logits[0, 5] = math.nan
    logits[1, 9] = math.inf
    lp, ent = ops.token_logprobs(logits, torch.tensor([1, 2, 3]), with_entropy=True)
    assert torch.isnan(lp[:2]).all() and torch.isnan(ent[:2]).all()
    assert torch.isfinite(lp[2]) and torch.isfinite(ent[2])


def test_no_vocabulary_sized_temporaries():
    """The forward allocates only its O(N) outputs (measured by the profiler's allocator
    events): no N x V float32 temporary, whatever the logits dtype."""
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(64, 4096).bfloat16()
    labels = torch.randint(0, 4096, (64,))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ops.token_logprobs(logits, labels, with_entropy=True)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    largest = max((e.nbytes() for e in events), default=0)
    assert largest <= 64 * 8 * 4, f"largest allocation {largest} bytes"


def test_gradcheck_float64():
    logits = torch.randn(4, 3, 7, dtype=torch.float64, requires_grad=True)
    labels = _labels((4, 3), 7)

    def both(x):
        return ops.token_logprobs(x, labels, temperature=0.8, with_entropy=True)

    assert torch.autograd.gradcheck(both, (logits,))
    assert torch.autograd.gradcheck(lambda x: ops.token_logprobs(x, labels), (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_opcheck(dtype, with_entropy):
    logits = torch.randn(3, 5, 37).to(dtype).requires_grad_()
    labels = _labels((3, 5), 37)
    torch.library.opcheck(torch.ops.rlengine.token_logprobs.default,
                          (logits, labels, 0.9, IGNORE, with_entropy))
    lse = torch.logsumexp(logits.detach().float() / 0.9, -1)
    entropy = torch.rand(3, 5)
    torch.library.opcheck(torch.ops.rlengine.token_logprobs_backward.default,
                          (torch.randn(3, 5), torch.randn(3, 5), logits.detach(), labels, lse,
                           entropy, 0.9, IGNORE))
    torch.library.opcheck(torch.ops.rlengine.token_logprobs.default,
                          (logits, labels, 0.9, IGNORE, with_entropy, True))
    grad_entropy = torch.randn(3, 5) if with_entropy else None
    torch.library.opcheck(torch.ops.rlengine.token_logprobs_inplace_backward.default,
                          (torch.randn(3, 5), grad_entropy, logits.detach().clone(), labels, lse,
                           entropy, 0.9, IGNORE))


def test_compiles_fullgraph():
    def loss(x, y):
        lp, ent = ops.token_logprobs(x[:, :-1], y[:, 1:], temperature=0.9, with_entropy=True)
        return (lp * 2 + 0.1 * ent).sum()

    x = torch.randn(2, 6, 33, requires_grad=True)
    assert_compiles_fullgraph(loss, x, _labels((2, 6), 33), wrt=(x,))


# ---- property tests: fresh adversarial inputs ---------------------------------------------

SPECIALS = st.sampled_from([0.0, -math.inf, 1e4, -1e4, 30.0, -30.0, 1e-30])


@st.composite
def logits_and_labels(draw):
    rows = draw(st.integers(0, 6))
    vocab = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    logits = torch.randn(rows, vocab, dtype=torch.float64) * scale
    for _ in range(draw(st.integers(0, 8))):           # sprinkle special values
        if rows:
            r, c = draw(st.integers(0, rows - 1)), draw(st.integers(0, vocab - 1))
            logits[r, c] = draw(SPECIALS)
    if rows and draw(st.booleans()):                     # a whole row of -inf
        logits[draw(st.integers(0, rows - 1))] = -math.inf
    labels = torch.randint(0, vocab, (rows,))
    labels[torch.rand(rows) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = IGNORE
    temperature = draw(st.sampled_from([1.0, 0.5, 3.0]))
    logits = logits.to(dtype)
    layout = draw(st.sampled_from(["contiguous", "row_strided", "vocab_strided"]))
    if layout == "row_strided":        # rows padded apart, vocabulary contiguous: read in place
        logits = torch.cat([logits, torch.randn(rows, 3).to(dtype)], dim=1)[:, :vocab]
    elif layout == "vocab_strided":    # vocabulary stride 2: copied by the op
        logits = logits.repeat_interleave(2, dim=1)[:, ::2]
    return logits, labels, temperature


@given(logits_and_labels())
def test_property_matches_reference(case):
    logits, labels, temperature = case
    _check_forward_backward(logits, labels, temperature=temperature)


# ---- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("make_args, error, fragment", [
    (lambda: (torch.randn(4, 10), torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape"),
    (lambda: (torch.randn(4, 10), torch.zeros(4)), TypeError, "labels must be int64 or int32"),
    (lambda: (torch.randint(0, 5, (4, 10)), torch.zeros(4, dtype=torch.long)), TypeError, "logits must be float"),
    (lambda: (torch.randn(()), torch.zeros((), dtype=torch.long)), ValueError, "vocabulary dimension"),
    (lambda: (torch.randn(4, 0), torch.zeros(4, dtype=torch.long)), ValueError, "vocabulary size"),
    (lambda: (torch.randn(4, 10), torch.tensor([0, 1, 10, 2])), ValueError, "labels[2] = 10 is outside [0, 10)"),
    (lambda: (torch.randn(4, 10), torch.tensor([0, -1, 3, 2])), ValueError, "labels[1] = -1"),
    (lambda: ([[0.0]], torch.zeros(1, dtype=torch.long)), TypeError, "logits must be a torch.Tensor"),
    (lambda: (torch.randn(4, 10), torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "is on meta"),
])
def test_bad_input_raises_named_error(make_args, error, fragment):
    logits, labels = make_args()
    with pytest.raises(error, match="rlengine.token_logprobs") as info:
        ops.token_logprobs(logits, labels)
    assert fragment in str(info.value)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan, "1.0"])
def test_bad_temperature(temperature):
    with pytest.raises((ValueError, TypeError), match="temperature"):
        ops.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
                           temperature=temperature)


def test_kernel_never_reads_out_of_range_labels():
    """Calling the op directly (as compiled graphs do, past the Python check) with labels out
    of range returns NaN there and leaves the other positions exact."""
    logits = torch.randn(3, 10)
    labels = torch.tensor([2, 10**9, -5])
    lp, _, _ = torch.ops.rlengine.token_logprobs(logits, labels, 1.0, IGNORE, False)
    assert torch.isnan(lp[1:]).all()
    torch.testing.assert_close(lp[0], torch.log_softmax(logits[0], -1)[2])


# ---- in-place backward --------------------------------------------------------------------

def _leaf_with_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf tensor holding values in the given memory layout."""
    if layout == "contiguous":
        return values.clone().requires_grad_()
    if layout == "row_strided":  # rows padded apart and starting off 16-byte boundaries
        padded = torch.zeros(*values.shape[:-1], values.shape[-1] + 3, dtype=values.dtype)
        padded[..., 1:-2] = values
        return padded[..., 1:-2].detach().requires_grad_()
    assert layout == "vocab_strided"  # vocabulary stride 2: the kernel works on a copy
    wide = values.repeat_interleave(2, dim=-1)
    return wide[..., ::2].detach().requires_grad_()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "vocab_strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_equals_out_of_place_bitwise(dtype, layout):
    values = (torch.randn(4, 3, 133) * 3).to(dtype)
    values[1, 2] = -math.inf                  # a NaN row of gradient
    values[2, 0, ::5] = -math.inf
    labels = _labels((4, 3), 133)
    labels[0, 1] = IGNORE
    grads = [torch.randn(4, 3), torch.randn(4, 3)]
    results = {}
    for inplace in (False, True):
        x = _leaf_with_layout(values, layout)
        lp, ent = ops.token_logprobs(x, labels, temperature=0.7, with_entropy=True,
                                     inplace_backward=inplace)
        torch.autograd.backward([lp, ent], [g.to(lp.dtype) for g in grads])
        results[inplace] = x
    out_of_place, in_place = results[False].grad, results[True].grad
    assert torch.equal(_bits(in_place), _bits(out_of_place))
    # The logits' memory now holds the gradient. A contiguous leaf takes that very memory as
    # its .grad; for other leaves autograd's layout rule for .grad makes a contiguous copy.
    x = results[True]
    assert torch.equal(_bits(x), _bits(out_of_place))
    if layout == "contiguous":
        assert in_place.data_ptr() == x.data_ptr()


def test_inplace_backward_of_a_view_writes_through_its_strides():
    """logits[:, :-1] of a leaf: the gradient handed to the slice's backward is the view's own
    memory with its strides, and the leaf gets the usual full-shape gradient."""
    full = torch.randn(3, 6, 41, requires_grad=True)
    labels = _labels((3, 5), 41)
    expected = torch.autograd.grad(ops.token_logprobs(full[:, :-1], labels).sum(), full)[0]
    logits = full[:, :-1]
    seen = {}
    logits.register_hook(lambda g: seen.update(ptr=g.data_ptr(), stride=g.stride()))
    ops.token_logprobs(logits, labels, inplace_backward=True).sum().backward()
    assert seen == {"ptr": logits.data_ptr(), "stride": logits.stride()}
    assert torch.equal(full.grad, expected)
    assert torch.equal(full.detach()[:, :-1], expected[:, :-1])  # the leaf's memory holds it


def test_inplace_backward_allocates_nothing_vocabulary_sized():
    """Measured by the profiler's allocator events during the backward: the out-of-place
    backward allocates the N x V gradient, the in-place one only O(N) buffers."""
    from torch.profiler import ProfilerActivity, profile

    rows, vocab = 64, 4096
    labels = torch.randint(0, vocab, (rows,))
    largest = {}
    for inplace in (False, True):
        logits = torch.randn(rows, vocab, requires_grad=True)
        lp, ent = ops.token_logprobs(logits, labels, with_entropy=True, inplace_backward=inplace)
        loss = lp.sum() + 0.5 * ent.sum()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss.backward()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        largest[inplace] = max((e.nbytes() for e in events), default=0)
        assert logits.grad is not None
    assert largest[False] >= rows * vocab * 4, "the probe no longer sees the gradient buffer"
    assert largest[True] <= rows * 8 * 4, f"largest allocation {largest[True]} bytes"


def test_inplace_backward_version_counter():
    labels = _labels((4,), 9)
    # Bumped by the write, and the op's own saved logits are read before it: no error.
    x = torch.randn(4, 9, requires_grad=True)
    ops.token_logprobs(x, labels, inplace_backward=True).sum().backward()
    assert x._version == 1
    # A second backward through the same graph would read the overwritten logits: it raises.
    x = torch.randn(4, 9, requires_grad=True)
    lp = ops.token_logprobs(x, labels, inplace_backward=True)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()
    # Another node that saved the logits and runs after this op's backward raises too (the
    # engine runs the later-created node first), instead of silently reading the gradient.
    hidden = torch.randn(4, 5, requires_grad=True)
    logits = hidden @ torch.randn(5, 9)
    other = logits.sin().sum()
    lp = ops.token_logprobs(logits, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + other).backward()


def test_inplace_backward_rejects_double_backward_and_shared_memory():
    labels = _labels((4,), 9)
    x = torch.randn(4, 9, requires_grad=True)
    lp = ops.token_logprobs(x, labels, inplace_backward=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lp.sum(), x, create_graph=True)
    row = torch.randn(1, 9, requires_grad=True)
    with pytest.raises(ValueError, match="do not share memory"):
        ops.token_logprobs(row.expand(4, 9), labels, inplace_backward=True)
    with pytest.raises(TypeError, match="inplace_backward must be a bool"):
        ops.token_logprobs(x, labels, inplace_backward=1)


def test_inplace_backward_compiles_fullgraph():
    def loss(x, y):
        lp, ent = ops.token_logprobs(x[:, :-1], y[:, 1:], temperature=0.9, with_entropy=True,
                                     inplace_backward=True)
        return (lp * 2 + 0.1 * ent).sum()

    values = torch.randn(2, 6, 33)
    labels = _labels((2, 6), 33)
    expected_leaf = values.clone().requires_grad_()
    expected = torch.autograd.grad(loss(expected_leaf, labels), expected_leaf)[0]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = values.clone().requires_grad_()
    assert torch.equal(torch.autograd.grad(compiled(x, labels), x)[0], expected)
