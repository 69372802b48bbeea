// CPU kernels of the ranking and preference losses: sequence_scores (RRHF's length-normalized
// sequence log-probability), rrhf_rank_loss and bt_loss, each with its backward.
//
// These are small, latency-bound ops (one value per sequence, pair or query): the kernels make
// one pass over their inputs, accumulate in double, and allocate only their outputs.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "cpu/common.h"
#include "cpu/vec_math.h"

namespace rlengine::cpu {
namespace {

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A [rows, T] view of a tensor's last dimension, read through its strides (no copy when the
// leading dimensions can be collapsed, which covers every layout the ops produce).
struct RowView {
  at::Tensor rows;  // 2-D
  int64_t row_stride, col_stride;
  explicit RowView(const at::Tensor& t)
      : rows(t.reshape({-1, t.size(-1)})), row_stride(rows.stride(0)), col_stride(rows.stride(1)) {}
};

// ---- sequence_scores -------------------------------------------------------------------------

// Rows with no selected position have score 0 (and gradient 0): their length counts as 1.
inline double length_divisor(int64_t count, double length_penalty) {
  return length_penalty == 0.0 ? 1.0
                               : std::pow(static_cast<double>(std::max<int64_t>(count, 1)),
                                          length_penalty);
}

// (sum of the selected values, number selected) of one row. The contiguous case is a
// branch-free select-and-add that vectorizes; an unselected value is read but can never reach
// the sum (a select, not a multiplication by 0, so -inf and NaN there are harmless).
// The fp32 contiguous case, the common one, as target clones. Within a chunk the sum is fp32
// and the count int32 (uniform 32-bit lanes are what GCC vectorizes with a mask select; mixed
// double/int64/byte lanes stay scalar); chunks are combined in double.
RLENGINE_SIMD_CLONES void masked_chunk_sum_f32(const float* x, const uint8_t* keep, int64_t n,
                                               float* sum, int32_t* count) {
  float total = 0.0f;
  int32_t selected = 0;
  RLENGINE_SIMD_REDUCE(+ : total, selected)
  for (int64_t t = 0; t < n; ++t) {
    const float value = x[t];  // loaded unconditionally, so the select can be a blend
    const bool k = keep[t] != 0;
    total += k ? value : 0.0f;
    selected += k;
  }
  *sum = total;
  *count = selected;
}

std::pair<double, int64_t> masked_row_sum_f32(const float* x, const bool* keep, int64_t T) {
  constexpr int64_t kChunk = 4096;
  double total = 0.0;
  int64_t count = 0;
  for (int64_t start = 0; start < T; start += kChunk) {
    float chunk_sum;
    int32_t chunk_count;
    masked_chunk_sum_f32(x + start, reinterpret_cast<const uint8_t*>(keep + start),
                         std::min(kChunk, T - start), &chunk_sum, &chunk_count);
    total += chunk_sum;
    count += chunk_count;
  }
  return {total, count};
}

template <typename scalar_t>
std::pair<double, int64_t> masked_row_sum(const scalar_t* x, int64_t x_stride, const bool* keep,
                                          int64_t keep_stride, int64_t T) {
  double total = 0.0;
  int64_t count = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (x_stride == 1 && keep_stride == 1) return masked_row_sum_f32(x, keep, T);
  }
  if (x_stride == 1 && keep_stride == 1) {
    RLENGINE_SIMD_REDUCE(+ : total, count)
    for (int64_t t = 0; t < T; ++t) {
      const double value = static_cast<double>(x[t]);
      total += keep[t] ? value : 0.0;
      count += keep[t];
    }
  } else {
    for (int64_t t = 0; t < T; ++t) {
      const double value = static_cast<double>(x[t * x_stride]);
      total += keep[t * keep_stride] ? value : 0.0;
      count += keep[t * keep_stride];
    }
  }
  return {total, count};
}

void check_scores_args(const char* op, const at::Tensor& mask, double length_penalty) {
  check_cpu(op, "mask", mask);
  check_bool(op, "mask", mask);
  TORCH_CHECK_VALUE(mask.dim() >= 1, "rlengine.", op, ": mask must have a sequence dimension");
  TORCH_CHECK_VALUE(std::isfinite(length_penalty) && length_penalty >= 0.0, "rlengine.", op,
                    ": length_penalty must be a finite number >= 0, got ", length_penalty);
}

at::Tensor sequence_scores_cpu(const at::Tensor& token_logprobs, const at::Tensor& mask,
                               double length_penalty) {
  constexpr const char* op = "sequence_scores";
  check_cpu(op, "token_logprobs", token_logprobs);
  check_floating(op, "token_logprobs", token_logprobs);
  check_scores_args(op, mask, length_penalty);
  check_shape(op, "mask", mask, token_logprobs.sizes());
  const auto out_sizes = token_logprobs.sizes().slice(0, token_logprobs.dim() - 1);
  at::Tensor scores = at::empty(out_sizes, token_logprobs.options().dtype(
                                               result_dtype(token_logprobs)));
  const int64_t T = token_logprobs.size(-1);
  if (scores.numel() == 0) return scores;
  if (T == 0) return scores.zero_();
  const RowView lp(token_logprobs), m(mask);
  const int64_t rows = lp.rows.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, token_logprobs.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* x = lp.rows.const_data_ptr<scalar_t>();
    const bool* keep = m.rows.const_data_ptr<bool>();
    acc* out = scores.mutable_data_ptr<acc>();
    at::parallel_for(0, rows, rows_per_task(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const auto [total, count] = masked_row_sum(x + b * lp.row_stride, lp.col_stride,
                                                   keep + b * m.row_stride, m.col_stride, T);
        out[b] = static_cast<acc>(total / length_divisor(count, length_penalty));
      }
    });
  });
  return scores;
}

