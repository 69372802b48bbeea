"""rlengine.ops.fused_linear_logprobs against reference.fused_linear_logprobs in float64.

Two paths are tested: the chunked path (CPU tensors; test_chunked_*, plus the API tests) and
the Triton kernels (test_triton_*): on a GPU directly, and on a CPU machine in a subprocess
with TRITON_INTERPRET=1 (test_kernels_under_interpreter), since Triton reads that variable
when the kernels are decorated, and once decorated for the interpreter they take CPU tensors.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    FORWARD_TOLERANCE,
    FP32_EPS,
    GRADIENT_TOLERANCE,
    assert_compiles_fullgraph,
    incoming_gradient,
    result_dtype,
)

from rlengine import ops
from rlengine.ops import fused_linear, reference

IGNORE = -100
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if HAS_TRITON and torch.cuda.is_available():
    TRITON_DEVICE = "cuda"
elif HAS_TRITON and INTERPRETING:
    TRITON_DEVICE = "cpu"
else:
    TRITON_DEVICE = None

triton_kernels = pytest.mark.skipif(
    TRITON_DEVICE is None,
    reason="needs a GPU, or TRITON_INTERPRET=1 (test_kernels_under_interpreter sets it)")
# Under TRITON_INTERPRET=1 CPU tensors take the Triton kernels, so the chunked path is not run.
chunked_path = pytest.mark.skipif(INTERPRETING, reason="CPU tensors run Triton here")

# The Triton tests' shapes: N, H and V are not multiples of the row block, the K tile or the
# vocabulary tile, and V spans two forward splits and three backward chunks in the interpreter.
N, H, V = 37, 45, 203

# Unit roundoff of the dtype a kernel may round the logits' gradient to before the matmuls
# that produce grad_hidden and grad_weight (the Triton backward stores it in the inputs' dtype).
ROUNDOFF = {torch.float32: FP32_EPS, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8,
            torch.float16: 2.0**-11}


def _inputs(shape, hidden_size, vocab, dtype, *, bias=True, ignore_fraction=0.2,
            device="cpu", scale=1.0):
    hidden = torch.randn(*shape, hidden_size, dtype=torch.float64) * scale
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64) / math.sqrt(hidden_size) * 3
    b = torch.randn(vocab, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignore_fraction] = IGNORE
    convert = lambda t: None if t is None else t.to(dtype).to(device)
    return convert(hidden), convert(weight), labels.to(device), convert(b)


def _assert_close(actual, expected, dtype, *, gradient, what, bound=None, extra_atol=0.0):
    """|actual - expected| <= atol + rtol |expected| + bound elementwise (bound: an error
    bound of the arithmetic, a tensor like expected), NaNs in the same places."""
    atol, rtol = (GRADIENT_TOLERANCE if gradient else FORWARD_TOLERANCE)[dtype]
    actual = actual.detach().cpu().to(torch.float64)
    expected = expected.detach().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what} ({dtype}): NaNs differ"
    same_inf = (actual == expected) & torch.isinf(expected)
    allowed = atol + extra_atol + rtol * expected.abs() + (0 if bound is None else bound.cpu())
    error = (actual - expected).abs()
    bad = ~nan & ~same_inf & ~(error <= allowed)
    assert not bad.any(), (f"{what} ({dtype}): {int(bad.sum())} of {bad.numel()} elements off, "
                           f"worst error {float(error[bad].max())} at "
                           f"{tuple(bad.nonzero()[0].tolist())}")


def _check_forward_backward(hidden, weight, labels, bias=None, *, temperature=0.7,
                            ignore_index=IGNORE, with_entropy=True, wrt=("hidden", "weight",
                                                                         "bias")):
    """Op forward and backward (random incoming gradients for both outputs) equal the float64
    reference's, within the dtype's tolerance plus bounds of the expected rounding."""
    dtype = hidden.dtype
    leaves = dict(hidden=hidden, weight=weight, bias=bias)
    inputs = {k: None if t is None else t.detach().clone().requires_grad_(k in wrt)
              for k, t in leaves.items()}
    inputs64 = {k: None if t is None else t.detach().cpu().double().requires_grad_()
                for k, t in leaves.items()}
    kwargs = dict(temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy)
    out = ops.fused_linear_logprobs(inputs["hidden"], inputs["weight"], labels, inputs["bias"],
                                    **kwargs)
    logits64 = torch.nn.functional.linear(inputs64["hidden"], inputs64["weight"],
                                          inputs64["bias"])
    logits64.retain_grad()
    ref = reference.token_logprobs(logits64, labels.cpu(), **kwargs)
    out = out if with_entropy else (out,)
    ref = ref if with_entropy else (ref,)
    # fp32 logits carry ~eps * sum |h_k w_k| of error (a matmul) and the kernels' z = logits / T
    # another eps * |z|; both scale with the magnitudes (large on the adversarial inputs).
    magnitude = (inputs64["hidden"].detach().abs().reshape(-1, hidden.shape[-1])
                 @ inputs64["weight"].detach().abs().t())
    if bias is not None:
        magnitude = magnitude + inputs64["bias"].detach().abs()
    finite = magnitude[torch.isfinite(magnitude)]
    scale = float(finite.max()) / temperature if finite.numel() else 0.0
    slack = 0.0 if dtype == torch.float64 else 32 * FP32_EPS * scale
    for name, o, r in zip(("logprobs", "entropy"), out, ref):
        assert o.dtype == result_dtype(dtype) and o.shape == labels.shape
        _assert_close(o, r, dtype, gradient=False, what=name, extra_atol=slack)

    grads = [incoming_gradient(r, where=torch.isfinite(r)) for r in ref]
    torch.autograd.backward(list(out), [g.to(o.dtype).to(o.device) for o, g in zip(out, grads)])
    torch.autograd.backward(list(ref), grads)
    # The logits' gradient may be rounded to the inputs' dtype (u each) before the matmuls,
    # and itself carries the logits' error (slack, relative to its size ~ |g| / T).
    dlogits = logits64.grad.abs().reshape(-1, weight.shape[0])
    unit = 4 * ROUNDOFF[dtype] + (slack * 4 if dtype != torch.float64 else 0.0)
    flat_hidden = inputs64["hidden"].detach().abs().reshape(-1, hidden.shape[-1])
    bounds = dict(hidden=(unit * dlogits @ inputs64["weight"].detach().abs()).reshape(
                      hidden.shape),
                  weight=unit * dlogits.t() @ flat_hidden,
                  bias=unit * dlogits.sum(0))
    largest = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)
    for name in leaves:
        if leaves[name] is None:
            continue
        if name not in wrt:
            assert inputs[name].grad is None
            continue
        got = inputs[name].grad
        assert got.dtype == dtype and got.shape == leaves[name].shape, name
        assert got.device == leaves[name].device
        _assert_close(got, inputs64[name].grad, dtype, gradient=True, what=f"grad {name}",
                      bound=bounds[name], extra_atol=slack * largest / temperature)
    return out


# ---- the chunked path (CPU) ---------------------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that small inputs cross several chunk boundaries."""
    monkeypatch.setattr(fused_linear, "CHUNK_BYTES", 5 * 256 * 8)


