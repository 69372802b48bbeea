// Shared device helpers of the CUDA kernels (.cu files only). Like every .cu file here this
// includes only the CUDA toolkit (never torch), so nvcc can compile-check the kernels on any
// machine; see types.h for how the glue reaches the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/types.h"

namespace rlengine::cuda {

// Working precision (and result type) for each input type: fp32 for fp32/bf16/fp16 inputs, fp64
// for fp64 (the gradcheck path), the same rule as the CPU kernels.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls f(T{}) with T the C++ type of dtype: float, double, __nv_bfloat16 or __half.
template <typename F>
inline auto dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat64: return f(double{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
    case DType::kFloat32:
    default: return f(float{});
  }
}

template <typename T>
__device__ __forceinline__ compute_t<T> to_compute(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return x;
  }
}

template <typename T, typename C>
__device__ __forceinline__ T from_compute(C x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

// Grid sizes are computed in 64 bits: N x V tensors exceed 2^31 elements at the shapes RLHF runs.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks in a 1-D grid that covers `work` items with `per_block` each, capped where the kernel
// loops (grid-stride) over the rest: a few waves of the largest GPUs, never more than the
// grid's x limit.
inline unsigned int grid_for(int64_t work, int64_t per_block, int64_t cap = 65536) {
  int64_t blocks = ceil_div(work, per_block);
  if (blocks < 1) blocks = 1;
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned int>(blocks);
}

constexpr unsigned int kFullWarp = 0xffffffffu;

template <typename C>
__device__ __forceinline__ C warp_sum(C x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullWarp, x, offset);
  return x;
}

template <typename C>
__device__ __forceinline__ C warp_max(C x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmax(x, __shfl_xor_sync(kFullWarp, x, offset));
  }
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
// `scratch` holds 32 values; the call begins and ends with a barrier so it can be reused.
template <typename C>
__device__ __forceinline__ C block_sum(C x, C* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : C(0);
  return warp_sum(x);
}

}  // namespace rlengine::cuda