at::Tensor sequence_scores_backward_cpu(const at::Tensor& grad_scores, const at::Tensor& mask,
                                        double length_penalty, at::ScalarType dtype) {
  constexpr const char* op = "sequence_scores_backward";
  check_scores_args(op, mask, length_penalty);
  check_cpu(op, "grad_scores", grad_scores);
  check_shape(op, "grad_scores", grad_scores, mask.sizes().slice(0, mask.dim() - 1));
  at::Tensor grad = at::empty(mask.sizes(), mask.options().dtype(dtype));
  const int64_t T = mask.size(-1);
  if (grad.numel() == 0) return grad;
  const RowView m(mask);
  const at::Tensor g = grad_scores.reshape({-1}).to(at::kDouble).contiguous();
  const int64_t rows = m.rows.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    const bool* keep = m.rows.const_data_ptr<bool>();
    const double* g_ptr = g.const_data_ptr<double>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_task(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const bool* row = keep + b * m.row_stride;
        int64_t count = 0;
        RLENGINE_SIMD_REDUCE(+ : count)
        for (int64_t t = 0; t < T; ++t) count += row[t * m.col_stride];
        const auto share = static_cast<scalar_t>(g_ptr[b] / length_divisor(count, length_penalty));
        scalar_t* out_row = out + b * T;
        RLENGINE_SIMD
        for (int64_t t = 0; t < T; ++t) out_row[t] = row[t * m.col_stride] ? share : scalar_t(0);
      }
    });
  });
  return grad;
}

// ---- rrhf_rank_loss ------------------------------------------------------------------------------

struct RankInputs {
  at::Tensor scores, rewards, valid;  // contiguous [B, K]; valid undefined when all are valid
  int64_t B, K;
};

RankInputs check_rank_args(const char* op, const at::Tensor& scores, const at::Tensor& rewards,
                           const std::optional<at::Tensor>& valid) {
  check_cpu(op, "scores", scores);
  check_cpu(op, "rewards", rewards);
  check_floating(op, "scores", scores);
  check_floating(op, "rewards", rewards);
  check_dim(op, "scores", scores, 2);
  check_shape(op, "rewards", rewards, scores.sizes());
  RankInputs in{scores.contiguous(), rewards.to(at::kDouble).contiguous(), at::Tensor(),
                scores.size(0), scores.size(1)};
  if (valid) {
    check_cpu(op, "valid", *valid);
    check_bool(op, "valid", *valid);
    check_shape(op, "valid", *valid, scores.sizes());
    in.valid = valid->contiguous();
  }
  return in;
}

// Calls visit(i, j) for every counted pair of one query: both valid and r_i < r_j (so ties and
// NaN rewards are never counted).
template <typename Visit>
void for_each_ranked_pair(const double* r, const bool* valid, int64_t K, Visit&& visit) {
  for (int64_t i = 0; i < K; ++i) {
    if (valid && !valid[i]) continue;
    for (int64_t j = 0; j < K; ++j) {
      if (r[i] < r[j] && (!valid || valid[j])) visit(i, j);
    }
  }
}

