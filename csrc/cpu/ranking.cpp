// CPU kernels of the ranking and preference losses and their backward ops:
//   sequence_scores  masked sum of token log-probs / length ** length_penalty (RRHF's p_i)
//   rrhf_rank_loss   sum over reward-ordered candidate pairs of max(0, p_worse - p_better)
//   bt_loss          Bradley-Terry loss with margin and label smoothing
//
// sequence_scores and bt_loss are single passes over their inputs: fp32 SIMD loops (compiled
// per vector width like vec_math.cpp) over L1-sized chunks, parallel over rows or elements,
// with no temporaries of the inputs' size (bf16/fp16 chunks are widened in a stack buffer).
// rrhf_rank_loss is O(K^2) per query with K a few dozen at most: that work is tiny, so it is
// written for exactness (double arithmetic, strided reads, no copies) and parallel over queries.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/ranking_checks.h"
#include "cpu/vec_math.h"

namespace rlengine::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // elements per chunk: the fp32 staging buffers stay in L1

// ---- fp32 SIMD loops ---------------------------------------------------------------------------
// Masks are read as bytes with "nonzero is true", so a bool tensor made by reinterpreting
// other bytes still selects instead of scaling.

struct MaskedSum {
  float sum;
  int32_t count;  // n <= kChunk, so int32 (the same lane width as the float sum) cannot overflow
};

RLENGINE_SIMD_CLONES MaskedSum masked_sum_f32(const float* x, const uint8_t* mask, int64_t n) {
  float sum = 0.0f;
  int32_t count = 0;
  RLENGINE_SIMD_REDUCE(+ : sum, count)
  for (int64_t i = 0; i < n; ++i) {
    sum += keep_or_zero(x[i], mask[i]);
    count += mask[i] != 0;
  }
  return {sum, count};
}

RLENGINE_SIMD_CLONES void masked_fill_f32(const uint8_t* mask, float value, float* out,
                                          int64_t n) {
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) out[i] = mask[i] != 0 ? value : 0.0f;
}

// log1p(e) for e in [0, 1]: log1p(e) = 2 atanh(s) with s = e / (2 + e) in [0, 1/3], which has
// no cancellation for tiny e (unlike log(1 + e)), and the odd Taylor series of atanh up to s^15,
// whose remainder is below 2e-9 relative at s = 1/3. Branch-free, so it vectorizes.
RLENGINE_INLINE float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// BT loss with delta = c - r - m and smoothing a, written as
//   log1p(exp(-|delta|)) + (1 - a) max(-delta, 0) + a max(delta, 0),
// the same value as (1 - a) softplus(-delta) + a softplus(delta) with two non-negative terms
// (no cancellation in either tail) and one exp per element. Infinite deltas follow IEEE
// arithmetic exactly as the reference does (0 * inf = NaN); a NaN delta stays NaN.
RLENGINE_SIMD_CLONES void bt_loss_f32(const float* c, const float* r, const float* m,
                                      const float* a, float* loss, int64_t n) {
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const float d = c[i] - r[i] - m[i];
    const float ad = d < 0.0f ? -d : d;
    const float tail = log1p_unit(exp_nonpositive(-ad));
    const float up = d > 0.0f ? d : 0.0f;
    const float down = d < 0.0f ? -d : 0.0f;
    const float v = tail + (1.0f - a[i]) * down + a[i] * up;
    loss[i] = d != d ? d : v;
  }
}

// dloss/ddelta = a sigma(delta) - (1 - a) sigma(-delta), with both sigmoids taken from
// e = exp(-|delta|) (sigma(|delta|) = 1 / (1 + e), sigma(-|delta|) = e / (1 + e)), so that the
// small one keeps its full relative precision instead of being 1 - (something near 1).
// At delta = 0 this is a - 1/2. dloss/da = softplus(delta) - softplus(-delta) = delta exactly.
RLENGINE_SIMD_CLONES void bt_grad_f32(const float* c, const float* r, const float* m,
                                      const float* a, const float* g, float* grad_delta,
                                      float* grad_a, int64_t n) {
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const float d = c[i] - r[i] - m[i];
    const float ad = d < 0.0f ? -d : d;
    const float e = exp_nonpositive(-ad);
    const float w = a[i];
    const float numerator = d >= 0.0f ? w - (1.0f - w) * e : w * e - (1.0f - w);
    const float gd = g[i] * numerator / (1.0f + e);
    grad_delta[i] = d != d ? d : gd;
  }
  if (grad_a == nullptr) return;
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) grad_a[i] = g[i] * (c[i] - r[i] - m[i]);
}

