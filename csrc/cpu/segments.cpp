// CPU kernels of the segment-reward ops (METHODS.md section 3): entropy_segments,
// segment_reduce (+ backward) and segment_rewards_to_dense (+ backward).
//
// Every op works one row at a time, rows in parallel. Per-segment state (sums, lengths, end
// positions, the per-segment token reward) lives in a scratch buffer of at most max(counts)
// elements per task, so no call allocates anything of size B x T besides its output.
//
// segment_ids and counts decide which memory is read and written, so they are validated here,
// whatever the Python wrapper checked: every counts[b] against its bound before the rows are
// processed (an O(B) pass), every segment id inside the pass that uses it. Segment ids are
// labels, not required to be non-decreasing along a row: any id in [-1, counts[b]) is valid,
// a segment's tokens need not be adjacent, and a segment's "last token" is its highest
// position. (entropy_segments always produces non-decreasing ids; nothing here relies on it.)
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/segments_checks.h"

namespace rlengine::cpu {
namespace {

// sigma(p) of the location-aware normalizer is floored at this value; it must equal
// rlengine.ops.reference.SIGMA_FLOOR (the tests compare the two on a normalizer that crosses it).
constexpr double kSigmaFloor = 1e-3;

// Scratch buffers of one parallel task, sized once by the largest count of the call.
struct Scratch {
  std::vector<double> values;
  std::vector<int64_t> indices;
  Scratch(int64_t max_count, bool want_values, bool want_indices)
      : values(want_values ? static_cast<size_t>(max_count) : 0),
        indices(want_indices ? static_cast<size_t>(max_count) : 0) {}
};

// ---- validation of the data that indexes memory -------------------------------------------

[[noreturn]] C10_NOINLINE void fail_segment_id(const char* op, int64_t b, int64_t t, int64_t id,
                                               int64_t count) {
  TORCH_CHECK_VALUE(false, "rlengine.", op, ": segment_ids[", b, ", ", t, "] = ", id,
                    " is out of range: a segment id must be -1 (no segment) or lie in "
                    "[0, counts[", b, "]) = [0, ", count, ")");
  std::abort();  // unreachable: TORCH_CHECK_VALUE(false, ...) always throws
}

// -1 <= id < count, in one unsigned comparison (id = -1 wraps to 0, any other negative id to a
// huge value); the failure path is out of line so the hot loops stay small.
inline void check_segment_id(const char* op, int64_t b, int64_t t, int64_t id, int64_t count) {
  if (C10_UNLIKELY(static_cast<uint64_t>(id) + 1 > static_cast<uint64_t>(count))) {
    fail_segment_id(op, b, t, id, count);
  }
}

// Checks 0 <= counts[b] <= T (a row has at most one segment per position) and, when
// max_segments >= 0, counts[b] <= max_segments (the columns of segment_rewards). Returns the
// largest count, which sizes the per-task scratch.
int64_t check_counts(const char* op, const at::Tensor& counts, int64_t T, int64_t max_segments) {
  const Rows<int64_t> c(counts);
  int64_t largest = 0;
  for (int64_t b = 0; b < counts.size(0); ++b) {
    const int64_t k = c.at(b);
    TORCH_CHECK_VALUE(k >= 0 && k <= T, "rlengine.", op, ": counts[", b, "] = ", k,
                      " is out of range: a row of T = ", T, " positions has between 0 and ", T,
                      " segments");
    TORCH_CHECK_VALUE(max_segments < 0 || k <= max_segments, "rlengine.", op, ": counts[", b,
                      "] = ", k, " exceeds segment_rewards.shape[1] = ", max_segments,
                      " (one reward column per segment)");
    largest = std::max(largest, k);
  }
  return largest;
}

// ---- entropy_segments ------------------------------------------------------------------------

// A float e satisfies (double)e > threshold iff e > threshold rounded down to a float: no float
// lies strictly between the two. Comparing in float keeps the hot loop in one precision, for
// every entropy dtype (bfloat16 and float16 convert to float exactly).
float float_threshold_below(double threshold) {
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  }
  return t;
}

template <typename scalar_t>
struct AboveThreshold {
  using threshold_t = compute_t<scalar_t>;
  threshold_t threshold;
  explicit AboveThreshold(double exact)
      : threshold(std::is_same_v<scalar_t, double> ? exact : float_threshold_below(exact)) {}
  // NaN compares false: it never ends a segment.
  bool operator()(scalar_t e) const { return static_cast<threshold_t>(e) > threshold; }
};

// Writes one row's segment ids and returns its number of segments. Branch-free over the mask,
// so that masks with holes cost no mispredictions.
template <typename scalar_t>
int64_t segment_row(Row<scalar_t> entropy, Row<bool> mask, int64_t T,
                    AboveThreshold<scalar_t> ends, int64_t* __restrict ids) {
  int64_t last = T - 1;  // the last response position always ends the last segment
  while (last >= 0 && !mask[last]) ids[last--] = -1;
  if (last < 0) return 0;
  int64_t k = 0;
  for (int64_t t = 0; t < last; ++t) {
    const bool in = mask[t];
    ids[t] = in ? k : -1;
    k += static_cast<int64_t>(in & ends(entropy[t]));
  }
  ids[last] = k;
  return k + 1;
}

std::tuple<at::Tensor, at::Tensor> entropy_segments_cpu(const at::Tensor& entropy,
                                                        const at::Tensor& response_mask,
                                                        double threshold) {
  constexpr const char* op = "entropy_segments";
  check_cpu(op, "entropy", entropy);
  check_cpu(op, "response_mask", response_mask);
  check_floating(op, "entropy", entropy);
  check_dim(op, "entropy", entropy, 2);
  check_bool(op, "response_mask", response_mask);
  check_shape(op, "response_mask", response_mask, entropy.sizes());
  TORCH_CHECK_VALUE(std::isfinite(threshold), "rlengine.entropy_segments: threshold must be ",
                    "finite, got ", threshold);
  const int64_t B = entropy.size(0), T = entropy.size(1);
  const auto index_options = entropy.options().dtype(at::kLong);
  at::Tensor segment_ids = at::empty({B, T}, index_options);
  at::Tensor counts = at::empty({B}, index_options);
  if (B == 0) return {segment_ids, counts};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, entropy.scalar_type(), op, [&] {
    const AboveThreshold<scalar_t> ends(threshold);
    const Rows<scalar_t> ent(entropy);
    const Rows<bool> mask(response_mask);
    int64_t* ids = segment_ids.mutable_data_ptr<int64_t>();
    int64_t* count = counts.mutable_data_ptr<int64_t>();
    at::parallel_for(0, B, rows_per_task(T, grain::kSegments), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        count[b] = segment_row<scalar_t>(ent[b], mask[b], T, ends, ids + b * T);
      }
    });
  });
  return {segment_ids, counts};
}

