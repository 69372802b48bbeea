"""Every CUDA kernel file compiles with nvcc for the architectures the GPU build targets, on any
machine with the CUDA toolkit (no GPU needed: the .cu files include only the toolkit).

The torch-facing glue (csrc/cuda/*.cpp) needs the CUDA headers of c10, which the CPU wheel of
torch lacks; set RLENGINE_CUDA_TORCH_INCLUDE to the include/ folder of a CUDA build of torch
(unzip one wheel's torch/include) to syntax-check it here as well."""

import os
import pathlib
import shutil
import subprocess
import sysconfig

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
CUDA_DIR = CSRC / "cuda"
KERNEL_FILES = sorted(CUDA_DIR.glob("*.cu"))
GLUE_FILES = sorted(CUDA_DIR.glob("*.cpp"))
NVCC = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
CUDA_TORCH_INCLUDE = os.environ.get("RLENGINE_CUDA_TORCH_INCLUDE")


def cuda_include_dir() -> pathlib.Path:
    """The toolkit's include/: from CUDA_HOME, else /usr/local/cuda, else beside nvcc (which may
    be a wrapper script elsewhere, so it comes last)."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", pathlib.Path(NVCC).parents[1]]
    for root in filter(None, candidates):
        include = pathlib.Path(root) / "include"
        if (include / "cuda_runtime_api.h").exists():
            return include
    pytest.skip("the CUDA toolkit's include/ folder was not found")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.skipif(not KERNEL_FILES, reason="no csrc/cuda/*.cu files yet")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_cuda_kernel_compiles(source, arch, tmp_path):
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-Werror", "-Werror",
         "all-warnings", "-I", str(CSRC), "-c", str(source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.skipif(not CUDA_TORCH_INCLUDE, reason="RLENGINE_CUDA_TORCH_INCLUDE is not set")
@pytest.mark.parametrize("source", GLUE_FILES, ids=lambda p: p.name)
def test_cuda_glue_compiles(source):
    cuda_include = cuda_include_dir()
    include = pathlib.Path(CUDA_TORCH_INCLUDE)
    result = subprocess.run(
        ["c++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter",
         "-DRLENGINE_WITH_CUDA", "-I", str(CSRC), "-I", str(include),
         "-I", str(include / "torch" / "csrc" / "api" / "include"), "-I", str(cuda_include),
         "-I", sysconfig.get_paths()["include"], str(source)],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