// ---- float64 loops (the gradcheck path: exact libm calls, speed is secondary) ---------------

double bt_loss_f64(double d, double a) {
  if (std::isnan(d)) return d;
  const double tail = std::log1p(std::exp(-std::abs(d)));
  return tail + (1.0 - a) * (d < 0.0 ? -d : 0.0) + a * (d > 0.0 ? d : 0.0);
}

double bt_grad_f64(double d, double a) {
  if (std::isnan(d)) return d;
  const double e = std::exp(-std::abs(d));
  return (d >= 0.0 ? a - (1.0 - a) * e : a * e - (1.0 - a)) / (1.0 + e);
}

// ---- helpers -----------------------------------------------------------------------------------

// Divisor of a row's masked sum: count ** length_penalty, and 1 for an empty row (whose score
// and gradient are 0 either way).
double length_divisor(int64_t count, double length_penalty) {
  if (count == 0 || length_penalty == 0.0) return 1.0;
  if (length_penalty == 1.0) return static_cast<double>(count);
  return std::pow(static_cast<double>(count), length_penalty);
}

// A [..., T] tensor as [N, T] rows that are each contiguous (leading dimensions may keep any
// strides that reshape can express as one row stride; otherwise it copies).
at::Tensor as_rows(const at::Tensor& t, int64_t rows, int64_t row_length) {
  at::Tensor r = t.reshape({rows, row_length});
  if (row_length > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

using ranking_checks::check_length_penalty;

struct RowSum {
  double sum;  // fp32 chunk sums combined in double (which costs nothing)
  int64_t count;
};

// Sum and count of the masked elements of one row of T (fp32 work for fp32/bf16/fp16 rows).
template <typename scalar_t>
RowSum masked_row_sum(const scalar_t* x, const uint8_t* mask, int64_t T, float* buffer) {
  RowSum r{0.0, 0};
  for (int64_t start = 0; start < T; start += kChunk) {
    const int64_t n = std::min(kChunk, T - start);
    const float* chunk;
    if constexpr (std::is_same_v<scalar_t, float>) {
      chunk = x + start;
    } else {
      to_float(x + start, buffer, n);
      chunk = buffer;
    }
    const MaskedSum s = masked_sum_f32(chunk, mask + start, n);
    r.sum += s.sum;
    r.count += s.count;
  }
  return r;
}

template <>
RowSum masked_row_sum<double>(const double* x, const uint8_t* mask, int64_t T, float*) {
  double sum = 0.0;
  int64_t count = 0;
  RLENGINE_SIMD_REDUCE(+ : sum, count)
  for (int64_t t = 0; t < T; ++t) {
    const bool keep = mask[t] != 0;
    sum += keep ? x[t] : 0.0;
    count += keep;
  }
  return {sum, count};
}

// out[t] = value where the mask is set, else 0, in the gradient's dtype.
template <typename scalar_t>
void masked_row_fill(const uint8_t* mask, double value, scalar_t* out, int64_t T) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    masked_fill_f32(mask, static_cast<float>(value), out, T);
  } else {
    const scalar_t v = static_cast<scalar_t>(value);
    for (int64_t t = 0; t < T; ++t) out[t] = mask[t] != 0 ? v : scalar_t(0);
  }
}

// ---- sequence_scores ---------------------------------------------------------------------------