// ---- per-segment passes shared by the reductions -----------------------------------------------

// The row context of the id checks: the op (for the message), the row and its count.
struct RowIds {
  Row<int64_t> ids;
  const char* op;
  int64_t b;
  int64_t count;

  // The id at t, validated: -1 or in [0, count).
  int64_t operator[](int64_t t) const {
    const int64_t id = ids[t];
    check_segment_id(op, b, t, id, count);
    return id;
  }
  int64_t unchecked(int64_t t) const { return ids[t]; }  // for a second pass over checked ids
};

// length[k] = number of positions t with id k and take(t), for k < count. Runs of one id (a
// contiguous segment) are counted in a register and added once: an increment through memory
// per token would chain all of a segment's tokens through store-to-load forwarding.
template <typename Take>
void count_per_segment(RowIds ids, int64_t T, Take take, int64_t* __restrict length) {
  std::fill(length, length + ids.count, int64_t{0});
  int64_t run_id = -1, run_length = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids[t];
    if (id < 0 || !take(t)) continue;
    if (id != run_id) {
      if (run_id >= 0) length[run_id] += run_length;
      run_id = id;
      run_length = 0;
    }
    ++run_length;
  }
  if (run_id >= 0) length[run_id] += run_length;
}

// last[k] = the highest position t with id k and take(t), -1 if none, for k < count.
template <typename Take>
void last_per_segment(RowIds ids, int64_t T, Take take, int64_t* __restrict last) {
  std::fill(last, last + ids.count, int64_t{-1});
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids[t];
    if (id >= 0 && take(t)) last[id] = t;
  }
}

