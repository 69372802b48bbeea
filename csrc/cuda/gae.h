// Launchers of the CUDA kernels of rlengine::gae, rlengine::discounted_returns and their
// backwards (kernels in gae.cu, torch glue in gae.cpp). discounted_returns is gae's scan with
// V = 0 and c = gamma: the same launchers with `values` (forward) or `grad_returns` (backward)
// null.
#pragma once

#include "cuda/strided.h"

namespace rlengine::cuda {

struct GaeForwardArgs {
  DType dtype = DType::kFloat32;  // of rewards, values and last_values
  StridedInput rewards;           // [B, T]
  StridedInput values;            // [B, T]; null for discounted_returns
  StridedInput mask;              // [B, T] bool, read as bytes (nonzero = valid)
  StridedInput last_values;       // [B] (row_stride); null: bootstrap 0
  void* advantages = nullptr;     // [B, T] contiguous, fp32 (fp64 for fp64 inputs); the returns
                                  // of discounted_returns
  void* returns = nullptr;        // [B, T] like advantages; gae only
  int64_t rows = 0;
  int64_t steps = 0;
  double gamma = 0.0;
  double c = 0.0;                 // gamma * lam (gamma for discounted_returns)
  void* workspace = nullptr;      // gae_workspace_bytes(rows, steps, false) bytes
};

struct GaeBackwardArgs {
  DType dtype = DType::kFloat32;  // of the incoming and outgoing gradients: fp32 or fp64
  StridedInput grad_advantages;   // [B, T]; the returns' gradient for discounted_returns; null: 0
  StridedInput grad_returns;      // [B, T]; null: 0
  StridedInput mask;              // [B, T] bool
  void* grad_rewards = nullptr;   // [B, T] contiguous
  void* grad_values = nullptr;    // [B, T] contiguous; null for discounted_returns
  void* grad_last_values = nullptr;  // [B]
  int64_t rows = 0;
  int64_t steps = 0;
  double gamma = 0.0;
  double c = 0.0;
  bool with_values = true;        // gae (true) or discounted_returns (false)
  void* workspace = nullptr;      // gae_workspace_bytes(rows, steps, true) bytes
};

// Bytes of the scan's workspace (a ticket counter, then per tile of 2048 positions a flag and a
// summary: 44 bytes forward, 28 backward) for a [rows, steps] batch.
int64_t gae_workspace_bytes(int64_t rows, int64_t steps, bool backward);

// Both enqueue one memset of the workspace's flags and one kernel (nothing when rows * steps is
// 0; the backward's caller zeroes grad_last_values when steps is 0).
cudaError_t launch_gae_forward(const GaeForwardArgs& args, cudaStream_t stream);
cudaError_t launch_gae_backward(const GaeBackwardArgs& args, cudaStream_t stream);

}  // namespace rlengine::cuda