at::Tensor sequence_scores_cpu(const at::Tensor& token_logprobs, const at::Tensor& mask,
                               double length_penalty) {
  constexpr const char* op = "sequence_scores";
  check_cpu(op, "token_logprobs", token_logprobs);
  check_cpu(op, "mask", mask);
  check_floating(op, "token_logprobs", token_logprobs);
  check_bool(op, "mask", mask);
  TORCH_CHECK_VALUE(token_logprobs.dim() >= 1,
                    "rlengine.sequence_scores: token_logprobs must have a token dimension, got a "
                    "0-d tensor");
  check_shape(op, "mask", mask, token_logprobs.sizes());
  check_length_penalty(length_penalty);

  const auto leading = token_logprobs.sizes().slice(0, token_logprobs.dim() - 1);
  const int64_t T = token_logprobs.size(-1);
  const int64_t N = c10::multiply_integers(leading);
  at::Tensor scores =
      at::empty(leading, token_logprobs.options().dtype(result_dtype(token_logprobs)));
  if (N == 0) return scores;
  const at::Tensor x = as_rows(token_logprobs, N, T);
  const at::Tensor m = as_rows(mask, N, T);
  const int64_t x_stride = x.stride(0);
  const int64_t m_stride = m.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using out_t = compute_t<scalar_t>;
    const scalar_t* x_base = x.const_data_ptr<scalar_t>();
    const uint8_t* m_base = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
    out_t* out = scores.mutable_data_ptr<out_t>();
    at::parallel_for(0, N, rows_per_task(T, grain::kSequenceScores), [&](int64_t begin, int64_t end) {
      float buffer[kChunk];
      for (int64_t row = begin; row < end; ++row) {
        const RowSum r =
            masked_row_sum(x_base + row * x_stride, m_base + row * m_stride, T, buffer);
        out[row] = static_cast<out_t>(r.sum / length_divisor(r.count, length_penalty));
      }
    });
  });
  return scores;
}

at::Tensor sequence_scores_backward_cpu(const at::Tensor& grad_scores, const at::Tensor& mask,
                                        double length_penalty, at::ScalarType dtype) {
  constexpr const char* op = "sequence_scores_backward";
  check_cpu(op, "grad_scores", grad_scores);
  check_cpu(op, "mask", mask);
  check_bool(op, "mask", mask);
  TORCH_CHECK_VALUE(mask.dim() >= 1, "rlengine.sequence_scores_backward: mask must have a token ",
                    "dimension, got a 0-d tensor");
  const auto leading = mask.sizes().slice(0, mask.dim() - 1);
  check_shape(op, "grad_scores", grad_scores, leading);
  check_floating(op, "dtype", dtype);
  check_length_penalty(length_penalty);

  const int64_t T = mask.size(-1);
  const int64_t N = c10::multiply_integers(leading);
  at::Tensor grad = at::empty(mask.sizes(), mask.options().dtype(dtype));
  if (grad.numel() == 0) return grad;
  const at::Tensor m = as_rows(mask, N, T);
  const int64_t m_stride = m.stride(0);
  const at::Tensor g = grad_scores.to(at::kDouble).contiguous();  // N values: negligible

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    const uint8_t* m_base = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
    const double* g_ptr = g.const_data_ptr<double>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, rows_per_task(T, grain::kSequenceScores), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const uint8_t* mr = m_base + row * m_stride;
        scalar_t* o = out + row * T;
        const int64_t count = count_nonzero(mr, T);
        if (count == 0) {
          std::fill(o, o + T, scalar_t(0));  // nothing here reaches the score, not even NaN
          continue;
        }
        masked_row_fill(mr, g_ptr[row] / length_divisor(count, length_penalty), o, T);
      }
    });
  });
  return grad;
}

// ---- rrhf_rank_loss ----------------------------------------------------------------------------

void check_rank_inputs(const char* op, const at::Tensor& scores, const at::Tensor& rewards,
                       const std::optional<at::Tensor>& valid) {
  ranking_checks::check_rank_inputs(op, scores, rewards, valid, at::Device(at::kCPU));
}

// One query's candidates, loaded as double: an invalid candidate's reward becomes NaN, so that
// `r[i] < r[j]` alone decides whether a pair counts (ties and NaN rewards never do).
struct QueryRow {
  std::vector<double> score, reward, coefficient;
  explicit QueryRow(int64_t K) : score(K), reward(K), coefficient(K) {}
};

