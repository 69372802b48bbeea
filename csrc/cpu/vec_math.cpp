#include "cpu/vec_math.h"

#include <algorithm>

namespace rlengine::cpu {

RLENGINE_SIMD_CLONES void to_float(const c10::BFloat16* in, float* out, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(in);
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) out[i] = bits_to_float(static_cast<uint32_t>(bits[i]) << 16);
}

RLENGINE_SIMD_CLONES void to_float(const c10::Half* in, float* out, int64_t n) {
  // _Float16 lets GCC use the F16C conversion instructions where the clone has them.
  const _Float16* h = reinterpret_cast<const _Float16*>(in);
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(h[i]);
}

RLENGINE_SIMD_CLONES void from_float(const float* in, c10::BFloat16* out, int64_t n) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(out);
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = float_to_bits(in[i]);
    // Round to nearest even; NaN stays a quiet NaN instead of rounding into infinity.
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bits[i] = static_cast<uint16_t>(in[i] != in[i] ? 0x7FC0u : rounded);
  }
}

RLENGINE_SIMD_CLONES void from_float(const float* in, c10::Half* out, int64_t n) {
  _Float16* h = reinterpret_cast<_Float16*>(out);
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) h[i] = static_cast<_Float16>(in[i]);
}

// A plain loop, not `omp simd`: GCC sizes an omp simd reduction by its narrowest type (the mask
// byte) before target_clones widens the vectors, which caps it at 16-byte vectors in the AVX-512
// clone; integer additions need no permission to be reordered. The count is kept in 32-bit lanes
// over blocks short enough not to overflow them.
RLENGINE_SIMD_CLONES int64_t count_nonzero(const uint8_t* m, int64_t n) {
  constexpr int64_t kBlock = int64_t{1} << 30;
  int64_t total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = start + std::min(kBlock, n - start);
    int32_t count = 0;
    for (int64_t i = start; i < end; ++i) count += m[i] != 0;
    total += count;
  }
  return total;
}

RLENGINE_SIMD_CLONES ChunkMax chunk_max(const float* x, int64_t n) {
  float m = kNegInf;
  int nan_count = 0;
  RLENGINE_PRAGMA(omp simd reduction(max : m) reduction(+ : nan_count))
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    m = v > m ? v : m;  // NaN compares false, so it never becomes the maximum
    nan_count += v != v;
  }
  return {m, nan_count != 0};
}

// Terms below exp(kExpUnderflow) = 4e-38 are summed as that value rather than 0: against the
// row's largest term (exactly 1) they cannot change an fp32 sum, and skipping the exact-zero
// select keeps the hottest loop of the library two instructions shorter.
RLENGINE_SIMD_CLONES ChunkSums chunk_sum_exp(const float* x, int64_t n, float scale, float shift,
                                             bool want_weighted) {
  float sum = 0.0f;
  float weighted = 0.0f;
  if (want_weighted) {
    RLENGINE_SIMD_REDUCE(+ : sum, weighted)
    for (int64_t i = 0; i < n; ++i) {
      float d = x[i] * scale - shift;
      d = d >= kExpUnderflow ? d : kExpUnderflow;  // also keeps 0 * (-inf) out of the sum
      const float e = exp_in_range(d);
      sum += e;
      weighted += e * d;
    }
  } else {
    RLENGINE_SIMD_REDUCE(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const float d = x[i] * scale - shift;
      sum += exp_in_range(d >= kExpUnderflow ? d : kExpUnderflow);
    }
  }
  return {sum, weighted};
}

RLENGINE_SIMD_CLONES void chunk_softmax_grad(const float* x, float* out, int64_t n, float scale,
                                             float lse, float a, float b) {
  RLENGINE_SIMD
  for (int64_t i = 0; i < n; ++i) {
    float logp = x[i] * scale - lse;
    logp = logp >= kExpUnderflow ? logp : kExpUnderflow;  // p is 0 there; avoids 0 * (-inf)
    const float p = exp_nonpositive(logp);
    out[i] = -scale * p * (a + b * logp);
  }
}

}  // namespace rlengine::cpu