@chunked_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape, hidden_size, vocab", [
    ((1,), 1, 1), ((N,), H, V), ((3, 7), 16, 255), ((9,), 64, 2053)])
def test_chunked_matches_reference(small_chunks, shape, hidden_size, vocab, with_bias, dtype):
    hidden, weight, labels, bias = _inputs(shape, hidden_size, vocab, dtype, bias=with_bias)
    _check_forward_backward(hidden, weight, labels, bias)


@chunked_path
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
def test_chunked_temperature_and_outputs(temperature, with_entropy):
    hidden, weight, labels, bias = _inputs((N,), H, V, torch.float32)
    _check_forward_backward(hidden, weight, labels, bias, temperature=temperature,
                            with_entropy=with_entropy)


@chunked_path
def test_chunked_strided_inputs_and_int32_labels(small_chunks):
    # hidden[:, :-1] of a causal LM, a weight stored transposed, int32 labels.
    hidden, weight, labels, bias = _inputs((3, 8), 24, 101, torch.float32)
    hidden = hidden[:, :-1]
    weight = weight.t().contiguous().t()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    _check_forward_backward(hidden, weight, labels[:, 1:].to(torch.int32), bias)


@chunked_path
@pytest.mark.parametrize("wrt", [("hidden",), ("weight",), ("bias",), ("weight", "bias")])
def test_chunked_only_requested_gradients(wrt):
    hidden, weight, labels, bias = _inputs((N,), H, V, torch.float32)
    _check_forward_backward(hidden, weight, labels, bias, wrt=wrt)


