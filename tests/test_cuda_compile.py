"""Every CUDA kernel file compiles with nvcc for the architectures the GPU build targets, on any
machine with the CUDA toolkit (no GPU needed: the .cu files include only the toolkit)."""

import pathlib
import shutil
import subprocess

import pytest

CUDA_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
KERNEL_FILES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.skipif(not KERNEL_FILES, reason="no csrc/cuda/*.cu files yet")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_cuda_kernel_compiles(source, arch, tmp_path):
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", f"-arch={arch}", "-I", str(CUDA_DIR.parent), "-c",
         str(source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