// Calls visit(i, j, gap) for every pair that contributes: i and j valid, r_i < r_j, and the
// hinge gap p_i - p_j not <= 0 (positive, or NaN, which passes through like torch.relu's value
// and gradient). At p_i == p_j the pair contributes nothing: relu's subgradient at 0 is 0.
template <typename Visit>
void for_each_active_pair(const QueryRow& q, int64_t K, Visit&& visit) {
  const double* p = q.score.data();
  const double* r = q.reward.data();
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t j = 0; j < K; ++j) {
      if (!(r[i] < r[j])) continue;
      const double gap = p[i] - p[j];
      if (gap <= 0.0) continue;
      visit(i, j, gap);
    }
  }
}

// Runs body(b, q, score_tag) over the queries b in parallel, with query b's candidates loaded
// into q; score_tag is a null `score_t*` naming the scores' dtype. Inputs are read in place
// with their strides (B x K is small; nothing is copied).
template <typename Body>
void for_each_query(const at::Tensor& scores, const at::Tensor& rewards,
                    const std::optional<at::Tensor>& valid, Body&& body) {
  const int64_t B = scores.size(0), K = scores.size(1);
  const bool* v = valid ? valid->const_data_ptr<bool>() : nullptr;
  const int64_t v0 = valid ? valid->stride(0) : 0, v1 = valid ? valid->stride(1) : 0;
  const int64_t s0 = scores.stride(0), s1 = scores.stride(1);
  const int64_t r0 = rewards.stride(0), r1 = rewards.stride(1);
  const int64_t grain = rows_per_task(K * K, grain::kRankPairs);
  constexpr const char* op = "rrhf_rank_loss";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), op, [&] {
    using score_t = scalar_t;
    const score_t* s = scores.const_data_ptr<score_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), op, [&] {
      const scalar_t* r = rewards.const_data_ptr<scalar_t>();
      at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        QueryRow q(K);
        for (int64_t b = begin; b < end; ++b) {
          for (int64_t k = 0; k < K; ++k) {
            const bool ok = v == nullptr || v[b * v0 + k * v1];
            q.score[k] = static_cast<double>(s[b * s0 + k * s1]);
            q.reward[k] = ok ? static_cast<double>(r[b * r0 + k * r1])
                             : std::numeric_limits<double>::quiet_NaN();
          }
          body(b, q, static_cast<score_t*>(nullptr));
        }
      });
    });
  });
}

at::Tensor rrhf_rank_loss_cpu(const at::Tensor& scores, const at::Tensor& rewards,
                              const std::optional<at::Tensor>& valid) {
  constexpr const char* op = "rrhf_rank_loss";
  check_rank_inputs(op, scores, rewards, valid);
  const int64_t B = scores.size(0), K = scores.size(1);
  at::Tensor loss = at::zeros({B}, scores.options().dtype(result_dtype(scores)));
  if (B == 0 || K < 2) return loss;
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), op, [&] {
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    for_each_query(scores, rewards, valid, [&](int64_t b, QueryRow& q, auto) {
      double total = 0.0;
      for_each_active_pair(q, K, [&](int64_t, int64_t, double gap) { total += gap; });
      out[b] = static_cast<scalar_t>(total);
    });
  });
  return loss;
}

at::Tensor rrhf_rank_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& scores,
                                       const at::Tensor& rewards,
                                       const std::optional<at::Tensor>& valid) {
  constexpr const char* op = "rrhf_rank_loss_backward";
  check_rank_inputs(op, scores, rewards, valid);
  check_cpu(op, "grad_loss", grad_loss);
  const int64_t B = scores.size(0), K = scores.size(1);
  check_shape(op, "grad_loss", grad_loss, {B});
  at::Tensor grad = at::zeros({B, K}, scores.options());
  if (B == 0 || K < 2) return grad;
  const at::Tensor g = grad_loss.to(at::kDouble).contiguous();  // B values
  const double* g_ptr = g.const_data_ptr<double>();
  void* out = grad.mutable_data_ptr();
  for_each_query(scores, rewards, valid, [&](int64_t b, QueryRow& q, auto score_tag) {
    using score_t = std::remove_pointer_t<decltype(score_tag)>;
    // Net count of active pairs in which each candidate is the worse (+1) or the better (-1)
    // one: small integers, exact in double, so each gradient is rounded once.
    double* c = q.coefficient.data();
    std::fill(c, c + K, 0.0);
    bool any = false;
    for_each_active_pair(q, K, [&](int64_t i, int64_t j, double) {
      c[i] += 1.0;
      c[j] -= 1.0;
      any = true;
    });
    if (!any) return;  // the row stays zero, whatever grad_loss holds
    score_t* o = static_cast<score_t*>(out) + b * K;
    for (int64_t k = 0; k < K; ++k) o[k] = static_cast<score_t>(g_ptr[b] * c[k]);
  });
  return grad;
}

