// Launchers of the CUDA kernels of the segment-reward ops: entropy_segments, segment_reduce
// (+ backward) and segment_rewards_to_dense (+ backward). Kernels in segments.cu, torch glue in
// segments.cpp.
//
// Malformed segmentations on the GPU: validating segment_ids and counts as the CPU kernel does
// would need a device-to-host read before every launch, so the CUDA kernels never diagnose them;
// they only make sure that nothing is read or written out of bounds. counts[b] is clamped into
// [0, min(T, Kmax)] (Kmax = segment_rewards.shape[1] for the dense ops, T otherwise) and an id
// outside [-1, clamped counts[b]) counts as -1 (the position belongs to no segment). With
// RLENGINE_CHECK_INPUTS=1 the Python wrappers check them first and raise the CPU kernel's
// ValueError (one host synchronization per call).
#pragma once

#include "cuda/strided.h"
#include "segment_rules.h"

namespace rlengine::cuda {

// A segmentation: segment_ids [B, T] and counts [B], both int64, read in place.
struct Segmentation {
  StridedInput ids;
  StridedInput counts;  // row_stride is the stride of counts
  int64_t rows = 0;
  int64_t steps = 0;
};

struct EntropySegmentsArgs {
  DType dtype = DType::kFloat32;  // of entropy
  StridedInput entropy;           // [B, T]
  StridedInput mask;              // [B, T] bool, read as bytes
  double threshold = 0.0;         // finite
  int64_t* segment_ids = nullptr; // [B, T] contiguous
  int64_t* counts = nullptr;      // [B]
  int64_t rows = 0;
  int64_t steps = 0;
  void* workspace = nullptr;      // entropy_segments_workspace_bytes(rows, steps) bytes
};

int64_t entropy_segments_workspace_bytes(int64_t rows, int64_t steps);
// One memset and one kernel (a scan of the segment ends, see segments.cu); nothing when
// rows * steps is 0 (the caller zeroes counts).
cudaError_t launch_entropy_segments(const EntropySegmentsArgs& args, cudaStream_t stream);

struct SegmentReduceArgs {
  DType dtype = DType::kFloat32;  // of values
  StridedInput values;            // [B, T]
  Segmentation segments;
  SegmentReduction reduce = SegmentReduction::kEndMean;
  void* out = nullptr;            // [B] (end_mean) or [B, T], contiguous, fp32 (fp64 for fp64)
  void* workspace = nullptr;      // segment_reduce_workspace_bytes(...) bytes
};

struct SegmentReduceBackwardArgs {
  DType grad_dtype = DType::kFloat32;  // of grad: fp32 or fp64 (the forward's result dtype)
  StridedInput grad;                   // [B] (end_mean) or [B, T]
  DType dtype = DType::kFloat32;       // of grad_values (the forward's values dtype)
  Segmentation segments;
  SegmentReduction reduce = SegmentReduction::kEndMean;
  void* grad_values = nullptr;         // [B, T] contiguous
  void* workspace = nullptr;           // segment_reduce_workspace_bytes(..., true) bytes
};

// 0 where no per-segment table is needed.
int64_t segment_reduce_workspace_bytes(int64_t rows, int64_t steps, SegmentReduction reduce,
                                       bool backward);
cudaError_t launch_segment_reduce(const SegmentReduceArgs& args, cudaStream_t stream);
cudaError_t launch_segment_reduce_backward(const SegmentReduceBackwardArgs& args,
                                           cudaStream_t stream);

struct DenseArgs {
  DType dtype = DType::kFloat32;  // of segment_rewards
  StridedInput segment_rewards;   // [B, Kmax]
  int64_t max_segments = 0;       // Kmax
  Segmentation segments;
  StridedInput mask;              // [B, T] bool: the positions that may receive reward
  DenseRuleParams rule;
  void* dense = nullptr;          // forward: [B, T] contiguous, fp32 (fp64 for fp64)
  StridedInput grad;              // backward: dL/d dense [B, T] in fp32 (fp64 for fp64)
  void* grad_segment = nullptr;   // backward: [B, Kmax] contiguous, in dtype
  void* workspace = nullptr;      // dense_workspace_bytes(...) bytes
};

int64_t dense_workspace_bytes(int64_t rows, int64_t steps, int64_t max_segments,
                              SegmentSpread spread, bool backward);
cudaError_t launch_segment_rewards_to_dense(const DenseArgs& args, cudaStream_t stream);
cudaError_t launch_segment_rewards_to_dense_backward(const DenseArgs& args, cudaStream_t stream);

}  // namespace rlengine::cuda