at::Tensor rrhf_rank_loss_cpu(const at::Tensor& scores_in, const at::Tensor& rewards_in,
                              const std::optional<at::Tensor>& valid_in) {
  constexpr const char* op = "rrhf_rank_loss";
  const RankInputs in = check_rank_args(op, scores_in, rewards_in, valid_in);
  at::Tensor loss = at::empty({in.B}, scores_in.options().dtype(result_dtype(scores_in)));
  if (in.B == 0) return loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* p = in.scores.const_data_ptr<scalar_t>();
    const double* r = in.rewards.const_data_ptr<double>();
    const bool* valid = in.valid.defined() ? in.valid.const_data_ptr<bool>() : nullptr;
    acc* out = loss.mutable_data_ptr<acc>();
    const int64_t K = in.K;
    at::parallel_for(0, in.B, rows_per_task(K * K), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* pb = p + b * K;
        double total = 0.0;
        for_each_ranked_pair(r + b * K, valid ? valid + b * K : nullptr, K, [&](int64_t i, int64_t j) {
          const double gap = static_cast<double>(pb[i]) - static_cast<double>(pb[j]);
          if (!(gap <= 0.0)) total += gap;  // max(0, gap), letting a NaN score through
        });
        out[b] = static_cast<acc>(total);
      }
    });
  });
  return loss;
}

at::Tensor rrhf_rank_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& scores_in,
                                       const at::Tensor& rewards_in,
                                       const std::optional<at::Tensor>& valid_in) {
  constexpr const char* op = "rrhf_rank_loss_backward";
  const RankInputs in = check_rank_args(op, scores_in, rewards_in, valid_in);
  check_cpu(op, "grad_loss", grad_loss);
  check_shape(op, "grad_loss", grad_loss, {in.B});
  at::Tensor grad = at::zeros({in.B, in.K}, scores_in.options());
  if (grad.numel() == 0) return grad;
  const at::Tensor g = grad_loss.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(), op, [&] {
    const scalar_t* p = in.scores.const_data_ptr<scalar_t>();
    const double* r = in.rewards.const_data_ptr<double>();
    const bool* valid = in.valid.defined() ? in.valid.const_data_ptr<bool>() : nullptr;
    const double* g_ptr = g.const_data_ptr<double>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    const int64_t K = in.K;
    at::parallel_for(0, in.B, rows_per_task(K * K), [&](int64_t begin, int64_t end) {
      std::vector<double> row_grad(static_cast<size_t>(K));
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* pb = p + b * K;
        std::fill(row_grad.begin(), row_grad.end(), 0.0);
        for_each_ranked_pair(r + b * K, valid ? valid + b * K : nullptr, K, [&](int64_t i, int64_t j) {
          // d max(0, p_i - p_j): +1 to p_i, -1 to p_j where the gap is positive (0 at a tie,
          // as torch.relu).
          if (static_cast<double>(pb[i]) - static_cast<double>(pb[j]) > 0.0) {
            row_grad[i] += 1.0;
            row_grad[j] -= 1.0;
          }
        });
        for (int64_t k = 0; k < K; ++k) out[b * K + k] = static_cast<scalar_t>(g_ptr[b] * row_grad[k]);
      }
    });
  });
  return grad;
}

// ---- bt_loss ---------------------------------------------------------------------------------
//
// With L = log1p(exp(-|delta|)) (one exp and one log per pair, exact in both tails):
//   softplus(delta) = max(delta, 0) + L,  softplus(-delta) = max(-delta, 0) + L
//   loss = (1 - a) softplus(-delta) + a softplus(delta)
//   dloss/ddelta = a - sigmoid(-delta)  (not sigmoid(delta) - (1 - a), which cancels to 0 for
//                                        large delta),  dloss/da = delta.
// fp32 loops use the vectorizable exp_nonpositive / log1p_unit, so the kernel runs at the
// machine's vector width; float64 uses libm.

// Per-pair inputs in the working precision, flattened; margin and smoothing either a per-pair
// array or a scalar.
template <typename acc>
struct Pairs {
  const acc* chosen;
  const acc* rejected;
  const acc* margin;     // nullptr: margin_value for every pair
  const acc* smoothing;  // nullptr: smoothing_value for every pair
  acc margin_value, smoothing_value;
  int64_t n;
};

template <typename acc>
RLENGINE_INLINE acc log1p_exp_neg(acc abs_delta) {  // log1p(exp(-|delta|))
  if constexpr (std::is_same_v<acc, float>) {
    return log1p_unit(exp_nonpositive(-abs_delta));
  } else {
    return std::log1p(std::exp(-abs_delta));
  }
}

template <typename acc>
RLENGINE_INLINE acc sigmoid_of_negated(acc delta) {  // sigmoid(-delta)
  const acc e = std::is_same_v<acc, float> ? exp_nonpositive(-std::abs(delta))
                                           : std::exp(-std::abs(delta));
  return (delta >= 0 ? e : acc(1)) / (acc(1) + e);
}

