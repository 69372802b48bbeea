// The segment ops' options that both backends share, parsed once (cpu/segments_checks.h) and
// handed to either the CPU kernels or the CUDA launchers. Plain C++ without torch: nvcc compiles
// the CUDA kernels against it.
#pragma once

namespace rlengine {

// segment_reduce's `reduce`: the mean of the segment-end values ([B]), or per segment its end
// value, sum or mean ([B, Kmax]).
enum class SegmentReduction : int { kEndMean, kEnd, kSum, kMean };

// segment_rewards_to_dense's `spread`: each receiving token gets the segment reward / its
// receiving tokens, all of it, or only the segment's end token gets it.
enum class SegmentSpread : int { kEven, kRepeat, kEnd };

// What turns a segment's reward into its tokens' reward: the location-aware normalizer
// (mu(p) = a_mu log p + b_mu, sigma(p) = a_sigma log p + b_sigma), the spread and the clamp.
struct DenseRuleParams {
  SegmentSpread spread = SegmentSpread::kEven;
  bool normalize = false;
  double a_mu = 0.0, b_mu = 0.0, a_sigma = 0.0, b_sigma = 0.0;
  bool clamped = false;  // clamp = inf is no clamp
  double clamp = 0.0;
};

}  // namespace rlengine
