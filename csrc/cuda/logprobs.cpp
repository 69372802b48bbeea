// Torch-facing glue of the CUDA token log-prob kernels (csrc/cuda/logprobs.cu): the CPU
// kernel's argument checks, output allocation, and the launch on torch's current stream.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "cpu/logprobs_checks.h"
#include "cuda/glue.h"
#include "cuda/logprobs.h"

namespace rlengine::cuda {
namespace {

// The leading dimensions of an [..., V] tensor as a RowLayout: size-1 dimensions dropped and
// neighbours merged where the outer stride is the inner one times its size, so a contiguous
// tensor has one dimension and logits[:, :-1] of [B, T, V] two. Empty if more remain than the
// kernels take.
std::optional<RowLayout> row_layout(const at::Tensor& t) {
  RowLayout layout;
  for (int64_t d = t.dim() - 2; d >= 0; --d) {  // innermost leading dimension first
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) continue;
    if (layout.ndims > 0) {
      const int inner = layout.ndims - 1;
      if (stride == layout.strides[inner] * layout.sizes[inner]) {
        layout.sizes[inner] *= size;
        continue;
      }
    }
    if (layout.ndims == kMaxRowDims) return std::nullopt;
    layout.sizes[layout.ndims] = size;
    layout.strides[layout.ndims] = stride;
    ++layout.ndims;
  }
  return layout;
}

// Logits the kernels read in place: vocabulary stride 1 and a RowLayout, else a contiguous
// copy (the CPU kernel copies in the same cases, plus the rare > kMaxRowDims layouts here).
std::pair<at::Tensor, RowLayout> readable_logits(const at::Tensor& logits) {
  if (logits.stride(-1) == 1) {
    if (auto layout = row_layout(logits)) return {logits, *layout};
  }
  at::Tensor copy = logits.contiguous();
  return {copy, *row_layout(copy)};
}

// A per-row float tensor as the kernels read it: contiguous in `dtype`, or left as it is when
// it is an expanded scalar already in `dtype` (step 0), which saves a copy kernel.
struct PerRow {
  at::Tensor tensor;
  int64_t step;
};

PerRow per_row(const at::Tensor& t, at::ScalarType dtype) {
  const auto strides = t.strides();
  const bool expanded_scalar = t.numel() >= 1 && t.scalar_type() == dtype &&
                               std::all_of(strides.begin(), strides.end(),
                                           [](int64_t s) { return s == 0; });
  if (expanded_scalar) return {t, 0};
  return {t.to(dtype).contiguous(), 1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits_in,
                                                                   const at::Tensor& labels_in,
                                                                   double temperature,
                                                                   int64_t ignore_index,
                                                                   bool with_entropy,
                                                                   bool /*inplace_backward*/) {
  constexpr const char* op = "token_logprobs";
  check_is_cuda(op, "logits", logits_in);
  cpu::logprobs_checks::check_forward_args(op, logits_in, labels_in, temperature,
                                           logits_in.device());
  const int64_t V = logits_in.size(-1);
  TORCH_CHECK_VALUE(V >= 1, "rlengine.token_logprobs: logits must have a vocabulary size >= 1");
  const c10::cuda::CUDAGuard guard(logits_in.device());

  const auto [logits, rows] = readable_logits(logits_in);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = labels.numel();
  const auto out_options = logits.options().dtype(result_dtype(logits));
  at::Tensor logprobs = at::empty(labels.sizes(), out_options);
  at::Tensor logsumexp = at::empty(labels.sizes(), out_options);
  at::Tensor entropy = at::empty(with_entropy ? labels.sizes() : at::IntArrayRef{0}, out_options);
  if (N == 0) return {logprobs, entropy, logsumexp};

  TokenLogprobsArgs args;
  args.logits = logits.const_data_ptr();
  args.dtype = dtype_of(logits);
  args.rows = rows;
  args.num_rows = N;
  args.vocab = V;
  args.labels = labels.const_data_ptr();
  args.labels_int32 = labels.scalar_type() == at::kInt;
  args.ignore_index = ignore_index;
  args.scale = 1.0 / temperature;
  args.with_entropy = with_entropy;
  args.logprobs = logprobs.mutable_data_ptr();
  args.entropy = with_entropy ? entropy.mutable_data_ptr() : nullptr;
  args.logsumexp = logsumexp.mutable_data_ptr();
  check_launch(op, launch_token_logprobs(args, current_stream()));
  return {logprobs, entropy, logsumexp};
}

// Writes the logits gradient into `grad` (which has logits' shape; it may be logits itself).
void backward_into(const char* op, const at::Tensor& grad, const RowLayout& grad_rows,
                   const std::optional<at::Tensor>& grad_logprobs,
                   const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                   const RowLayout& rows, const at::Tensor& labels_in,
                   const at::Tensor& logsumexp, const at::Tensor& entropy, double temperature,
                   int64_t ignore_index) {
  const at::Tensor labels = labels_in.contiguous();
  const int64_t N = labels.numel();
  if (N == 0) return;
  const at::ScalarType dtype = result_dtype(logits);
  const PerRow lse = per_row(logsumexp, dtype);
  const std::optional<PerRow> g_lp =
      grad_logprobs ? std::optional<PerRow>(per_row(*grad_logprobs, dtype)) : std::nullopt;
  const std::optional<PerRow> g_ent =
      grad_entropy ? std::optional<PerRow>(per_row(*grad_entropy, dtype)) : std::nullopt;
  const std::optional<PerRow> ent =
      grad_entropy ? std::optional<PerRow>(per_row(entropy, dtype)) : std::nullopt;

  TokenLogprobsBackwardArgs args;
  args.logits = logits.const_data_ptr();
  args.grad_logits = grad.mutable_data_ptr();
  args.dtype = dtype_of(logits);
  args.rows = rows;
  args.grad_rows = grad_rows;
  args.num_rows = N;
  args.vocab = logits.size(-1);
  args.labels = labels.const_data_ptr();
  args.labels_int32 = labels.scalar_type() == at::kInt;
  args.ignore_index = ignore_index;
  args.scale = 1.0 / temperature;
  args.logsumexp = lse.tensor.const_data_ptr();
  args.logsumexp_step = lse.step;
  if (g_lp) {
    args.grad_logprobs = g_lp->tensor.const_data_ptr();
    args.grad_logprobs_step = g_lp->step;
  }
  if (g_ent) {
    args.grad_entropy = g_ent->tensor.const_data_ptr();
    args.grad_entropy_step = g_ent->step;
    args.entropy = ent->tensor.const_data_ptr();
    args.entropy_step = ent->step;
  }
  check_launch(op, launch_token_logprobs_backward(args, current_stream()));
}

// logits fix the device; then the shared checks.
void check_backward_args(const char* op, const std::optional<at::Tensor>& grad_logprobs,
                         const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                         const at::Tensor& labels, const at::Tensor& logsumexp,
                         const at::Tensor& entropy, double temperature) {
  check_is_cuda(op, "logits", logits);
  cpu::logprobs_checks::check_backward_args(op, grad_logprobs, grad_entropy, logits, labels,
                                            logsumexp, entropy, temperature, logits.device());
}

at::Tensor token_logprobs_backward_cuda(const std::optional<at::Tensor>& grad_logprobs,
                                        const std::optional<at::Tensor>& grad_entropy,
                                        const at::Tensor& logits_in, const at::Tensor& labels,
                                        const at::Tensor& logsumexp, const at::Tensor& entropy,
                                        double temperature, int64_t ignore_index) {
  constexpr const char* op = "token_logprobs_backward";
  check_backward_args(op, grad_logprobs, grad_entropy, logits_in, labels, logsumexp, entropy,
                      temperature);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto [logits, rows] = readable_logits(logits_in);
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(
                                                  at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  backward_into(op, grad, *row_layout(grad), grad_logprobs, grad_entropy, logits, rows, labels,
                logsumexp, entropy, temperature, ignore_index);
  return grad;
}

// The in-place backward: the gradient replaces the logits, written through their own strides.
// Where the kernel cannot read them in place (vocabulary stride != 1, or more leading
// dimensions than it takes) it works on a contiguous copy, then copies the result back.
void token_logprobs_inplace_backward_cuda(const std::optional<at::Tensor>& grad_logprobs,
                                          const std::optional<at::Tensor>& grad_entropy,
                                          at::Tensor& logits, const at::Tensor& labels,
                                          const at::Tensor& logsumexp, const at::Tensor& entropy,
                                          double temperature, int64_t ignore_index) {
  constexpr const char* op = "token_logprobs_inplace_backward";
  check_backward_args(op, grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy,
                      temperature);
  TORCH_CHECK_VALUE(at::has_internal_overlap(logits) != at::MemOverlap::Yes,
                    "rlengine.token_logprobs: an in-place backward needs logits whose elements ",
                    "do not share memory (not an expand()ed tensor)");
  if (logits.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto [readable, rows] = readable_logits(logits);
  at::Tensor target = readable;  // logits itself unless it had to be copied
  backward_into(op, target, rows, grad_logprobs, grad_entropy, readable, rows, labels, logsumexp,
                entropy, temperature, ignore_index);
  if (!target.is_same(logits)) logits.copy_(target);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CUDA, m) {
  m.impl("token_logprobs", &token_logprobs_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
  m.impl("token_logprobs_inplace_backward", &token_logprobs_inplace_backward_cuda);
}

}  // namespace rlengine::cuda
