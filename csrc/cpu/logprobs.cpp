// CPU kernels of rlengine::token_logprobs and its backward.
//
// One pass over each row of logits: the row is walked in L1-sized chunks; each chunk's maximum
// updates the running maximum (rescaling the running sums when it grows), then one exp per
// element adds the chunk to sum(exp(z - m)) and, for the entropy, sum(exp(z - m) * (z - m)).
// Entropy = log(s) - w / s with w accumulated against the running maximum, which avoids the
// cancellation of the textbook lse - E[z]. Nothing of size N x V is allocated in the forward;
// the backward recomputes the softmax from the saved per-row logsumexp.
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/common.h"
#include "cpu/logprobs_checks.h"
#include "cpu/vec_math.h"

namespace rlengine::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // floats per chunk: 8 KiB, stays in L1 between the two sweeps

// Offset of each row's first element for logits whose leading dimensions have any strides
// (e.g. logits[:, :-1] of a [B, T, V] tensor); the vocabulary dimension has stride 1.
class RowOffsets {
 public:
  explicit RowOffsets(const at::Tensor& logits) {
    for (int64_t d = logits.dim() - 2; d >= 0; --d) {
      sizes_.push_back(logits.size(d));
      strides_.push_back(logits.stride(d));
    }
  }
  int64_t operator()(int64_t row) const {
    int64_t offset = 0;
    for (size_t d = 0; d < sizes_.size(); ++d) {
      offset += (row % sizes_[d]) * strides_[d];
      row /= sizes_[d];
    }
    return offset;
  }

 private:
  c10::SmallVector<int64_t, 6> sizes_;  // innermost leading dimension first
  c10::SmallVector<int64_t, 6> strides_;
};

struct RowResult {
  double logsumexp;  // NaN when the row has a NaN, a +inf, or only -inf
  double entropy;
};

template <typename scalar_t>
const float* chunk_as_float(const scalar_t* p, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return p;
  } else {
    to_float(p, buffer, n);
    return buffer;
  }
}

// Online logsumexp (and entropy) of row * scale for fp32/bf16/fp16 rows, in fp32 chunk sums
// combined in double.
template <typename scalar_t>
RowResult row_logsumexp(const scalar_t* row, int64_t V, double exact_scale, bool want_entropy,
                        float* buffer) {
  const float scale = static_cast<float>(exact_scale);
  float m = kNegInf;
  double s = 0.0, w = 0.0;
  bool saw_nan = false;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* x = chunk_as_float(row + start, n, buffer);
    const ChunkMax chunk = chunk_max(x, n);
    saw_nan |= chunk.saw_nan;
    const float chunk_m = chunk.max * scale;  // scale > 0 keeps the order
    if (chunk_m > m) {
      if (m != kNegInf) {
        const double shift = static_cast<double>(m) - chunk_m;
        const double alpha = std::exp(shift);
        w = alpha * (w + shift * s);
        s *= alpha;
      }
      m = chunk_m;
    }
    if (!std::isfinite(m)) continue;  // only -inf so far, or +inf (the result is NaN then)
    const ChunkSums sums = chunk_sum_exp(x, n, scale, m, want_entropy);
    s += sums.sum_exp;
    w += sums.sum_exp_times_arg;
  }
  if (saw_nan || !std::isfinite(m)) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {nan, nan};
  }
  const double log_s = std::log(s);
  return {m + log_s, log_s - w / s};
}

// float64 rows (the gradcheck path): two exact passes in double.
template <>
RowResult row_logsumexp<double>(const double* row, int64_t V, double scale, bool want_entropy,
                                float* /*buffer*/) {
  double m = -std::numeric_limits<double>::infinity();
  bool saw_nan = false;
  for (int64_t j = 0; j < V; ++j) {
    saw_nan |= std::isnan(row[j]);
    m = std::max(m, row[j] * scale);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (saw_nan || !std::isfinite(m)) return {nan, nan};
  double s = 0.0, w = 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const double d = row[j] * scale - m;
    const double e = std::exp(d);
    s += e;
    if (e > 0.0) w += e * d;
  }
  const double log_s = std::log(s);
  return {m + log_s, want_entropy ? log_s - w / s : 0.0};
}

