// Argument checks and option parsing of the segment ops that the CPU kernels and the CUDA glue
// share, so that both backends reject the same arguments with the same messages (`device`: see
// check_device). Checks of the segmentation's *values* (ids and counts in range) stay with each
// backend: the CPU kernel validates them as it reads them, the CUDA kernels clamp instead.
#pragma once

#include <cmath>
#include <optional>
#include <string_view>

#include "cpu/common.h"
#include "segment_rules.h"

namespace rlengine::cpu::segments_checks {

inline SegmentReduction parse_reduce(const char* op, std::string_view reduce) {
  if (reduce == "end_mean") return SegmentReduction::kEndMean;
  if (reduce == "end") return SegmentReduction::kEnd;
  if (reduce == "sum") return SegmentReduction::kSum;
  if (reduce == "mean") return SegmentReduction::kMean;
  TORCH_CHECK_VALUE(false, "rlengine.", op, ": reduce must be one of 'end_mean', 'end', 'sum', ",
                    "'mean', got '", reduce, "'");
  return SegmentReduction::kEndMean;  // unreachable
}

inline SegmentSpread parse_spread(const char* op, std::string_view spread) {
  if (spread == "even") return SegmentSpread::kEven;
  if (spread == "repeat") return SegmentSpread::kRepeat;
  if (spread == "end") return SegmentSpread::kEnd;
  TORCH_CHECK_VALUE(false, "rlengine.", op, ": spread must be one of 'even', 'repeat', 'end', ",
                    "got '", spread, "'");
  return SegmentSpread::kEven;  // unreachable
}

// segment_ids [B, T] and counts [B], both int64, on `device`.
inline void check_segment_tensors(const char* op, const at::Tensor& segment_ids,
                                  const at::Tensor& counts, int64_t B, int64_t T,
                                  const at::Device& device) {
  check_device(op, "segment_ids", segment_ids, device);
  check_device(op, "counts", counts, device);
  TORCH_CHECK_TYPE(segment_ids.scalar_type() == at::kLong, "rlengine.", op,
                   ": segment_ids must be int64, got ", segment_ids.scalar_type());
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "rlengine.", op,
                   ": counts must be int64, got ", counts.scalar_type());
  check_shape(op, "segment_ids", segment_ids, {B, T});
  check_shape(op, "counts", counts, {B});
}

inline DenseRuleParams dense_rule_params(const char* op,
                                         std::optional<at::ArrayRef<double>> normalizer,
                                         std::string_view spread, double clamp) {
  DenseRuleParams rule;
  rule.spread = parse_spread(op, spread);
  TORCH_CHECK_VALUE(clamp > 0.0, "rlengine.", op, ": clamp must be > 0 (inf for no clamp), got ",
                    clamp);
  rule.clamped = std::isfinite(clamp);
  rule.clamp = clamp;
  if (normalizer.has_value()) {
    const at::ArrayRef<double> n = *normalizer;
    TORCH_CHECK_VALUE(n.size() == 4, "rlengine.", op, ": normalizer must be (a_mu, b_mu, ",
                      "a_sigma, b_sigma), got ", n.size(), " numbers");
    for (double x : n) {
      TORCH_CHECK_VALUE(std::isfinite(x), "rlengine.", op, ": normalizer must be finite, got ",
                        n);
    }
    rule.normalize = true;
    rule.a_mu = n[0];
    rule.b_mu = n[1];
    rule.a_sigma = n[2];
    rule.b_sigma = n[3];
  }
  return rule;
}

// segment_rewards [B, Kmax] (floating), the segmentation and mask [B, T] (bool), on `device`.
inline void check_dense_inputs(const char* op, const at::Tensor& segment_rewards,
                               const at::Tensor& segment_ids, const at::Tensor& counts,
                               const at::Tensor& mask, const at::Device& device) {
  check_device(op, "segment_rewards", segment_rewards, device);
  check_device(op, "mask", mask, device);
  check_floating(op, "segment_rewards", segment_rewards);
  check_dim(op, "segment_rewards", segment_rewards, 2);
  check_dim(op, "segment_ids", segment_ids, 2);
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  check_segment_tensors(op, segment_ids, counts, B, T, device);
  TORCH_CHECK_VALUE(segment_rewards.size(0) == B, "rlengine.", op,
                    ": segment_rewards must have B = ", B, " rows (segment_ids.shape[0]), got ",
                    segment_rewards.sizes());
  check_bool(op, "mask", mask);
  check_shape(op, "mask", mask, {B, T});
}

}  // namespace rlengine::cpu::segments_checks
