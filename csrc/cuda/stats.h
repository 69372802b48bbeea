// Launcher of the masked statistics' CUDA kernels (csrc/cuda/stats.cu) and its plain argument
// struct, shared with the torch-facing glue (csrc/cuda/stats.cpp). The semantics are the CPU
// kernels' (csrc/cpu/stats.cpp). All six ops are one kernel family over one geometry, so they
// share one argument struct and one launcher; `op` says which is run.
#pragma once

#include "cuda/types.h"

namespace rlengine::cuda {

enum class MaskedStatsOp : int {
  kMean,            // out[j] = masked mean of reduced row j
  kVar,             // out[j] = masked variance of reduced row j (two-pass)
  kMeanBackward,    // out[e] = mask ? grad[j] / count_j : 0
  kVarBackward,     // out[e] = mask ? 2 grad[j] (x - mean_j) / divisor_j : 0
  kWhiten,          // out[e] = mask ? (x - mean) rsqrt(var + eps) (+ mean) : 0, over all of x
  kWhitenBackward,  // out[e] = the whitening gradient (see csrc/cpu/stats.cpp), over all of x
};

// x (and mask, its shape) contiguous, viewed as [outer, len, inner] around the reduced dim:
// reduced row j = o * inner + i holds the elements (o * len + l) * inner + i, l < len. dim=None
// and the whitening ops are outer = inner = 1.
struct MaskedStatsArgs {
  MaskedStatsOp op;
  const void* x;         // null for kMeanBackward, which reads only the mask
  DType dtype;           // x's dtype; for kMeanBackward the dtype of its output
  const uint8_t* mask;   // bool bytes, nonzero = selected
  int64_t outer, len, inner;
  // The incoming gradient. kMeanBackward, kVarBackward: one value per reduced row, any float
  // dtype, grad_stride apart (0 for an expanded scalar). kWhitenBackward: one per element of x,
  // in the working type (fp32, fp64 for fp64 x), grad_stride apart (1, or 0 when expanded).
  const void* grad;
  DType grad_dtype;
  int64_t grad_stride;
  bool unbiased;
  bool shift_mean;
  double eps;
  // kMean, kVar: [outer * inner] in the working type. kWhiten: x's shape in the working type.
  // kMeanBackward, kVarBackward, kWhitenBackward: x's shape in `dtype`. Contiguous.
  void* out;
  // masked_stats_workspace_bytes(args) bytes of device memory (null when that is 0): the
  // per-block partial statistics of reductions split over several blocks.
  void* workspace;
};

int64_t masked_stats_workspace_bytes(const MaskedStatsArgs& args);
cudaError_t launch_masked_stats(const MaskedStatsArgs& args, cudaStream_t stream);

}  // namespace rlengine::cuda