template <typename scalar_t>
double to_double(scalar_t v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
double to_double<double>(double v) {
  return v;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits_in,
                                                                  const at::Tensor& labels_in,
                                                                  double temperature,
                                                                  int64_t ignore_index,
                                                                  bool with_entropy,
                                                                  bool /*inplace_backward*/) {
  constexpr const char* op = "token_logprobs";
  logprobs_checks::check_forward_args(op, logits_in, labels_in, temperature, at::kCPU);
  const int64_t V = logits_in.size(-1);
  TORCH_CHECK_VALUE(V >= 1, "rlengine.token_logprobs: logits must have a vocabulary size >= 1");

  const at::Tensor logits = logits_in.stride(-1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t N = labels.numel();
  const auto out_options = logits.options().dtype(result_dtype(logits));
  at::Tensor logprobs = at::empty(labels.sizes(), out_options);
  at::Tensor logsumexp = at::empty(labels.sizes(), out_options);
  at::Tensor entropy = at::empty(with_entropy ? labels.sizes() : at::IntArrayRef{0}, out_options);
  if (N == 0) return {logprobs, entropy, logsumexp};

  const RowOffsets row_offset(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    using out_t = compute_t<scalar_t>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
    out_t* lp_ptr = logprobs.mutable_data_ptr<out_t>();
    out_t* lse_ptr = logsumexp.mutable_data_ptr<out_t>();
    out_t* ent_ptr = with_entropy ? entropy.mutable_data_ptr<out_t>() : nullptr;
    // fp32 kernels work with 1/temperature rounded to float; the label's logit uses the same.
    const double scale = std::is_same_v<scalar_t, double>
                             ? 1.0 / temperature
                             : static_cast<double>(static_cast<float>(1.0 / temperature));
    at::parallel_for(0, N, rows_per_task(V, grain::kLogprobs), [&](int64_t begin, int64_t end) {
      float buffer[kChunk];
      for (int64_t i = begin; i < end; ++i) {
        const int64_t label = label_ptr[i];
        if (label == ignore_index) {  // ignored positions are exactly 0 and never read
          lp_ptr[i] = 0;
          lse_ptr[i] = 0;
          if (ent_ptr) ent_ptr[i] = 0;
          continue;
        }
        const scalar_t* row = base + row_offset(i);
        const RowResult r = row_logsumexp<scalar_t>(row, V, scale, with_entropy, buffer);
        lse_ptr[i] = static_cast<out_t>(r.logsumexp);
        if (ent_ptr) ent_ptr[i] = static_cast<out_t>(r.entropy);
        // An out-of-range label (only reachable when the Python check was skipped, e.g. under
        // torch.compile) is never read: its log-prob is NaN.
        lp_ptr[i] = (label >= 0 && label < V)
                        ? static_cast<out_t>(to_double(row[label]) * scale - r.logsumexp)
                        : std::numeric_limits<out_t>::quiet_NaN();
      }
    });
  });
  return {logprobs, entropy, logsumexp};
}

// Gradient of one row: d/dx_j [a * logp_label + b * H] with a, b the incoming gradients:
//   scale * (a * [j == label] - p_j * (a + b * (logp_j + H)))
template <typename scalar_t>
void row_backward(const scalar_t* row, scalar_t* out, int64_t V, int64_t label,
                  double exact_scale, double lse, double entropy, double a, double b, float* in_buffer,
                  float* out_buffer) {
  const float scale = static_cast<float>(exact_scale);
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const float* x = chunk_as_float(row + start, n, in_buffer);
    float* g = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out + start) : out_buffer;
    chunk_softmax_grad(x, g, n, scale, static_cast<float>(lse), static_cast<float>(a + b * entropy),
                       static_cast<float>(b));
    if (label >= start && label < start + n) g[label - start] += static_cast<float>(scale * a);
    if constexpr (!std::is_same_v<scalar_t, float>) from_float(out_buffer, out + start, n);
  }
}

template <>
void row_backward<double>(const double* row, double* out, int64_t V, int64_t label, double scale,
                          double lse, double entropy, double a, double b, float*, float*) {
  for (int64_t j = 0; j < V; ++j) {
    const double logp = row[j] * scale - lse;
    const double p = std::exp(logp);
    out[j] = p > 0.0 ? -scale * p * (a + b * (logp + entropy)) : 0.0;
  }
  out[label] += scale * a;
}