@chunked_path
def test_chunked_adversarial_values(small_chunks):
    _check_adversarial("cpu")


@chunked_path
def test_chunked_ignored_rows_empty_batch_and_custom_ignore_index(small_chunks):
    _check_ignored_and_empty("cpu")


@chunked_path
def test_chunked_out_of_range_labels_past_the_check():
    _check_out_of_range_labels("cpu")


@chunked_path
def test_chunked_memory_stays_far_below_logits_size(monkeypatch):
    """Forward + backward allocate far less than the N x V fp32 logits (profiler allocator
    events, as in bench/harness.py): one chunk of logits and one of their gradient."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(fused_linear, "CHUNK_BYTES", 2**20)
    rows, hidden_size, vocab = 1024, 32, 2048
    hidden, weight, labels, bias = _inputs((rows,), hidden_size, vocab, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    logits_bytes = rows * vocab * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lp, ent = ops.fused_linear_logprobs(hidden, weight, labels, bias, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    # inputs' gradients (hidden: rows x H, weight: V x H, bias) + two 1 MiB chunks + O(N)
    gradients = (rows * hidden_size + vocab * hidden_size + vocab) * 4
    assert peak <= gradients + 3 * 2**20 + 64 * rows * 8, f"peak {peak} bytes"
    assert peak < logits_bytes / 2


@chunked_path
def test_chunked_gradcheck_float64(small_chunks):
    hidden, weight, labels, bias = _inputs((2, 3), 5, 7, torch.float64)
    args = [t.requires_grad_() for t in (hidden, weight, bias)]

    def both(h, w, b):
        return ops.fused_linear_logprobs(h, w, labels, b, temperature=0.8, with_entropy=True)

    assert torch.autograd.gradcheck(both, args)
    assert torch.autograd.gradcheck(lambda h, w: ops.fused_linear_logprobs(h, w, labels),
                                    args[:2])


@chunked_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_opcheck(dtype, with_entropy):
    hidden, weight, labels, bias = _inputs((11,), 8, 37, dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(torch.ops.rlengine.fused_linear_logprobs.default,
                          (hidden, weight, bias, labels, 0.9, IGNORE, with_entropy))
    # the chunked op is internal (no autograd of its own): checked without gradients
    torch.library.opcheck(torch.ops.rlengine.fused_linear_logprobs_chunked.default,
                          (hidden.detach(), weight.detach(), bias, labels, 0.9, IGNORE,
                           with_entropy))
    lp, ent, lse = torch.ops.rlengine.fused_linear_logprobs.default(
        hidden.detach(), weight.detach(), bias, labels, 0.9, IGNORE, with_entropy)
    grads = (torch.randn_like(lp), torch.randn_like(lp) if with_entropy else None)
    for op in (torch.ops.rlengine.fused_linear_logprobs_backward.default,
               torch.ops.rlengine.fused_linear_logprobs_chunked_backward.default):
        torch.library.opcheck(op, (*grads, hidden.detach(), weight.detach(), bias, labels, lse,
                                   ent, 0.9, IGNORE, True, True, True))


@chunked_path
def test_chunked_compiles_fullgraph():
    def loss(h, w, b, y):
        lp, ent = ops.fused_linear_logprobs(h[:, :-1], w, y[:, 1:], b, temperature=0.9,
                                            with_entropy=True)
        return (lp * 2 + 0.1 * ent).sum()

    hidden, weight, labels, bias = _inputs((2, 6), 8, 33, torch.float32)
    args = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert_compiles_fullgraph(loss, *args, labels, wrt=tuple(args))


# ---- API: arguments and path choice -----------------------------------------------------------

def _valid():
    return torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("make_args, error, fragment", [
    (lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape"),
    (lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)), TypeError, "labels must be int64 or int32"),
    (lambda: (torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long)), ValueError, "hidden size"),
    (lambda: (torch.randn(4, 8), torch.randn(10, 8, 1), torch.zeros(4, dtype=torch.long)), ValueError, "weight must be 2-D"),
    (lambda: (torch.randn(4, 8), torch.randn(0, 8), torch.zeros(4, dtype=torch.long)), ValueError, "vocabulary size"),
    (lambda: (torch.randn(()), torch.randn(10, 8), torch.zeros((), dtype=torch.long)), ValueError, "hidden dimension"),
    (lambda: (torch.randn(4, 8).double(), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), TypeError, "weight must have hidden's dtype"),
    (lambda: (torch.randint(0, 3, (4, 8)), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), TypeError, "hidden must be float"),
    (lambda: ([[0.0]], torch.randn(10, 8), torch.zeros(4, dtype=torch.long)), TypeError, "hidden must be a torch.Tensor"),
    (lambda: (*_valid()[:2], torch.tensor([0, 1, 10, 2])), ValueError, "labels[2] = 10 is outside [0, 10)"),
    (lambda: (*_valid()[:2], torch.tensor([0, -1, 3, 2])), ValueError, "labels[1] = -1"),
    (lambda: (*_valid()[:2], torch.zeros(4, dtype=torch.long, device="meta")), ValueError, "is on meta"),
])
def test_bad_input_raises_named_error(make_args, error, fragment):
    hidden, weight, labels = make_args()
    with pytest.raises(error, match="rlengine.fused_linear_logprobs") as info:
        ops.fused_linear_logprobs(hidden, weight, labels)
    assert fragment in str(info.value)


@pytest.mark.parametrize("bias, error, fragment", [
    (torch.randn(9), ValueError, "bias must have shape (10,)"),
    (torch.randn(10, 1), ValueError, "bias must be 1-D"),
    (torch.randn(10).double(), TypeError, "bias must have weight's dtype"),
    (torch.randn(10, device="meta"), ValueError, "bias is on meta"),
])
def test_bad_bias(bias, error, fragment):
    with pytest.raises(error, match="rlengine.fused_linear_logprobs") as info:
        ops.fused_linear_logprobs(*_valid(), bias)
    assert fragment in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=-1.0),
                                    dict(temperature=math.nan), dict(temperature="1"),
                                    dict(ignore_index=1.5), dict(ignore_index=True)])
def test_bad_scalars(kwargs):
    with pytest.raises((ValueError, TypeError), match="rlengine.fused_linear_logprobs"):
        ops.fused_linear_logprobs(*_valid(), **kwargs)


def test_path_switch():
    assert not fused_linear.uses_triton(torch.device("meta"))
    assert fused_linear.uses_triton(torch.device("cpu")) == (TRITON_DEVICE == "cpu")
    if torch.cuda.is_available():
        assert fused_linear.uses_triton(torch.device("cuda")) == HAS_TRITON


# ---- shared checks of both paths ----------------------------------------------------------------

def _check_adversarial(device):
    hidden, weight, labels, bias = _inputs((N,), H, V, torch.float32, ignore_fraction=0.0)
    bias[::7] = -math.inf                        # -inf logits (banned tokens): p = 0 there
    labels[labels % 7 == 0] += 1
    labels[0] = 7                                # a label whose logit is -inf: -inf log-prob
    # huge logits, one far above the rest: a one-hot softmax, entropy ~ 0 (scaling a random
    # row instead leaves its top two logits as close as they were drawn)
    hidden[1] = 300 * weight[1] / weight[1].norm()
    hidden[2] = 0                                # logits = bias: spread over the finite ones
    labels[5:9] = IGNORE
    lp, ent = _check_forward_backward(hidden.to(device), weight.to(device), labels.to(device),
                                      bias.to(device))
    lp, ent = lp.detach().cpu(), ent.detach().cpu()
    assert lp[0] == -math.inf and math.isfinite(ent[0])
    assert ent[1] < 1e-3 and lp[5:9].eq(0).all() and ent[5:9].eq(0).all()
    assert torch.isfinite(lp[1:]).all() and torch.isfinite(ent).all()
    # Non-finite logits: NaN rows (forward; their NaN gradient reaches every weight row).
    hidden[3, 5] = math.nan
    hidden[4, 0] = math.inf
    lp, ent = ops.fused_linear_logprobs(hidden.to(device), weight.to(device), labels.to(device),
                                        bias.to(device), with_entropy=True)
    ref_lp, ref_ent = reference.fused_linear_logprobs(
        hidden.double(), weight.double(), labels, bias.double(), with_entropy=True)
    assert torch.isnan(lp[3:5]).all() and torch.isnan(ent[3:5]).all()
    for o, r, what in ((lp, ref_lp, "logprobs"), (ent, ref_ent, "entropy")):
        _assert_close(o, r, torch.float32, gradient=False, what=what, extra_atol=1e-3)


def _check_ignored_and_empty(device):
    hidden, weight, labels, bias = _inputs((N,), H, V, torch.float32, device=device)
    hidden.requires_grad_()
    weight.requires_grad_()
    all_ignored = torch.full_like(labels, IGNORE)
    lp, ent = ops.fused_linear_logprobs(hidden, weight, all_ignored, bias, with_entropy=True)
    assert lp.eq(0).all() and ent.eq(0).all()
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.eq(0).all() and weight.grad.eq(0).all()
    # A custom ignore_index that is also a valid token id.
    labels = torch.randint(0, V, (N,), device=device)
    labels[::3] = 5
    _check_forward_backward(hidden.detach(), weight.detach(), labels, bias, ignore_index=5)
    # No rows at all.
    empty = torch.randn(0, H, device=device, requires_grad=True)
    w = weight.detach().clone().requires_grad_()
    lp, ent = ops.fused_linear_logprobs(empty, w, torch.zeros(0, dtype=torch.long,
                                                              device=device),
                                        with_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert empty.grad.shape == (0, H) and w.grad.eq(0).all()


def _check_out_of_range_labels(device):
    """The op called directly (as compiled graphs call it, past the wrapper's check) with
    labels outside [0, V): NaN log-prob there (the label's column is never read), the other
    rows exact, NaN gradient from those rows as token_logprobs_backward gives."""
    hidden, weight, labels, bias = _inputs((N,), H, V, torch.float32, ignore_fraction=0.0,
                                           device=device)
    labels[3] = V
    labels[4] = -5
    labels[5] = 10**12
    lp, _, _ = torch.ops.rlengine.fused_linear_logprobs.default(hidden, weight, bias, labels,
                                                                1.0, IGNORE, False)
    lp = lp.cpu()
    assert torch.isnan(lp[3:6]).all()
    keep = torch.ones(N, dtype=torch.bool)
    keep[3:6] = False
    expected = reference.fused_linear_logprobs(hidden.cpu().double()[keep],
                                               weight.cpu().double(), labels.cpu()[keep],
                                               bias.cpu().double())
    torch.testing.assert_close(lp[keep].double(), expected, atol=1e-5, rtol=1e-5)
    grad_hidden, _, _ = torch.ops.rlengine.fused_linear_logprobs_backward.default(
        torch.ones(N, device=device), None, hidden, weight, bias, labels,
        torch.zeros(N, device=device), torch.zeros(0, device=device), 1.0, IGNORE,
        True, False, False)
    assert torch.isnan(grad_hidden[3:6].cpu()).all()


# ---- the Triton kernels (GPU, or the CPU under the interpreter) ---------------------------------

@pytest.mark.skipif(TRITON_DEVICE is not None or not HAS_TRITON,
                    reason="the Triton tests run in this process" if HAS_TRITON
                    else "Triton is not installed")
def test_kernels_under_interpreter():
    """Runs this file's test_triton_* in a fresh interpreter with TRITON_INTERPRET=1 (set
    before anything imports Triton or decorates rlengine's kernels)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only contend
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x",
         "-k", "test_triton_", "-W", "ignore::RuntimeWarning"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout, result.stdout[-2000:]


@triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
def test_triton_matches_reference(dtype):
    hidden, weight, labels, bias = _inputs((N,), H, V, dtype, device=TRITON_DEVICE)
    _check_forward_backward(hidden, weight, labels, bias)


@triton_kernels
def test_triton_no_bias_no_entropy_leading_dims():
    hidden, weight, labels, _ = _inputs((2, 19), H, V, torch.float32, bias=False,
                                        device=TRITON_DEVICE)
    _check_forward_backward(hidden, weight, labels, None, temperature=1.0, with_entropy=False)


@triton_kernels
def test_triton_only_hidden_gradient_strided_hidden():
    hidden, weight, labels, bias = _inputs((N, 2), H, V, torch.bfloat16, device=TRITON_DEVICE)
    _check_forward_backward(hidden[:, 0], weight, labels[:, 0], bias, temperature=2.5,
                            wrt=("hidden",))


@triton_kernels
def test_triton_weight_and_bias_gradients_with_ignored_blocks():
    # the first 32 rows ignored: whole row blocks that skip the matmul in both kernels
    hidden, weight, labels, bias = _inputs((N,), H, V, torch.float32, device=TRITON_DEVICE)
    labels[:32] = IGNORE
    _check_forward_backward(hidden, weight, labels, bias, wrt=("weight", "bias"))


@triton_kernels
def test_triton_adversarial_values():
    _check_adversarial(TRITON_DEVICE)


@triton_kernels
def test_triton_ignored_rows_and_empty_batch():
    _check_ignored_and_empty(TRITON_DEVICE)


@triton_kernels
def test_triton_out_of_range_labels():
    _check_out_of_range_labels(TRITON_DEVICE)


@triton_kernels
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="GPU only: larger shapes, several chunks")
def test_triton_several_backward_chunks_and_splits(monkeypatch):
    from rlengine.ops.triton import fused_linear as kernels

    hidden, weight, labels, bias = _inputs((301,), 96, 5003, torch.bfloat16,
                                           device=TRITON_DEVICE)
    monkeypatch.setattr(kernels, "DLOGITS_CHUNK_BYTES", 301 * 1024 * 2)  # 1024 columns
    _check_forward_backward(hidden, weight, labels, bias)


@triton_kernels
@pytest.mark.skipif(TRITON_DEVICE != "cuda", reason="the interpreter cannot trace kernels")
def test_triton_compiles_fullgraph():
    def loss(h, w, b, y):
        lp, ent = ops.fused_linear_logprobs(h, w, y, b, temperature=0.9, with_entropy=True)
        return (lp * 2 + 0.1 * ent).sum()

    hidden, weight, labels, bias = _inputs((2, 40), 64, 300, torch.float32, device="cuda")
    args = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert_compiles_fullgraph(loss, *args, labels, wrt=tuple(args))


@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="needs Triton's compiler")
@pytest.mark.parametrize("kernel", ["forward", "dlogits", "combine"])
def test_triton_kernels_compile_for_sm90(kernel):
    """The kernels compile for H100 (sm_90a, through ptxas) with bf16 inputs at the target's
    hidden size, as the GPU's JIT will: no GPU is needed, and the interpreter, which never
    compiles, would not catch type or layout errors. The pipelined wgmma loop must appear."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rlengine.ops.triton import fused_linear as kernels

    common = dict(hidden_ptr="*bf16", weight_ptr="*bf16", bias_ptr="*bf16", labels_ptr="*i64",
                  inv_temperature_ptr="*fp32", N="i32", V="i32", stride_hn="i32",
                  stride_wv="i32", ignore_index="i32", rows_bucket="i32")
    tile = dict(H=4096, HAS_BIAS=True, ALLOW_TF32=True, BLOCK_N=64, BLOCK_V=128, BLOCK_K=64,
                GROUP_N=16, stride_hk=1, stride_wk=1)
    if kernel == "forward":
        fn = kernels._forward_partials_kernel
        types = dict(common, partials_ptr="*fp32", n_splits="i32", plane="i32")
        constants = dict(tile, SPLIT_COLUMNS=2048, WITH_ENTROPY=True)
    elif kernel == "dlogits":
        fn = kernels._backward_dlogits_kernel
        types = dict(common, logsumexp_ptr="*fp32", entropy_ptr="*fp32",
                     grad_logprobs_ptr="*fp32", grad_entropy_ptr="*fp32", dlogits_ptr="*bf16",
                     bias_partials_ptr="*fp32", v_begin="i32", width="i32")
        constants = dict(tile, HAS_GRAD_LOGPROBS=True, HAS_GRAD_ENTROPY=True, BIAS_GRAD=True)
    else:
        fn = kernels._combine_kernel
        types = dict(partials_ptr="*fp32", labels_ptr="*i64", logprobs_ptr="*fp32",
                     entropy_ptr="*fp32", logsumexp_ptr="*fp32", N="i32", V="i32",
                     ignore_index="i32", plane="i32")
        constants = dict(N_SPLITS=63, WITH_ENTROPY=True, BLOCK=256)
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    # what the JIT assumes of pointers and of ints divisible by 16 (row strides H = 4096)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if types.get(name, "").startswith("*") or name in ("stride_hn", "stride_wv")}
    compiled = triton.compile(ASTSource(fn, signature, constants, aligned),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=4))
    assert compiled.asm["cubin"]
    if kernel != "combine":
        assert "warp_group_dot" in compiled.asm["ttgir"]               # wgmma
        assert "async_copy_global_to_local" in compiled.asm["ttgir"]  # pipelined loads
