// Launchers of the ranking and preference losses' CUDA kernels (csrc/cuda/ranking.cu) and their
// plain argument structs, shared with the torch-facing glue (csrc/cuda/ranking.cpp). The
// semantics are the CPU kernels' (csrc/cpu/ranking.cpp); sizes and strides count elements.
#pragma once

#include "cuda/types.h"

namespace rlengine::cuda {

// ---- sequence_scores ---------------------------------------------------------------------------
// token_logprobs and mask as [rows, length] views of any strides, read in place; scores is a
// contiguous [rows] tensor of the working type (fp32, fp64 for fp64 input).
struct SequenceScoresArgs {
  const void* token_logprobs;
  DType dtype;
  int64_t x_row_stride, x_col_stride;
  const uint8_t* mask;  // bool bytes, nonzero = selected
  int64_t mask_row_stride, mask_col_stride;
  int64_t rows, length;
  double length_penalty;
  void* scores;
};

// grad_scores: one value per row (`grad_stride` apart, 0 for an expanded scalar) of any float
// dtype; grad: a contiguous [rows, length] tensor of grad_dtype.
struct SequenceScoresBackwardArgs {
  const void* grad_scores;
  DType grad_scores_dtype;
  int64_t grad_scores_stride;
  const uint8_t* mask;
  int64_t mask_row_stride, mask_col_stride;
  int64_t rows, length;
  double length_penalty;
  void* grad;
  DType grad_dtype;
};

cudaError_t launch_sequence_scores(const SequenceScoresArgs& args, cudaStream_t stream);
cudaError_t launch_sequence_scores_backward(const SequenceScoresBackwardArgs& args,
                                            cudaStream_t stream);

// ---- rrhf_rank_loss ----------------------------------------------------------------------------
// scores, rewards (any float dtype each) and valid (optional) are [batch, candidates] views of
// any strides; loss is a contiguous [batch] tensor of the scores' working type.
struct RrhfRankLossArgs {
  const void* scores;
  DType scores_dtype;
  int64_t scores_stride0, scores_stride1;
  const void* rewards;
  DType rewards_dtype;
  int64_t rewards_stride0, rewards_stride1;
  const uint8_t* valid;  // null: every candidate is valid
  int64_t valid_stride0, valid_stride1;
  int64_t batch, candidates;
  void* loss;
};

// grad_loss: one value per query (`grad_loss_stride` apart) of any float dtype; grad: a
// contiguous [batch, candidates] tensor of the scores' dtype.
struct RrhfRankLossBackwardArgs {
  RrhfRankLossArgs forward;  // its `loss` is unused
  const void* grad_loss;
  DType grad_loss_dtype;
  int64_t grad_loss_stride;
  void* grad;
};

cudaError_t launch_rrhf_rank_loss(const RrhfRankLossArgs& args, cudaStream_t stream);
cudaError_t launch_rrhf_rank_loss_backward(const RrhfRankLossBackwardArgs& args,
                                           cudaStream_t stream);

// ---- bt_loss -----------------------------------------------------------------------------------
// One per-pair input of the elementwise BT kernels: element i is data[i * stride] (stride 0 for
// a 0-d or expanded tensor, whose one value is then read on the device: no host sync), or
// `value` for every element where data is null (an absent tensor: a Python number).
struct BtOperand {
  const void* data;
  DType dtype;
  int64_t stride;
  double value;
};

// The pairs are numbered in chosen's logical (row-major) order; outputs are contiguous in the
// working type (fp32, fp64 for fp64 chosen).
struct BtLossArgs {
  BtOperand chosen, rejected, margin, label_smoothing;
  DType dtype;  // chosen's: selects the working precision
  int64_t pairs;
  void* loss;
};

struct BtLossBackwardArgs {
  BtOperand chosen, rejected, margin, label_smoothing, grad_loss;
  DType dtype;
  int64_t pairs;
  void* grad_delta;
  void* grad_label_smoothing;  // null: not wanted (no label_smoothing tensor)
};

cudaError_t launch_bt_loss(const BtLossArgs& args, cudaStream_t stream);
cudaError_t launch_bt_loss_backward(const BtLossBackwardArgs& args, cudaStream_t stream);

}  // namespace rlengine::cuda