// The logits gradient is the one N x V buffer of the op, and it is written once, right after a
// fresh allocation: on Linux most of that write is spent faulting in 4 KiB pages. Asking for
// transparent huge pages on the buffer (where the system allows them on request) cuts the
// number of faults 512-fold. Advice only: nothing changes if it is refused.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// Writes the logits gradient into `grad`, a tensor of the logits' shape with vocabulary stride
// 1 and any leading strides; it may be `logits` itself (the in-place backward): row_backward
// reads each chunk of a row before it writes that chunk.
void backward_into(const at::Tensor& grad,
                   const std::optional<at::Tensor>& grad_logprobs,
                   const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                   const at::Tensor& labels_in, const at::Tensor& logsumexp_in,
                   const at::Tensor& entropy_in, double temperature, int64_t ignore_index) {
  const int64_t V = logits.size(-1);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t N = labels.numel();
  if (N == 0) return;
  const auto as_double = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
  const at::Tensor lse = as_double(logsumexp_in);
  const at::Tensor g_lp = grad_logprobs ? as_double(*grad_logprobs) : at::Tensor();
  const at::Tensor g_ent = grad_entropy ? as_double(*grad_entropy) : at::Tensor();
  const at::Tensor ent = grad_entropy ? as_double(entropy_in) : at::Tensor();

  const RowOffsets row_offset(logits);
  const RowOffsets out_offset(grad);
  const double scale = 1.0 / temperature;
  constexpr const char* op = "token_logprobs_backward";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), op, [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    scalar_t* out_base = grad.mutable_data_ptr<scalar_t>();
    const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
    const double* lse_ptr = lse.const_data_ptr<double>();
    const double* g_lp_ptr = g_lp.defined() ? g_lp.const_data_ptr<double>() : nullptr;
    const double* g_ent_ptr = g_ent.defined() ? g_ent.const_data_ptr<double>() : nullptr;
    const double* ent_ptr = ent.defined() ? ent.const_data_ptr<double>() : nullptr;
    at::parallel_for(0, N, rows_per_task(V, grain::kLogprobs), [&](int64_t begin, int64_t end) {
      float in_buffer[kChunk];
      float out_buffer[kChunk];
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* out = out_base + out_offset(i);
        const int64_t label = label_ptr[i];
        if (label == ignore_index) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        const double lse_i = lse_ptr[i];
        if (!std::isfinite(lse_i) || label < 0 || label >= V) {
          std::fill(out, out + V, std::numeric_limits<scalar_t>::quiet_NaN());
          continue;
        }
        const double a = g_lp_ptr ? g_lp_ptr[i] : 0.0;
        const double b = g_ent_ptr ? g_ent_ptr[i] : 0.0;
        const double h = ent_ptr ? ent_ptr[i] : 0.0;
        row_backward<scalar_t>(base + row_offset(i), out, V, label, scale, lse_i, h, a, b,
                               in_buffer, out_buffer);
      }
    });
  });
}

at::Tensor token_logprobs_backward_cpu(const std::optional<at::Tensor>& grad_logprobs,
                                       const std::optional<at::Tensor>& grad_entropy,
                                       const at::Tensor& logits_in, const at::Tensor& labels,
                                       const at::Tensor& logsumexp, const at::Tensor& entropy,
                                       double temperature, int64_t ignore_index) {
  constexpr const char* op = "token_logprobs_backward";
  logprobs_checks::check_backward_args(op, grad_logprobs, grad_entropy, logits_in, labels,
                                       logsumexp, entropy, temperature, at::kCPU);
  const at::Tensor logits = logits_in.stride(-1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options().memory_format(
                                                         at::MemoryFormat::Contiguous));
  advise_huge_pages(grad_logits);
  backward_into(grad_logits, grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy,
                temperature, ignore_index);
  return grad_logits;
}

// The in-place backward: the gradient replaces the logits, written through their own strides,
// so nothing of size N x V is allocated. Logits whose vocabulary stride is not 1 are worked
// on in a contiguous copy that is then copied back.
void token_logprobs_inplace_backward_cpu(const std::optional<at::Tensor>& grad_logprobs,
                                         const std::optional<at::Tensor>& grad_entropy,
                                         at::Tensor& logits, const at::Tensor& labels,
                                         const at::Tensor& logsumexp, const at::Tensor& entropy,
                                         double temperature, int64_t ignore_index) {
  constexpr const char* op = "token_logprobs_inplace_backward";
  logprobs_checks::check_backward_args(op, grad_logprobs, grad_entropy, logits, labels,
                                       logsumexp, entropy, temperature, at::kCPU);
  TORCH_CHECK_VALUE(at::has_internal_overlap(logits) != at::MemOverlap::Yes,
                    "rlengine.token_logprobs: an in-place backward needs logits whose elements ",
                    "do not share memory (not an expand()ed tensor)");
  if (logits.stride(-1) == 1) {
    backward_into(logits, grad_logprobs, grad_entropy, logits, labels, logsumexp, entropy,
                  temperature, ignore_index);
    return;
  }
  at::Tensor copy = logits.contiguous();
  backward_into(copy, grad_logprobs, grad_entropy, copy, labels, logsumexp, entropy,
                temperature, ignore_index);
  logits.copy_(copy);
}

// Autograd's version counter of the logits is bumped at the ADInplaceOrView key, where ATen's
// own in-place ops bump theirs (and torch.library.custom_op's mutable ops): before the backend
// kernel, on every device. A tensor saved for some other backward node that runs later then
// raises torch's "modified by an inplace operation" error instead of reading the gradient.
void bump_logits_version(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                         torch::jit::Stack* stack) {
  constexpr size_t kArguments = 8, kLogits = 2;  // the op's schema: logits is argument 2 of 8
  const at::Tensor& logits = (*stack)[stack->size() - kArguments + kLogits].toTensor();
  if (!logits.is_inference()) logits.unsafeGetTensorImpl()->bump_version();
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
  m.impl("token_logprobs_inplace_backward", &token_logprobs_inplace_backward_cpu);
}

TORCH_LIBRARY_IMPL(rlengine, ADInplaceOrView, m) {
  m.impl("token_logprobs_inplace_backward",
         torch::CppFunction::makeFromBoxedFunction<&bump_logits_version>());
}

}  // namespace rlengine::cpu
