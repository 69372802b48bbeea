// Torch-facing glue of the ranking CUDA kernels (csrc/cuda/ranking.cu): the argument checks
// shared with the CPU kernels (csrc/cpu/ranking_checks.h, same messages), device checks, output
// allocation and the launch on torch's current stream. Inputs are read in place through their
// strides (reshape copies only a layout it cannot view); nothing here reads tensor data on the
// host.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu/ranking_checks.h"
#include "cuda/glue.h"
#include "cuda/ranking.h"

namespace rlengine::cuda {
namespace {

using cpu::ranking_checks::check_length_penalty;

bool is_floating(const at::Tensor& t) {
  const at::ScalarType d = t.scalar_type();
  return d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf;
}

// An incoming gradient as the kernels read it: in place when it has a float dtype, else (the
// CPU kernels accept any dtype there and convert) as float64.
at::Tensor as_float(const at::Tensor& t) { return is_floating(t) ? t : t.to(at::kDouble); }

const uint8_t* mask_bytes(const at::Tensor& mask) {
  return reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
}

// ---- sequence_scores ---------------------------------------------------------------------------

at::Tensor sequence_scores_cuda(const at::Tensor& token_logprobs, const at::Tensor& mask,
                                double length_penalty) {
  constexpr const char* op = "sequence_scores";
  check_is_cuda(op, "token_logprobs", token_logprobs);
  check_cuda(op, "mask", mask, token_logprobs.device());
  check_floating(op, "token_logprobs", token_logprobs);
  check_bool(op, "mask", mask);
  TORCH_CHECK_VALUE(token_logprobs.dim() >= 1,
                    "rlengine.sequence_scores: token_logprobs must have a token dimension, got a "
                    "0-d tensor");
  check_shape(op, "mask", mask, token_logprobs.sizes());
  check_length_penalty(length_penalty);
  const c10::cuda::CUDAGuard guard(token_logprobs.device());

  const auto leading = token_logprobs.sizes().slice(0, token_logprobs.dim() - 1);
  const int64_t T = token_logprobs.size(-1);
  const int64_t N = c10::multiply_integers(leading);
  at::Tensor scores =
      at::empty(leading, token_logprobs.options().dtype(result_dtype(token_logprobs)));
  if (N == 0) return scores;
  const at::Tensor x = token_logprobs.reshape({N, T});
  const at::Tensor m = mask.reshape({N, T});
  SequenceScoresArgs args{};
  args.token_logprobs = x.const_data_ptr();
  args.dtype = dtype_of(x);
  args.x_row_stride = x.stride(0);
  args.x_col_stride = x.stride(1);
  args.mask = mask_bytes(m);
  args.mask_row_stride = m.stride(0);
  args.mask_col_stride = m.stride(1);
  args.rows = N;
  args.length = T;
  args.length_penalty = length_penalty;
  args.scores = scores.mutable_data_ptr();
  check_launch(op, launch_sequence_scores(args, current_stream()));
  return scores;
}

at::Tensor sequence_scores_backward_cuda(const at::Tensor& grad_scores, const at::Tensor& mask,
                                         double length_penalty, at::ScalarType dtype) {
  constexpr const char* op = "sequence_scores_backward";
  check_is_cuda(op, "mask", mask);
  check_cuda(op, "grad_scores", grad_scores, mask.device());
  check_bool(op, "mask", mask);
  TORCH_CHECK_VALUE(mask.dim() >= 1, "rlengine.sequence_scores_backward: mask must have a token ",
                    "dimension, got a 0-d tensor");
  const auto leading = mask.sizes().slice(0, mask.dim() - 1);
  check_shape(op, "grad_scores", grad_scores, leading);
  check_floating(op, "dtype", dtype);
  check_length_penalty(length_penalty);
  const c10::cuda::CUDAGuard guard(mask.device());

  const int64_t T = mask.size(-1);
  const int64_t N = c10::multiply_integers(leading);
  at::Tensor grad = at::empty(mask.sizes(), mask.options().dtype(dtype));
  if (grad.numel() == 0) return grad;
  const at::Tensor m = mask.reshape({N, T});
  const at::Tensor g = as_float(grad_scores).reshape({N});  // an expanded scalar stays a view
  SequenceScoresBackwardArgs args{};
  args.grad_scores = g.const_data_ptr();
  args.grad_scores_dtype = dtype_of(g);
  args.grad_scores_stride = g.stride(0);
  args.mask = mask_bytes(m);
  args.mask_row_stride = m.stride(0);
  args.mask_col_stride = m.stride(1);
  args.rows = N;
  args.length = T;
  args.length_penalty = length_penalty;
  args.grad = grad.mutable_data_ptr();
  args.grad_dtype = dtype_of(dtype);
  check_launch(op, launch_sequence_scores_backward(args, current_stream()));
  return grad;
}

// ---- rrhf_rank_loss ----------------------------------------------------------------------------

void check_rank_inputs(const char* op, const at::Tensor& scores, const at::Tensor& rewards,
                       const std::optional<at::Tensor>& valid) {
  check_is_cuda(op, "scores", scores);
  cpu::ranking_checks::check_rank_inputs(op, scores, rewards, valid, scores.device());
}

RrhfRankLossArgs rank_args(const at::Tensor& scores, const at::Tensor& rewards,
                           const std::optional<at::Tensor>& valid) {
  RrhfRankLossArgs args{};
  args.scores = scores.const_data_ptr();
  args.scores_dtype = dtype_of(scores);
  args.scores_stride0 = scores.stride(0);
  args.scores_stride1 = scores.stride(1);
  args.rewards = rewards.const_data_ptr();
  args.rewards_dtype = dtype_of(rewards);
  args.rewards_stride0 = rewards.stride(0);
  args.rewards_stride1 = rewards.stride(1);
  if (valid) {
    args.valid = mask_bytes(*valid);
    args.valid_stride0 = valid->stride(0);
    args.valid_stride1 = valid->stride(1);
  }
  args.batch = scores.size(0);
  args.candidates = scores.size(1);
  return args;
}

at::Tensor rrhf_rank_loss_cuda(const at::Tensor& scores, const at::Tensor& rewards,
                               const std::optional<at::Tensor>& valid) {
  constexpr const char* op = "rrhf_rank_loss";
  check_rank_inputs(op, scores, rewards, valid);
  const c10::cuda::CUDAGuard guard(scores.device());
  // Every query's loss is written (0 without pairs: K of 0 or 1, or nothing ranked).
  at::Tensor loss = at::empty({scores.size(0)}, scores.options().dtype(result_dtype(scores)));
  if (loss.numel() == 0) return loss;
  RrhfRankLossArgs args = rank_args(scores, rewards, valid);
  args.loss = loss.mutable_data_ptr();
  check_launch(op, launch_rrhf_rank_loss(args, current_stream()));
  return loss;
}

at::Tensor rrhf_rank_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& scores,
                                        const at::Tensor& rewards,
                                        const std::optional<at::Tensor>& valid) {
  constexpr const char* op = "rrhf_rank_loss_backward";
  check_rank_inputs(op, scores, rewards, valid);
  check_cuda(op, "grad_loss", grad_loss, scores.device());
  const int64_t B = scores.size(0), K = scores.size(1);
  check_shape(op, "grad_loss", grad_loss, {B});
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor grad = at::empty({B, K}, scores.options());
  if (grad.numel() == 0) return grad;
  const at::Tensor g = as_float(grad_loss);
  RrhfRankLossBackwardArgs args{};
  args.forward = rank_args(scores, rewards, valid);
  args.grad_loss = g.const_data_ptr();
  args.grad_loss_dtype = dtype_of(g);
  args.grad_loss_stride = g.stride(0);
  args.grad = grad.mutable_data_ptr();
  check_launch(op, launch_rrhf_rank_loss_backward(args, current_stream()));
  return grad;
}

// ---- bt_loss -----------------------------------------------------------------------------------

// A per-pair operand read in place where its layout allows (see linear_stride), else through a
// contiguous copy kept alive in `keep`; an absent tensor is `value` for every pair.
BtOperand bt_operand(const std::optional<at::Tensor>& t, double value,
                     std::vector<at::Tensor>& keep) {
  if (!t || !t->defined()) return BtOperand{nullptr, DType::kFloat32, 0, value};
  at::Tensor source = *t;
  std::optional<int64_t> stride = source.numel() == 1 ? std::optional<int64_t>(0)
                                                      : linear_stride(source);
  if (!stride) {
    source = source.contiguous();
    keep.push_back(source);
    stride = 1;
  }
  return BtOperand{source.const_data_ptr(), dtype_of(source), *stride, 0.0};
}

void check_bt_inputs(const char* op, const at::Tensor& chosen, const at::Tensor& rejected,
                     const std::optional<at::Tensor>& margin,
                     const std::optional<at::Tensor>& label_smoothing) {
  check_is_cuda(op, "chosen", chosen);
  cpu::ranking_checks::check_bt_inputs(op, chosen, rejected, margin, label_smoothing,
                                       chosen.device());
}

at::Tensor bt_loss_cuda(const at::Tensor& chosen, const at::Tensor& rejected,
                        const std::optional<at::Tensor>& margin,
                        const std::optional<at::Tensor>& label_smoothing, double margin_value,
                        double label_smoothing_value) {
  constexpr const char* op = "bt_loss";
  check_bt_inputs(op, chosen, rejected, margin, label_smoothing);
  const c10::cuda::CUDAGuard guard(chosen.device());
  at::Tensor loss = at::empty(chosen.sizes(), chosen.options().dtype(result_dtype(chosen)));
  if (loss.numel() == 0) return loss;
  std::vector<at::Tensor> keep;
  BtLossArgs args{};
  args.chosen = bt_operand(chosen, 0.0, keep);
  args.rejected = bt_operand(rejected, 0.0, keep);
  args.margin = bt_operand(margin, margin_value, keep);
  args.label_smoothing = bt_operand(label_smoothing, label_smoothing_value, keep);
  args.dtype = dtype_of(chosen);
  args.pairs = chosen.numel();
  args.loss = loss.mutable_data_ptr();
  check_launch(op, launch_bt_loss(args, current_stream()));
  return loss;
}

std::tuple<at::Tensor, at::Tensor> bt_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& chosen, const at::Tensor& rejected,
    const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& label_smoothing,
    double margin_value, double label_smoothing_value) {
  constexpr const char* op = "bt_loss_backward";
  check_bt_inputs(op, chosen, rejected, margin, label_smoothing);
  check_cuda(op, "grad_loss", grad_loss, chosen.device());
  check_floating(op, "grad_loss", grad_loss);
  check_shape(op, "grad_loss", grad_loss, chosen.sizes());
  const c10::cuda::CUDAGuard guard(chosen.device());
  const auto options = chosen.options().dtype(result_dtype(chosen));
  at::Tensor grad_delta = at::empty(chosen.sizes(), options);
  // Only a tensor label smoothing has a gradient; per pair, like grad_delta (the autograd
  // formula sums it for a 0-d one).
  at::Tensor grad_smoothing =
      at::empty(label_smoothing ? chosen.sizes() : at::IntArrayRef{0}, options);
  if (grad_delta.numel() == 0) return {grad_delta, grad_smoothing};
  std::vector<at::Tensor> keep;
  BtLossBackwardArgs args{};
  args.chosen = bt_operand(chosen, 0.0, keep);
  args.rejected = bt_operand(rejected, 0.0, keep);
  args.margin = bt_operand(margin, margin_value, keep);
  args.label_smoothing = bt_operand(label_smoothing, label_smoothing_value, keep);
  args.grad_loss = bt_operand(grad_loss, 0.0, keep);
  args.dtype = dtype_of(chosen);
  args.pairs = chosen.numel();
  args.grad_delta = grad_delta.mutable_data_ptr();
  args.grad_label_smoothing = label_smoothing ? grad_smoothing.mutable_data_ptr() : nullptr;
  check_launch(op, launch_bt_loss_backward(args, current_stream()));
  return {grad_delta, grad_smoothing};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CUDA, m) {
  m.impl("sequence_scores", &sequence_scores_cuda);
  m.impl("sequence_scores_backward", &sequence_scores_backward_cuda);
  m.impl("rrhf_rank_loss", &rrhf_rank_loss_cuda);
  m.impl("rrhf_rank_loss_backward", &rrhf_rank_loss_backward_cuda);
  m.impl("bt_loss", &bt_loss_cuda);
  m.impl("bt_loss_backward", &bt_loss_backward_cuda);
}

}  // namespace rlengine::cuda
