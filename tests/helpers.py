"""Shared test helpers: tolerances (kept as data) and comparisons with the float64 reference;
running the trainers' commands (in a subprocess, SIGKILLed after a checkpoint, under torchrun)
and comparing their runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


# ---- command-line runs of the trainers (`rlengine rrhf`, `rlengine ppo`) -------------------

REPO = Path(__file__).resolve().parents[1]
# Wall-clock numbers: the only logged values that differ between two identical runs.
TIMED_KEYS = ("train/tokens_per_second",)


def save_sft_policy(task, path: Path) -> Path:
    """The synthetic task's SFT policy and tokenizer saved as a checkpoint folder, so that CLI
    subprocesses load it instead of training it again."""
    task.sft_policy().save_pretrained(path)
    task.tokenizer.save_pretrained(path)
    return path


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlengine.cli", *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`rlengine <args>` in a subprocess, which must succeed."""
    result = subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=REPO,
                            env=cli_env(), timeout=300)
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def main_exit(argv: list[str], capsys) -> tuple[int, str, str]:
    """`rlengine <argv>` in this process: its exit code, stdout and stderr."""
    from rlengine import cli

    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMED_KEYS} for r in records]


def saved_weights(run_dir: Path, what: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / what / "model.safetensors")


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")]


def kill_after_checkpoint(args: list[str], out: Path, step: int, unit: str = "step") -> None:
    """Starts `rlengine <args>` writing to ``out`` and SIGKILLs it once a checkpoint at
    ``step`` or later exists; it must not have finished."""
    process = subprocess.Popen(cli_command(*args), cwd=REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not [s for s in checkpoint_steps(out) if s >= step]:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"no checkpoint beyond {unit} {step} appeared"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "final_metrics.json").exists(), "the run finished before the kill"


def assert_same_run(out: Path, reference: Path, models: tuple[str, ...] = ("model",)) -> None:
    """Two runs' final_metrics.json, metrics (wall-clock rates aside) and saved weights are
    identical."""
    from rlengine.training.metrics import read_metrics

    assert json.loads((out / "final_metrics.json").read_text()) == \
        json.loads((reference / "final_metrics.json").read_text())
    assert untimed(read_metrics(out)) == untimed(read_metrics(reference))
    for what in models:
        expected = saved_weights(reference, what)
        for name, tensor in saved_weights(out, what).items():
            assert torch.equal(tensor, expected[name]), (what, name)


def run_two_process_torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """`rlengine <args>` under torchrun with 2 CPU processes, which must succeed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "rlengine.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=cli_env(),
                            timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


def assert_close_run(out: Path, reference: Path, *, metrics_tol: float, atol: float,
                     rtol: float, models: tuple[str, ...] = ("model",)) -> None:
    """Two runs log the same keys at the same steps, with values within ``metrics_tol``
    (relative and absolute), and save weights within (atol, rtol)."""
    import pytest

    from rlengine.training.metrics import read_metrics

    records, expected = untimed(read_metrics(out)), untimed(read_metrics(reference))
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for got, want in zip(records, expected):
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=metrics_tol, abs=metrics_tol), \
                (got["step"], key)
    for what in models:
        expected_weights = saved_weights(reference, what)
        for name, tensor in saved_weights(out, what).items():
            torch.testing.assert_close(tensor, expected_weights[name], atol=atol, rtol=rtol,
                                       msg=lambda m, what=what, name=name: f"{what} {name}: {m}")
