// Shared helpers of the torch-facing CUDA glue (csrc/cuda/<family>.cpp, CUDA builds only):
// device checks, the mapping from at::ScalarType to the kernels' DType, torch's current stream
// and launch-error reporting. Shape and dtype checks are the CPU kernels' (cpu/common.h), so
// both backends reject the same arguments with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include "cpu/common.h"
#include "cuda/types.h"

namespace rlengine::cuda {

using cpu::check_bool;
using cpu::check_dim;
using cpu::check_floating;
using cpu::check_shape;
using cpu::result_dtype;

inline void check_cuda(const char* op, const char* name, const at::Tensor& t,
                       const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "rlengine.", op, ": ", name, " must be on ", device,
                    " like the op's first tensor argument, got ", t.device());
}

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "rlengine: no CUDA kernel for dtype ", t);
  }
}

inline DType dtype_of(const at::Tensor& t) { return dtype_of(t.scalar_type()); }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "rlengine.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(error));
}

}  // namespace rlengine::cuda