// total[k] = sum of the values at the positions t with id k and take(t) (in double), and
// length[k] their number if length is given; run-length accumulated like count_per_segment.
template <typename scalar_t, typename Take>
void sum_per_segment(RowIds ids, Row<scalar_t> values, int64_t T, Take take,
                     double* __restrict total, int64_t* __restrict length) {
  std::fill(total, total + ids.count, 0.0);
  if (length) std::fill(length, length + ids.count, int64_t{0});
  int64_t run_id = -1, run_length = 0;
  double run_sum = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t id = ids[t];
    if (id < 0 || !take(t)) continue;
    if (id != run_id) {
      if (run_id >= 0) {
        total[run_id] += run_sum;
        if (length) length[run_id] += run_length;
      }
      run_id = id;
      run_sum = 0.0;
      run_length = 0;
    }
    run_sum += static_cast<double>(values[t]);
    ++run_length;
  }
  if (run_id >= 0) {
    total[run_id] += run_sum;
    if (length) length[run_id] += run_length;
  }
}

constexpr auto kEveryPosition = [](int64_t) { return true; };

// ---- segment_reduce ----------------------------------------------------------------------------

template <typename scalar_t, typename out_t>
void segment_reduce_row(SegmentReduction reduce, RowIds ids, Row<scalar_t> values, int64_t T,
                        double* __restrict total, int64_t* __restrict length,
                        out_t* __restrict out) {
  const int64_t K = ids.count;
  switch (reduce) {
    case SegmentReduction::kEndMean: {
      // Last write wins: total[k] ends as the value at segment k's highest position.
      std::fill(total, total + K, 0.0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t id = ids[t];
        if (id >= 0) total[id] = static_cast<double>(values[t]);
      }
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) sum += total[k];
      *out = static_cast<out_t>(sum / static_cast<double>(std::max<int64_t>(K, 1)));
      return;
    }
    case SegmentReduction::kEnd: {
      std::fill(out, out + T, out_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const int64_t id = ids[t];
        if (id >= 0) out[id] = static_cast<out_t>(values[t]);
      }
      return;
    }
    case SegmentReduction::kSum:
    case SegmentReduction::kMean: {
      const bool mean = reduce == SegmentReduction::kMean;
      sum_per_segment(ids, values, T, kEveryPosition, total, mean ? length : nullptr);
      for (int64_t k = 0; k < K; ++k) {
        out[k] = static_cast<out_t>(
            mean ? total[k] / static_cast<double>(std::max<int64_t>(length[k], 1)) : total[k]);
      }
      std::fill(out + K, out + T, out_t(0));
      return;
    }
  }
}

at::Tensor segment_reduce_cpu(const at::Tensor& values, const at::Tensor& segment_ids,
                              const at::Tensor& counts, std::string_view reduce_name) {
  constexpr const char* op = "segment_reduce";
  const SegmentReduction reduce = segments_checks::parse_reduce(op, reduce_name);
  check_cpu(op, "values", values);
  check_floating(op, "values", values);
  check_dim(op, "values", values, 2);
  const int64_t B = values.size(0), T = values.size(1);
  segments_checks::check_segment_tensors(op, segment_ids, counts, B, T, at::kCPU);
  const auto out_options = values.options().dtype(result_dtype(values));
  at::Tensor out = reduce == SegmentReduction::kEndMean ? at::empty({B}, out_options)
                                              : at::empty({B, T}, out_options);
  if (B == 0) return out;
  const int64_t max_count = check_counts(op, counts, T, -1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), op, [&] {
    using out_t = compute_t<scalar_t>;
    const Rows<scalar_t> v(values);
    const Rows<int64_t> ids(segment_ids);
    const Rows<int64_t> count(counts);
    out_t* out_base = out.mutable_data_ptr<out_t>();
    const int64_t out_row = reduce == SegmentReduction::kEndMean ? 1 : T;
    at::parallel_for(0, B, rows_per_task(T, grain::kSegments), [&](int64_t begin, int64_t end) {
      Scratch scratch(max_count, reduce != SegmentReduction::kEnd,
                      reduce == SegmentReduction::kMean);
      for (int64_t b = begin; b < end; ++b) {
        segment_reduce_row<scalar_t, out_t>(reduce, RowIds{ids[b], op, b, count.at(b)}, v[b], T,
                                            scratch.values.data(), scratch.indices.data(),
                                            out_base + b * out_row);
      }
    });
  });
  return out;
}

// The incoming gradient in the kernels' working precision (a no-op for the gradients autograd
// passes, which have the forward output's dtype).
at::Tensor gradient_as(const at::Tensor& grad, at::ScalarType dtype) {
  const at::ScalarType working = dtype == at::kDouble ? at::kDouble : at::kFloat;
  return grad.scalar_type() == working ? grad : grad.to(working);
}

