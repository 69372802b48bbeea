// Torch glue of the CUDA kernels of the segment-reward ops (kernels in segments.cu): the CPU
// kernels' argument checks (csrc/cpu/segments.cpp) on metadata, outputs, scratch, the launch on
// torch's current stream. The data checks of segment_ids and counts are not repeated here: they
// would need a host synchronization (see segments.h for what the kernels do with malformed
// ones, and RLENGINE_CHECK_INPUTS=1 for the wrappers' check).
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>

#include "cpu/segments_checks.h"
#include "cuda/glue.h"
#include "cuda/segments.h"

namespace rlengine::cuda {
namespace {

StridedInput strided(const at::Tensor& t) {
  return {t.const_data_ptr(), t.dim() >= 1 ? t.stride(0) : 0, t.dim() >= 2 ? t.stride(1) : 0};
}

// The kernels store token positions as int32.
void check_steps(const char* op, int64_t steps) {
  TORCH_CHECK_VALUE(steps <= INT_MAX, "rlengine.", op, ": the CUDA kernel supports rows of up ",
                    "to ", INT_MAX, " positions, got ", steps);
}

// The shared checks, plus the row-length limit of the CUDA kernels.
void check_segment_tensors(const char* op, const at::Tensor& segment_ids,
                           const at::Tensor& counts, int64_t B, int64_t T,
                           const at::Device& device) {
  cpu::segments_checks::check_segment_tensors(op, segment_ids, counts, B, T, device);
  check_steps(op, T);
}

Segmentation segmentation(const at::Tensor& segment_ids, const at::Tensor& counts) {
  Segmentation s;
  s.ids = strided(segment_ids);
  s.counts = strided(counts);
  s.rows = segment_ids.size(0);
  s.steps = segment_ids.size(1);
  return s;
}

at::Tensor workspace(const at::Tensor& like, int64_t bytes) {
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

// The incoming gradient in the kernels' working precision (a no-op for the gradients autograd
// passes, which have the forward output's dtype).
at::Tensor gradient_as(const at::Tensor& grad, at::ScalarType dtype) {
  const at::ScalarType working = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return grad.scalar_type() == working ? grad : grad.to(working);
}

// ---- entropy_segments ------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> entropy_segments_cuda(const at::Tensor& entropy,
                                                         const at::Tensor& response_mask,
                                                         double threshold) {
  constexpr const char* op = "entropy_segments";
  check_cuda(op, "response_mask", response_mask, entropy.device());
  check_floating(op, "entropy", entropy);
  check_dim(op, "entropy", entropy, 2);
  check_bool(op, "response_mask", response_mask);
  check_shape(op, "response_mask", response_mask, entropy.sizes());
  TORCH_CHECK_VALUE(std::isfinite(threshold), "rlengine.entropy_segments: threshold must be ",
                    "finite, got ", threshold);
  const c10::cuda::CUDAGuard guard(entropy.device());
  const int64_t B = entropy.size(0), T = entropy.size(1);
  const auto index_options = entropy.options().dtype(at::kLong);
  at::Tensor segment_ids = at::empty({B, T}, index_options);
  at::Tensor counts = at::empty({B}, index_options);
  if (B == 0) return {segment_ids, counts};
  if (T == 0) {  // a row without positions has no segment
    counts.zero_();
    return {segment_ids, counts};
  }
  const at::Tensor ws = workspace(entropy, entropy_segments_workspace_bytes(B, T));
  EntropySegmentsArgs args;
  args.dtype = dtype_of(entropy);
  args.entropy = strided(entropy);
  args.mask = strided(response_mask);
  args.threshold = threshold;
  args.segment_ids = segment_ids.mutable_data_ptr<int64_t>();
  args.counts = counts.mutable_data_ptr<int64_t>();
  args.rows = B;
  args.steps = T;
  args.workspace = ws.mutable_data_ptr();
  check_launch(op, launch_entropy_segments(args, current_stream()));
  return {segment_ids, counts};
}

// ---- segment_reduce --------------------------------------------------------------------------

at::Tensor segment_reduce_cuda(const at::Tensor& values, const at::Tensor& segment_ids,
                               const at::Tensor& counts, std::string_view reduce_name) {
  constexpr const char* op = "segment_reduce";
  const SegmentReduction reduce = cpu::segments_checks::parse_reduce(op, reduce_name);
  check_floating(op, "values", values);
  check_dim(op, "values", values, 2);
  const int64_t B = values.size(0), T = values.size(1);
  check_segment_tensors(op, segment_ids, counts, B, T, values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  const auto out_options = values.options().dtype(result_dtype(values));
  at::Tensor out = reduce == SegmentReduction::kEndMean ? at::empty({B}, out_options)
                                                       : at::empty({B, T}, out_options);
  if (B == 0) return out;
  const at::Tensor ws = workspace(values, segment_reduce_workspace_bytes(B, T, reduce, false));
  SegmentReduceArgs args;
  args.dtype = dtype_of(values);
  args.values = strided(values);
  args.segments = segmentation(segment_ids, counts);
  args.reduce = reduce;
  args.out = out.mutable_data_ptr();
  args.workspace = ws.mutable_data_ptr();
  check_launch(op, launch_segment_reduce(args, current_stream()));
  return out;
}

at::Tensor segment_reduce_backward_cuda(const at::Tensor& grad_in, const at::Tensor& segment_ids,
                                        const at::Tensor& counts, std::string_view reduce_name,
                                        at::ScalarType dtype) {
  constexpr const char* op = "segment_reduce_backward";
  const SegmentReduction reduce = cpu::segments_checks::parse_reduce(op, reduce_name);
  check_floating(op, "grad", grad_in);
  check_floating(op, "dtype", dtype);
  check_dim(op, "segment_ids", segment_ids, 2);
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  check_segment_tensors(op, segment_ids, counts, B, T, grad_in.device());
  if (reduce == SegmentReduction::kEndMean) {
    check_shape(op, "grad", grad_in, {B});
  } else {
    check_shape(op, "grad", grad_in, {B, T});
  }
  const c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad_values = at::empty({B, T}, segment_ids.options().dtype(dtype));
  if (B * T == 0) return grad_values;
  const at::Tensor grad = gradient_as(grad_in, dtype);
  const at::Tensor ws = workspace(grad, segment_reduce_workspace_bytes(B, T, reduce, true));
  SegmentReduceBackwardArgs args;
  args.grad_dtype = dtype_of(grad);
  args.grad = strided(grad);
  args.dtype = dtype_of(dtype);
  args.segments = segmentation(segment_ids, counts);
  args.reduce = reduce;
  args.grad_values = grad_values.mutable_data_ptr();
  args.workspace = ws.mutable_data_ptr();
  check_launch(op, launch_segment_reduce_backward(args, current_stream()));
  return grad_values;
}

// ---- segment_rewards_to_dense ----------------------------------------------------------------

// segment_rewards fixes the device; the shared checks, plus the CUDA kernels' row-length limit.
void check_dense_inputs(const char* op, const at::Tensor& segment_rewards,
                        const at::Tensor& segment_ids, const at::Tensor& counts,
                        const at::Tensor& mask) {
  check_is_cuda(op, "segment_rewards", segment_rewards);
  cpu::segments_checks::check_dense_inputs(op, segment_rewards, segment_ids, counts, mask,
                                           segment_rewards.device());
  check_steps(op, segment_ids.size(1));
}

DenseArgs dense_args(const at::Tensor& segment_rewards, const at::Tensor& segment_ids,
                     const at::Tensor& counts, const at::Tensor& mask,
                     const DenseRuleParams& rule) {
  DenseArgs args;
  args.dtype = dtype_of(segment_rewards);
  args.segment_rewards = strided(segment_rewards);
  args.max_segments = segment_rewards.size(1);
  args.segments = segmentation(segment_ids, counts);
  args.mask = strided(mask);
  args.rule = rule;
  return args;
}

at::Tensor segment_rewards_to_dense_cuda(const at::Tensor& segment_rewards,
                                         const at::Tensor& segment_ids, const at::Tensor& counts,
                                         const at::Tensor& mask,
                                         std::optional<at::ArrayRef<double>> normalizer,
                                         std::string_view spread, double clamp) {
  constexpr const char* op = "segment_rewards_to_dense";
  check_dense_inputs(op, segment_rewards, segment_ids, counts, mask);
  const DenseRuleParams rule =
      cpu::segments_checks::dense_rule_params(op, normalizer, spread, clamp);
  const c10::cuda::CUDAGuard guard(segment_rewards.device());
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  at::Tensor dense =
      at::empty({B, T}, segment_rewards.options().dtype(result_dtype(segment_rewards)));
  if (B * T == 0) return dense;
  DenseArgs args = dense_args(segment_rewards, segment_ids, counts, mask, rule);
  const at::Tensor ws = workspace(
      segment_rewards, dense_workspace_bytes(B, T, args.max_segments, rule.spread, false));
  args.dense = dense.mutable_data_ptr();
  args.workspace = ws.mutable_data_ptr();
  check_launch(op, launch_segment_rewards_to_dense(args, current_stream()));
  return dense;
}

at::Tensor segment_rewards_to_dense_backward_cuda(
    const at::Tensor& grad_rewards_in, const at::Tensor& segment_rewards,
    const at::Tensor& segment_ids, const at::Tensor& counts, const at::Tensor& mask,
    std::optional<at::ArrayRef<double>> normalizer, std::string_view spread, double clamp) {
  constexpr const char* op = "segment_rewards_to_dense_backward";
  check_dense_inputs(op, segment_rewards, segment_ids, counts, mask);
  check_cuda(op, "grad_rewards", grad_rewards_in, segment_rewards.device());
  check_floating(op, "grad_rewards", grad_rewards_in);
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  check_shape(op, "grad_rewards", grad_rewards_in, {B, T});
  const DenseRuleParams rule =
      cpu::segments_checks::dense_rule_params(op, normalizer, spread, clamp);
  const c10::cuda::CUDAGuard guard(segment_rewards.device());
  at::Tensor grad_segment = at::empty(segment_rewards.sizes(), segment_rewards.options());
  if (grad_segment.numel() == 0) return grad_segment;
  const at::Tensor grad = gradient_as(grad_rewards_in, segment_rewards.scalar_type());
  DenseArgs args = dense_args(segment_rewards, segment_ids, counts, mask, rule);
  const at::Tensor ws = workspace(
      segment_rewards, dense_workspace_bytes(B, T, args.max_segments, rule.spread, true));
  args.grad = strided(grad);
  args.grad_segment = grad_segment.mutable_data_ptr();
  args.workspace = ws.mutable_data_ptr();
  check_launch(op, launch_segment_rewards_to_dense_backward(args, current_stream()));
  return grad_segment;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CUDA, m) {
  m.impl("entropy_segments", &entropy_segments_cuda);
  m.impl("segment_reduce", &segment_reduce_cuda);
  m.impl("segment_reduce_backward", &segment_reduce_backward_cuda);
  m.impl("segment_rewards_to_dense", &segment_rewards_to_dense_cuda);
  m.impl("segment_rewards_to_dense_backward", &segment_rewards_to_dense_backward_cuda);
}

}  // namespace rlengine::cuda