// ---- bt_loss -----------------------------------------------------------------------------------

// One input of the elementwise BT kernels in the working precision acc_t: a contiguous tensor,
// or one value shared by every element (a Python number, a 0-d tensor, or an expanded scalar
// such as the incoming gradient of loss.mean(), which is then never copied).
template <typename acc_t>
struct Operand {
  const void* data = nullptr;  // nullptr: every element is `value`
  at::ScalarType dtype = c10::CppTypeToScalarType<acc_t>::value;
  acc_t value = 0;
  at::Tensor storage;  // keeps a converted copy alive
};

template <typename acc_t>
Operand<acc_t> make_operand(const std::optional<at::Tensor>& t, double fallback) {
  Operand<acc_t> o;
  if (!t || !t->defined()) {
    o.value = static_cast<acc_t>(fallback);
    return o;
  }
  const auto& s = t->strides();
  const bool broadcast =
      t->numel() >= 1 && std::all_of(s.begin(), s.end(), [](int64_t v) { return v == 0; });
  if (t->numel() == 1 || broadcast) {
    // A 0-d view of the first element: reshaping an expanded tensor would copy all of it.
    o.value = static_cast<acc_t>(t->as_strided({}, {}).item<double>());
    return o;
  }
  const at::ScalarType d = t->scalar_type();
  // fp32 work reads bf16/fp16 chunks itself; anything else not in acc_t is converted once.
  const bool readable = d == o.dtype || (std::is_same_v<acc_t, float> &&
                                         (d == at::kBFloat16 || d == at::kHalf));
  o.storage = readable ? t->contiguous() : t->to(o.dtype).contiguous();
  o.dtype = o.storage.scalar_type();
  o.data = o.storage.const_data_ptr();
  return o;
}

// Per-thread view of an Operand, chunk by chunk.
template <typename acc_t>
class ChunkReader {
 public:
  explicit ChunkReader(const Operand<acc_t>& o) : o_(o) {
    if (o_.data == nullptr) std::fill(buffer_, buffer_ + kChunk, o_.value);
  }
  const acc_t* read(int64_t start, int64_t n) {
    if (o_.data == nullptr) return buffer_;
    if (o_.dtype == c10::CppTypeToScalarType<acc_t>::value) {
      return static_cast<const acc_t*>(o_.data) + start;
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      if (o_.dtype == at::kBFloat16) {
        to_float(static_cast<const c10::BFloat16*>(o_.data) + start, buffer_, n);
      } else {
        to_float(static_cast<const c10::Half*>(o_.data) + start, buffer_, n);
      }
    }
    return buffer_;
  }

 private:
  const Operand<acc_t>& o_;
  acc_t buffer_[kChunk];
};

// One chunk of the BT loss / gradient in the working precision (fp32 SIMD or float64 libm).
template <typename acc_t>
void bt_loss_chunk(const acc_t* c, const acc_t* r, const acc_t* m, const acc_t* a, acc_t* loss,
                   int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) {
    bt_loss_f32(c, r, m, a, loss, n);
  } else {
    for (int64_t i = 0; i < n; ++i) loss[i] = bt_loss_f64(c[i] - r[i] - m[i], a[i]);
  }
}

template <typename acc_t>
void bt_grad_chunk(const acc_t* c, const acc_t* r, const acc_t* m, const acc_t* a,
                   const acc_t* g, acc_t* grad_delta, acc_t* grad_a, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) {
    bt_grad_f32(c, r, m, a, g, grad_delta, grad_a, n);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const double d = c[i] - r[i] - m[i];
      grad_delta[i] = g[i] * bt_grad_f64(d, a[i]);
      if (grad_a) grad_a[i] = g[i] * d;
    }
  }
}

void check_bt_inputs(const char* op, const at::Tensor& chosen, const at::Tensor& rejected,
                     const std::optional<at::Tensor>& margin,
                     const std::optional<at::Tensor>& label_smoothing) {
  ranking_checks::check_bt_inputs(op, chosen, rejected, margin, label_smoothing,
                                  at::Device(at::kCPU));
}