// The loops are instantiated for each combination of per-pair / scalar margin and smoothing,
// so that their bodies have no conditional loads and vectorize.
template <typename acc, bool kMarginArray, bool kSmoothingArray>
RLENGINE_INLINE void bt_forward_loop(const Pairs<acc>& p, acc* out, int64_t begin, int64_t end) {
  RLENGINE_SIMD
  for (int64_t i = begin; i < end; ++i) {
    const acc delta =
        p.chosen[i] - p.rejected[i] - (kMarginArray ? p.margin[i] : p.margin_value);
    const acc a = kSmoothingArray ? p.smoothing[i] : p.smoothing_value;
    const acc shared = log1p_exp_neg(std::abs(delta));
    out[i] = (acc(1) - a) * (std::max(-delta, acc(0)) + shared) +
             a * (std::max(delta, acc(0)) + shared);
  }
}

template <typename acc, bool kMarginArray, bool kSmoothingArray>
RLENGINE_INLINE void bt_backward_loop(const Pairs<acc>& p, const acc* grad, acc* grad_delta,
                             acc* grad_smoothing, int64_t begin, int64_t end) {
  RLENGINE_SIMD
  for (int64_t i = begin; i < end; ++i) {
    const acc delta =
        p.chosen[i] - p.rejected[i] - (kMarginArray ? p.margin[i] : p.margin_value);
    const acc a = kSmoothingArray ? p.smoothing[i] : p.smoothing_value;
    grad_delta[i] = grad[i] * (a - sigmoid_of_negated(delta));
    grad_smoothing[i] = grad[i] * delta;
  }
}

template <typename acc>
RLENGINE_INLINE void bt_forward_range(const Pairs<acc>& p, acc* out, int64_t begin, int64_t end) {
  if (p.margin && p.smoothing) bt_forward_loop<acc, true, true>(p, out, begin, end);
  else if (p.margin) bt_forward_loop<acc, true, false>(p, out, begin, end);
  else if (p.smoothing) bt_forward_loop<acc, false, true>(p, out, begin, end);
  else bt_forward_loop<acc, false, false>(p, out, begin, end);
}

template <typename acc>
RLENGINE_INLINE void bt_backward_range(const Pairs<acc>& p, const acc* grad, acc* grad_delta,
                              acc* grad_smoothing, int64_t begin, int64_t end) {
  if (p.margin && p.smoothing)
    bt_backward_loop<acc, true, true>(p, grad, grad_delta, grad_smoothing, begin, end);
  else if (p.margin)
    bt_backward_loop<acc, true, false>(p, grad, grad_delta, grad_smoothing, begin, end);
  else if (p.smoothing)
    bt_backward_loop<acc, false, true>(p, grad, grad_delta, grad_smoothing, begin, end);
  else
    bt_backward_loop<acc, false, false>(p, grad, grad_delta, grad_smoothing, begin, end);
}

// The fp32 loops as target clones (the inline templates above compile once per vector ISA).
RLENGINE_SIMD_CLONES void bt_forward_f32(const Pairs<float>& p, float* out, int64_t begin,
                                         int64_t end) {
  bt_forward_range(p, out, begin, end);
}
RLENGINE_SIMD_CLONES void bt_backward_f32(const Pairs<float>& p, const float* grad,
                                          float* grad_delta, float* grad_smoothing,
                                          int64_t begin, int64_t end) {
  bt_backward_range(p, grad, grad_delta, grad_smoothing, begin, end);
}

// Overloads pick the vector clones for fp32 and the libm loops for float64.
inline void bt_forward(const Pairs<float>& p, float* out, int64_t begin, int64_t end) {
  bt_forward_f32(p, out, begin, end);
}
inline void bt_forward(const Pairs<double>& p, double* out, int64_t begin, int64_t end) {
  bt_forward_range(p, out, begin, end);
}
inline void bt_backward(const Pairs<float>& p, const float* grad, float* grad_delta,
                        float* grad_smoothing, int64_t begin, int64_t end) {
  bt_backward_f32(p, grad, grad_delta, grad_smoothing, begin, end);
}
inline void bt_backward(const Pairs<double>& p, const double* grad, double* grad_delta,
                        double* grad_smoothing, int64_t begin, int64_t end) {
  bt_backward_range(p, grad, grad_delta, grad_smoothing, begin, end);
}

// Validates the arguments and converts the tensors to contiguous arrays of the working
// precision (a copy only where the dtype or layout differs).
struct PairTensors {
  at::Tensor chosen, rejected, margin, smoothing;
};