template <typename scalar_t, typename acc_t>
void segment_reduce_backward_row(SegmentReduction reduce, RowIds ids, Row<acc_t> grad, int64_t T,
                                 int64_t* __restrict per_segment, scalar_t* __restrict out) {
  const int64_t K = ids.count;
  switch (reduce) {
    case SegmentReduction::kSum: {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t id = ids[t];
        out[t] = id >= 0 ? static_cast<scalar_t>(grad[id]) : scalar_t(0);
      }
      return;
    }
    case SegmentReduction::kMean: {
      count_per_segment(ids, T, kEveryPosition, per_segment);
      for (int64_t t = 0; t < T; ++t) {  // ids checked above; every length here is >= 1
        const int64_t id = ids.unchecked(t);
        out[t] = id >= 0 ? static_cast<scalar_t>(static_cast<double>(grad[id]) /
                                                 static_cast<double>(per_segment[id]))
                         : scalar_t(0);
      }
      return;
    }
    case SegmentReduction::kEnd:
    case SegmentReduction::kEndMean: {
      last_per_segment(ids, T, kEveryPosition, per_segment);
      std::fill(out, out + T, scalar_t(0));
      // grad of "end_mean" is a [B] tensor: its Row has the element of row b at [0].
      const double share = reduce == SegmentReduction::kEndMean
                               ? static_cast<double>(grad[0]) /
                                     static_cast<double>(std::max<int64_t>(K, 1))
                               : 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t position = per_segment[k];
        if (position < 0) continue;  // a segment without tokens
        out[position] =
            static_cast<scalar_t>(reduce == SegmentReduction::kEndMean ? share : double(grad[k]));
      }
      return;
    }
  }
}

at::Tensor segment_reduce_backward_cpu(const at::Tensor& grad_in, const at::Tensor& segment_ids,
                                       const at::Tensor& counts, std::string_view reduce_name,
                                       at::ScalarType dtype) {
  constexpr const char* op = "segment_reduce_backward";
  const SegmentReduction reduce = segments_checks::parse_reduce(op, reduce_name);
  check_cpu(op, "grad", grad_in);
  check_floating(op, "grad", grad_in);
  check_floating(op, "dtype", dtype);
  check_dim(op, "segment_ids", segment_ids, 2);
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  segments_checks::check_segment_tensors(op, segment_ids, counts, B, T, at::kCPU);
  if (reduce == SegmentReduction::kEndMean) {
    check_shape(op, "grad", grad_in, {B});
  } else {
    check_shape(op, "grad", grad_in, {B, T});
  }
  at::Tensor grad_values = at::empty({B, T}, segment_ids.options().dtype(dtype));
  if (B == 0) return grad_values;
  const int64_t max_count = check_counts(op, counts, T, -1);
  const at::Tensor grad = gradient_as(grad_in, dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    using acc_t = compute_t<scalar_t>;
    const Rows<acc_t> g(grad);
    const Rows<int64_t> ids(segment_ids);
    const Rows<int64_t> count(counts);
    scalar_t* out_base = grad_values.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_per_task(T, grain::kSegments), [&](int64_t begin, int64_t end) {
      Scratch scratch(max_count, false, reduce != SegmentReduction::kSum);
      for (int64_t b = begin; b < end; ++b) {
        segment_reduce_backward_row<scalar_t, acc_t>(reduce, RowIds{ids[b], op, b, count.at(b)},
                                                     g[b], T, scratch.indices.data(),
                                                     out_base + b * T);
      }
    });
  });
  return grad_values;
}

// ---- segment_rewards_to_dense ----------------------------------------------------------------

// Everything that turns a segment's reward into its tokens' reward; shared by the forward and
// the backward so that both see the same normalized, spread and clamped value.
// The shared parameters (segment_rules.h) plus a table of logs; clamp = inf is no clamp (NaN
// rewards keep their gradient).
struct DenseRule : DenseRuleParams {
  std::vector<double> log_of;  // log_of[j] = log(j) for 1 <= j <= max count

  struct TokenReward {
    double value;  // the reward of each receiving token of the segment
    double slope;  // d value / d segment_rewards[b, k]; 0 where the clamp is active
  };