template <typename acc_t>
struct BtOperands {
  Operand<acc_t> chosen, rejected, margin, smoothing;
};

template <typename acc_t>
BtOperands<acc_t> bt_operands(const at::Tensor& chosen, const at::Tensor& rejected,
                              const std::optional<at::Tensor>& margin,
                              const std::optional<at::Tensor>& label_smoothing,
                              double margin_value, double label_smoothing_value) {
  return {make_operand<acc_t>(chosen, 0.0), make_operand<acc_t>(rejected, 0.0),
          make_operand<acc_t>(margin, margin_value),
          make_operand<acc_t>(label_smoothing, label_smoothing_value)};
}

at::Tensor bt_loss_cpu(const at::Tensor& chosen, const at::Tensor& rejected,
                       const std::optional<at::Tensor>& margin,
                       const std::optional<at::Tensor>& label_smoothing, double margin_value,
                       double label_smoothing_value) {
  constexpr const char* op = "bt_loss";
  check_bt_inputs(op, chosen, rejected, margin, label_smoothing);
  at::Tensor loss = at::empty(chosen.sizes(), chosen.options().dtype(result_dtype(chosen)));
  const int64_t n_total = chosen.numel();
  if (n_total == 0) return loss;
  AT_DISPATCH_FLOATING_TYPES(loss.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    const auto in = bt_operands<acc_t>(chosen, rejected, margin, label_smoothing, margin_value,
                                       label_smoothing_value);
    acc_t* out = loss.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n_total, grain::kBtLoss, [&](int64_t begin, int64_t end) {
      ChunkReader<acc_t> c(in.chosen), r(in.rejected), m(in.margin), a(in.smoothing);
      for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t n = std::min(kChunk, end - start);
        const acc_t* cp = c.read(start, n);
        const acc_t* rp = r.read(start, n);
        const acc_t* mp = m.read(start, n);
        const acc_t* ap = a.read(start, n);
        bt_loss_chunk(cp, rp, mp, ap, out + start, n);
      }
    });
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> bt_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& chosen, const at::Tensor& rejected,
    const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& label_smoothing,
    double margin_value, double label_smoothing_value) {
  constexpr const char* op = "bt_loss_backward";
  check_bt_inputs(op, chosen, rejected, margin, label_smoothing);
  check_cpu(op, "grad_loss", grad_loss);
  check_floating(op, "grad_loss", grad_loss);
  check_shape(op, "grad_loss", grad_loss, chosen.sizes());
  const auto options = chosen.options().dtype(result_dtype(chosen));
  at::Tensor grad_delta = at::empty(chosen.sizes(), options);
  // Only a tensor label smoothing has a gradient; per element, like grad_delta (the autograd
  // formula sums it for a 0-d one).
  at::Tensor grad_smoothing =
      at::empty(label_smoothing ? chosen.sizes() : at::IntArrayRef{0}, options);
  const int64_t n_total = chosen.numel();
  if (n_total == 0) return {grad_delta, grad_smoothing};
  AT_DISPATCH_FLOATING_TYPES(grad_delta.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    const auto in = bt_operands<acc_t>(chosen, rejected, margin, label_smoothing, margin_value,
                                       label_smoothing_value);
    const auto grad_in = make_operand<acc_t>(grad_loss, 0.0);
    acc_t* gd = grad_delta.mutable_data_ptr<acc_t>();
    acc_t* ga = label_smoothing ? grad_smoothing.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n_total, grain::kBtLoss, [&](int64_t begin, int64_t end) {
      ChunkReader<acc_t> c(in.chosen), r(in.rejected), m(in.margin), a(in.smoothing), g(grad_in);
      for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t n = std::min(kChunk, end - start);
        const acc_t* cp = c.read(start, n);
        const acc_t* rp = r.read(start, n);
        const acc_t* mp = m.read(start, n);
        const acc_t* ap = a.read(start, n);
        const acc_t* gp = g.read(start, n);
        bt_grad_chunk(cp, rp, mp, ap, gp, gd + start, ga ? ga + start : nullptr, n);
      }
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
