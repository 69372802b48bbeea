"""Shared test helpers: tolerances (kept as data) and comparisons with the float64 reference."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# (atol, rtol) of a kernel's fp32 result against the float64 reference evaluated on the same
# input values (inputs are cast to float64 exactly, so these measure the kernel's arithmetic).
FORWARD_TOLERANCE = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
    torch.float64: (1e-10, 1e-10),
}

# Gradients come back in the input's dtype, so they carry its rounding error as well; the atol
# covers fp32 rounding of terms scaled by incoming gradients of size ~1-10.
GRADIENT_TOLERANCE = {
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (1e-5, 1.6e-2),
    torch.float16: (1e-5, 2e-3),
    torch.float64: (1e-12, 1e-10),
}


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every op returns for inputs of this dtype: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


# Unit roundoff of the fp32 arithmetic inside the kernels.
FP32_EPS = 2.0**-24


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *,
                   gradient: bool = False, what: str = "", extra_atol: float = 0.0) -> None:
    """actual (a kernel's output or gradient) equals the float64 reference within the
    tolerance of the input dtype, plus extra_atol for errors that scale with the inputs'
    magnitude; NaNs must sit in the same places."""
    atol, rtol = (GRADIENT_TOLERANCE if gradient else FORWARD_TOLERANCE)[dtype]
    atol += extra_atol
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual.detach().to(torch.float64), expected.detach(), atol=atol,
                               rtol=rtol, equal_nan=True, msg=lambda m: f"{what} ({dtype}): {m}")


def incoming_gradient(out: torch.Tensor, *, where: torch.Tensor | None = None) -> torch.Tensor:
    """A random float64 gradient for out, with values exactly representable in out's dtype, so
    that the kernel (given it in out.dtype) and the float64 reference receive the same one;
    0 where `where` is False (e.g. at non-finite reference outputs)."""
    grad = torch.randn(out.shape, dtype=torch.float64)
    if where is not None:
        grad = torch.where(where, grad, 0)
    return grad.to(out.dtype).double()


def assert_compiles_fullgraph(fn, *args, wrt: tuple[torch.Tensor, ...] = ()):
    """fn under torch.compile(fullgraph=True) returns what eager fn returns, and a weighted sum
    of its outputs has the same gradients w.r.t. wrt. The aot_eager backend traces the ops'
    fake kernels and autograd formulas without generating code. Returns the compiled run's
    gradients."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected, actual = fn(*args), compiled(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)
    if not wrt:
        return ()

    def loss(outputs):
        return sum((o.float() * (i + 1)).sum() for i, o in enumerate(outputs))

    g_expected = torch.autograd.grad(loss(expected), wrt)
    g_actual = torch.autograd.grad(loss(actual), wrt)
    for a, e in zip(g_actual, g_expected):
        torch.testing.assert_close(a, e)
    return g_actual


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other column of a wider tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.numel() <= 1
    return view


# Devices the kernel tests run on: the CPU always, and the GPU where torch sees one. The CUDA
# kernels' tests (tests/test_cuda_<family>.py) are device-generic, so on a machine without a
# GPU their logic still runs, against the CPU kernels.
DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())


def free_port() -> int:
    """A TCP port nothing listens on now: torchrun's rendezvous port for a test run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