  // Segment k of a row with K segments (location p = (k + 1) / K) whose tokens number
  // `receivers` (used by the even spread). The arithmetic follows reference.py in float64.
  TokenReward operator()(double r, int64_t k, int64_t K, int64_t receivers) const {
    double slope = 1.0;
    if (normalize) {
      // log p from a table of log(j): one subtraction per segment instead of one log.
      const double log_p = log_of[k + 1] - log_of[K];
      const double mu = a_mu * log_p + b_mu;
      const double sigma = std::max(a_sigma * log_p + b_sigma, kSigmaFloor);
      r = (r - mu) / sigma;
      slope = 1.0 / sigma;
    }
    if (spread == SegmentSpread::kEven) {
      const double n = static_cast<double>(std::max<int64_t>(receivers, 1));
      r /= n;
      slope /= n;
    }
    if (clamped) {
      // torch.clamp: NaN stays NaN; the gradient passes where -clamp <= r <= clamp.
      if (!(r >= -clamp && r <= clamp)) slope = 0.0;
      r = r < -clamp ? -clamp : (r > clamp ? clamp : r);
    }
    return {r, slope};
  }
};

DenseRule make_dense_rule(const char* op, std::optional<at::ArrayRef<double>> normalizer,
                          std::string_view spread, double clamp, int64_t max_count) {
  DenseRule rule;
  static_cast<DenseRuleParams&>(rule) =
      segments_checks::dense_rule_params(op, normalizer, spread, clamp);
  if (rule.normalize) {
    rule.log_of.resize(static_cast<size_t>(max_count) + 1, 0.0);
    for (int64_t j = 1; j <= max_count; ++j) rule.log_of[j] = std::log(static_cast<double>(j));
  }
  return rule;
}

template <typename scalar_t, typename out_t>
void dense_row(const DenseRule& rule, RowIds ids, Row<bool> receives, Row<scalar_t> rewards,
               int64_t T, double* __restrict token_reward, int64_t* __restrict per_segment,
               out_t* __restrict out) {
  const int64_t K = ids.count;
  const auto take = [receives](int64_t t) { return receives[t]; };
  switch (rule.spread) {
    case SegmentSpread::kRepeat:
    case SegmentSpread::kEven: {
      if (rule.spread == SegmentSpread::kEven) {
        count_per_segment(ids, T, take, per_segment);
        for (int64_t k = 0; k < K; ++k) {
          token_reward[k] = rule(static_cast<double>(rewards[k]), k, K, per_segment[k]).value;
        }
      } else {
        for (int64_t k = 0; k < K; ++k) {
          token_reward[k] = rule(static_cast<double>(rewards[k]), k, K, 1).value;
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        // "repeat" validates its ids here; "even" did in count_per_segment.
        const int64_t id = rule.spread == SegmentSpread::kEven ? ids.unchecked(t) : ids[t];
        out[t] = (id >= 0 && receives[t]) ? static_cast<out_t>(token_reward[id]) : out_t(0);
      }
      return;
    }
    case SegmentSpread::kEnd: {
      last_per_segment(ids, T, take, per_segment);
      std::fill(out, out + T, out_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t position = per_segment[k];
        if (position >= 0) {
          out[position] =
              static_cast<out_t>(rule(static_cast<double>(rewards[k]), k, K, 1).value);
        }
      }
      return;
    }
  }
}

at::Tensor segment_rewards_to_dense_cpu(const at::Tensor& segment_rewards,
                                        const at::Tensor& segment_ids, const at::Tensor& counts,
                                        const at::Tensor& mask,
                                        std::optional<at::ArrayRef<double>> normalizer,
                                        std::string_view spread, double clamp) {
  constexpr const char* op = "segment_rewards_to_dense";
  segments_checks::check_dense_inputs(op, segment_rewards, segment_ids, counts, mask, at::kCPU);
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  const int64_t max_segments = segment_rewards.size(1);
  at::Tensor dense =
      at::empty({B, T}, segment_rewards.options().dtype(result_dtype(segment_rewards)));
  const int64_t max_count = B == 0 ? 0 : check_counts(op, counts, T, max_segments);
  const DenseRule rule = make_dense_rule(op, normalizer, spread, clamp, max_count);
  if (B == 0) return dense;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, segment_rewards.scalar_type(), op,
                                  [&] {
    using out_t = compute_t<scalar_t>;
    const Rows<scalar_t> rewards(segment_rewards);
    const Rows<int64_t> ids(segment_ids);
    const Rows<int64_t> count(counts);
    const Rows<bool> receives(mask);
    out_t* out_base = dense.mutable_data_ptr<out_t>();
    at::parallel_for(0, B, rows_per_task(T, grain::kSegments), [&](int64_t begin, int64_t end) {
      Scratch scratch(max_count, rule.spread != SegmentSpread::kEnd,
                      rule.spread != SegmentSpread::kRepeat);
      for (int64_t b = begin; b < end; ++b) {
        dense_row<scalar_t, out_t>(rule, RowIds{ids[b], op, b, count.at(b)}, receives[b],
                                   rewards[b], T, scratch.values.data(), scratch.indices.data(),
                                   out_base + b * T);
      }
    });
  });
  return dense;
}