PairTensors check_pair_args(const char* op, const at::Tensor& chosen, const at::Tensor& rejected,
                            const std::optional<at::Tensor>& margin,
                            const std::optional<at::Tensor>& smoothing, double margin_value,
                            double smoothing_value) {
  check_cpu(op, "chosen", chosen);
  check_cpu(op, "rejected", rejected);
  check_floating(op, "chosen", chosen);
  check_floating(op, "rejected", rejected);
  check_shape(op, "rejected", rejected, chosen.sizes());
  TORCH_CHECK_VALUE(std::isfinite(margin_value), "rlengine.", op, ": margin must be finite");
  TORCH_CHECK_VALUE(std::isfinite(smoothing_value) && smoothing_value >= 0.0 &&
                        smoothing_value <= 1.0,
                    "rlengine.", op, ": label_smoothing must be in [0, 1], got ", smoothing_value);
  const at::ScalarType acc = result_dtype(chosen);
  const auto flat = [acc](const at::Tensor& t) { return t.reshape({-1}).to(acc).contiguous(); };
  PairTensors in{flat(chosen), flat(rejected), at::Tensor(), at::Tensor()};
  const auto optional_pairs = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t) return at::Tensor();
    check_cpu(op, name, *t);
    check_floating(op, name, *t);
    check_shape(op, name, *t, chosen.sizes());
    return flat(*t);
  };
  in.margin = optional_pairs(margin, "margin");
  in.smoothing = optional_pairs(smoothing, "label_smoothing");
  return in;
}

template <typename acc>
Pairs<acc> pairs_of(const PairTensors& in, double margin_value, double smoothing_value) {
  const auto ptr = [](const at::Tensor& t) {
    return t.defined() ? t.const_data_ptr<acc>() : nullptr;
  };
  return {ptr(in.chosen),  ptr(in.rejected), ptr(in.margin), ptr(in.smoothing),
          static_cast<acc>(margin_value), static_cast<acc>(smoothing_value), in.chosen.numel()};
}

at::Tensor bt_loss_cpu(const at::Tensor& chosen, const at::Tensor& rejected,
                       const std::optional<at::Tensor>& margin,
                       const std::optional<at::Tensor>& label_smoothing, double margin_value,
                       double label_smoothing_value) {
  constexpr const char* op = "bt_loss";
  const PairTensors in = check_pair_args(op, chosen, rejected, margin, label_smoothing,
                                         margin_value, label_smoothing_value);
  at::Tensor loss = at::empty(chosen.sizes(), chosen.options().dtype(result_dtype(chosen)));
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), op, [&] {
    const Pairs<scalar_t> p = pairs_of<scalar_t>(in, margin_value, label_smoothing_value);
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.n, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
      bt_forward(p, out, begin, end);
    });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> bt_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& chosen, const at::Tensor& rejected,
    const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& label_smoothing,
    double margin_value, double label_smoothing_value) {
  constexpr const char* op = "bt_loss_backward";
  const PairTensors in = check_pair_args(op, chosen, rejected, margin, label_smoothing,
                                         margin_value, label_smoothing_value);
  check_cpu(op, "grad_loss", grad_loss);
  check_shape(op, "grad_loss", grad_loss, chosen.sizes());
  const at::ScalarType acc = result_dtype(chosen);
  const at::Tensor grad = grad_loss.reshape({-1}).to(acc).contiguous();
  const auto options = chosen.options().dtype(acc);
  at::Tensor grad_delta = at::empty(chosen.sizes(), options);
  at::Tensor grad_smoothing = at::empty(chosen.sizes(), options);
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    const Pairs<scalar_t> p = pairs_of<scalar_t>(in, margin_value, label_smoothing_value);
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* out_delta = grad_delta.mutable_data_ptr<scalar_t>();
    scalar_t* out_smoothing = grad_smoothing.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.n, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
      bt_backward(p, g, out_delta, out_smoothing, begin, end);
    });
  });
  return {grad_delta, grad_smoothing};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CPU, m) {
  m.impl("sequence_scores", &sequence_scores_cpu);
  m.impl("sequence_scores_backward", &sequence_scores_backward_cpu);
  m.impl("rrhf_rank_loss", &rrhf_rank_loss_cpu);
  m.impl("rrhf_rank_loss_backward", &rrhf_rank_loss_backward_cpu);
  m.impl("bt_loss", &bt_loss_cpu);
  m.impl("bt_loss_backward", &bt_loss_backward_cpu);
}

}  // namespace rlengine::cpu
