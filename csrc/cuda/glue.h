// Shared helpers of the torch-facing CUDA glue (csrc/cuda/<family>.cpp, CUDA builds only):
// device checks, the mapping from at::ScalarType to the kernels' DType, torch's current stream
// and launch-error reporting. Shape and dtype checks are the CPU kernels' (cpu/common.h), so
// both backends reject the same arguments with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <optional>

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
  cpu::check_device(op, name, t, device);
}

// The op's first tensor argument, which fixes the device the others must share (check_cuda).
inline void check_is_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), "rlengine.", op, ": ", name,
                    " must be a CUDA tensor for the CUDA kernel, got ", t.device());
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

// The distance s between logically consecutive elements when t's elements lie at data + i * s
// in row-major order (contiguous: 1; a strided 1-D view such as rewards[:, 0]: its stride; an
// expanded scalar, such as the incoming gradient of a sum: 0), else nullopt. Kernels that index
// a tensor by its flat position read such a tensor in place instead of through a copy.
inline std::optional<int64_t> linear_stride(const at::Tensor& t) {
  std::optional<int64_t> step;
  int64_t inner = 1;  // product of the sizes after dim d
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (t.size(d) != 1) {
      if (!step) {
        step = t.stride(d);
      } else if (t.stride(d) != *step * inner) {
        return std::nullopt;
      }
    }
    inner *= t.size(d);
  }
  return step.value_or(0);
}

inline void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "rlengine.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(error));
}

}  // namespace rlengine::cuda