template <typename scalar_t, typename acc_t>
void dense_backward_row(const DenseRule& rule, RowIds ids, Row<bool> receives,
                        Row<scalar_t> rewards, Row<acc_t> grad, int64_t T, int64_t max_segments,
                        double* __restrict grad_sum, int64_t* __restrict per_segment,
                        scalar_t* __restrict out) {
  const int64_t K = ids.count;
  const auto take = [receives](int64_t t) { return receives[t]; };
  if (rule.spread == SegmentSpread::kEnd) {
    last_per_segment(ids, T, take, per_segment);
    for (int64_t k = 0; k < K; ++k) {
      grad_sum[k] = per_segment[k] >= 0 ? static_cast<double>(grad[per_segment[k]]) : 0.0;
    }
  } else {
    // The receiving tokens' gradients summed per segment (and counted, for "even").
    sum_per_segment(ids, grad, T, take, grad_sum,
                    rule.spread == SegmentSpread::kEven ? per_segment : nullptr);
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t receivers = rule.spread == SegmentSpread::kEven ? per_segment[k] : 1;
    const double slope = rule(static_cast<double>(rewards[k]), k, K, receivers).slope;
    // A clamped segment gets exactly 0, even if its tokens' gradients are not finite.
    out[k] = static_cast<scalar_t>(slope == 0.0 ? 0.0 : grad_sum[k] * slope);
  }
  std::fill(out + K, out + max_segments, scalar_t(0));
}

at::Tensor segment_rewards_to_dense_backward_cpu(
    const at::Tensor& grad_rewards_in, const at::Tensor& segment_rewards,
    const at::Tensor& segment_ids, const at::Tensor& counts, const at::Tensor& mask,
    std::optional<at::ArrayRef<double>> normalizer, std::string_view spread, double clamp) {
  constexpr const char* op = "segment_rewards_to_dense_backward";
  segments_checks::check_dense_inputs(op, segment_rewards, segment_ids, counts, mask, at::kCPU);
  check_cpu(op, "grad_rewards", grad_rewards_in);
  check_floating(op, "grad_rewards", grad_rewards_in);
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  check_shape(op, "grad_rewards", grad_rewards_in, {B, T});
  const int64_t max_segments = segment_rewards.size(1);
  at::Tensor grad_segment = at::empty(segment_rewards.sizes(), segment_rewards.options());
  const int64_t max_count = B == 0 ? 0 : check_counts(op, counts, T, max_segments);
  const DenseRule rule = make_dense_rule(op, normalizer, spread, clamp, max_count);
  if (B == 0) return grad_segment;
  const at::Tensor grad_rewards = gradient_as(grad_rewards_in, segment_rewards.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, segment_rewards.scalar_type(), op,
                                  [&] {
    using acc_t = compute_t<scalar_t>;
    const Rows<scalar_t> rewards(segment_rewards);
    const Rows<acc_t> g(grad_rewards);
    const Rows<int64_t> ids(segment_ids);
    const Rows<int64_t> count(counts);
    const Rows<bool> receives(mask);
    scalar_t* out_base = grad_segment.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_per_task(T, grain::kSegments), [&](int64_t begin, int64_t end) {
      Scratch scratch(max_count, true, rule.spread != SegmentSpread::kRepeat);
      for (int64_t b = begin; b < end; ++b) {
        dense_backward_row<scalar_t, acc_t>(rule, RowIds{ids[b], op, b, count.at(b)},
                                            receives[b], rewards[b], g[b], T, max_segments,
                                            scratch.values.data(), scratch.indices.data(),
                                            out_base + b * max_segments);
      }
    });
  });
  return grad_segment;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CPU, m) {
  m.impl("entropy_segments", &entropy_segments_cpu);
  m.impl("segment_reduce", &segment_reduce_cpu);
  m.impl("segment_reduce_backward", &segment_reduce_backward_cpu);
  m.impl("segment_rewards_to_dense", &segment_rewards_to_dense_cpu);
  m.impl("segment_rewards_to_dense_backward", &segment_rewards_to_dense_backward_cpu);
}

}  // namespace rlengine::cpu
