// Launchers of the CUDA token log-prob kernels (csrc/cuda/logprobs.cu) and their arguments.
// Plain structs only: the glue (logprobs.cpp) fills them from tensors, the kernels read them.
#pragma once

#include "cuda/types.h"

namespace rlengine::cuda {

// Where each row of an [..., V] tensor starts, for leading dimensions of any strides (e.g.
// logits[:, :-1] of a [B, T, V] tensor). The glue merges dimensions that are contiguous with
// each other and drops size-1 ones, so the usual layouts need one or two; a tensor that still
// needs more than kMaxRowDims is copied (forward, out-of-place backward) or staged (in-place
// backward) by the glue. Innermost dimension first; strides in elements.
constexpr int kMaxRowDims = 6;
struct RowLayout {
  int ndims = 0;  // 0: a single row at offset 0
  int64_t sizes[kMaxRowDims] = {};
  int64_t strides[kMaxRowDims] = {};
};

// Labels are int64 or int32 and contiguous; an absent per-row tensor (e.g. no grad_entropy)
// is a null pointer. Per-row float tensors (incoming gradients, saved logsumexp and entropy)
// are in the result dtype (float32, float64 for float64 logits) and either contiguous (step
// 1) or an expanded scalar (step 0: the incoming gradient of a .sum() often is one).
struct TokenLogprobsArgs {
  const void* logits = nullptr;  // [rows, vocab] through `rows`; the vocabulary dim has stride 1
  DType dtype = DType::kFloat32;
  RowLayout rows;
  int64_t num_rows = 0;
  int64_t vocab = 0;
  const void* labels = nullptr;
  bool labels_int32 = false;
  int64_t ignore_index = -100;
  double scale = 1.0;  // 1 / temperature; the fp32 kernels use it rounded to float, as the CPU's
  bool with_entropy = false;
  void* logprobs = nullptr;   // [rows], result dtype
  void* entropy = nullptr;    // [rows], result dtype; written only with_entropy
  void* logsumexp = nullptr;  // [rows], result dtype
};

cudaError_t launch_token_logprobs(const TokenLogprobsArgs& args, cudaStream_t stream);

struct TokenLogprobsBackwardArgs {
  const void* logits = nullptr;
  void* grad_logits = nullptr;  // may be `logits` itself (in-place backward): then same layout
  DType dtype = DType::kFloat32;
  RowLayout rows;       // of logits
  RowLayout grad_rows;  // of grad_logits
  int64_t num_rows = 0;
  int64_t vocab = 0;
  const void* labels = nullptr;
  bool labels_int32 = false;
  int64_t ignore_index = -100;
  double scale = 1.0;
  const void* grad_logprobs = nullptr;  // null: no gradient flows into the log-probs
  int64_t grad_logprobs_step = 1;       // 1 contiguous, 0 an expanded scalar
  const void* grad_entropy = nullptr;   // null: no gradient flows into the entropy
  int64_t grad_entropy_step = 1;
  const void* entropy = nullptr;        // read only with grad_entropy
  int64_t entropy_step = 1;
  const void* logsumexp = nullptr;
  int64_t logsumexp_step = 1;
};

cudaError_t launch_token_logprobs_backward(const TokenLogprobsBackwardArgs& args,
                                           cudaStream_t stream);

}  // namespace rlengine::cuda
