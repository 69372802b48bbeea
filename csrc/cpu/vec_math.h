// Vectorizable float32 math for the CPU kernels.
//
// The hot loops are plain C++ loops over float arrays, written so that GCC vectorizes them
// (`omp simd` reductions, branch-free bodies). They are compiled several times with
// `target_clones` (AVX-512, AVX2+FMA, baseline) and the loader picks the widest the CPU runs,
// so the wheel stays portable while using the machine's vector width: the same idea as ATen's
// CPU_CAPABILITY dispatch, without depending on ATen's private vector headers.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define RLENGINE_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLENGINE_SIMD_CLONES
#endif

// Helpers called from inside target_clones functions must be inlined there, or they run as
// separately compiled baseline code (unvectorized, one call per element).
#define RLENGINE_INLINE inline __attribute__((always_inline))

#define RLENGINE_PRAGMA(x) _Pragma(#x)
#define RLENGINE_SIMD_REDUCE(...) RLENGINE_PRAGMA(omp simd reduction(__VA_ARGS__))
#define RLENGINE_SIMD RLENGINE_PRAGMA(omp simd)

namespace rlengine::cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Below this argument exp() is treated as exactly 0. exp(-86) = 4e-38 is still a normal float;
// against the row's maximum term (exactly 1) anything smaller cannot change an fp32 sum.
constexpr float kExpUnderflow = -86.0f;

RLENGINE_INLINE float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
RLENGINE_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// v where the mask byte m is nonzero, else +0.0, as a bitwise AND with an all-ones or all-zeros
// word. Unlike v * m it drops a masked-out NaN or inf; unlike `m ? v : 0`, which GCC turns into
// a branch or a masked load that it cannot vectorize next to byte masks, it stays a branch-free
// vector op.
RLENGINE_INLINE float keep_or_zero(float v, uint8_t m) {
  return bits_to_float(float_to_bits(v) & (0u - static_cast<uint32_t>(m != 0)));
}
RLENGINE_INLINE double keep_or_zero(double v, uint8_t m) {
  const uint64_t keep = m != 0;
  return __builtin_bit_cast(double, __builtin_bit_cast(uint64_t, v) & (uint64_t{0} - keep));
}

// exp(x) for x in [kExpUnderflow, 0], relative error < 1e-7, branch-free so it vectorizes.
// Range reduction x = n ln2 + r with |r| <= ln2/2 (Cody-Waite, ln2 split in two), a degree-7
// Taylor polynomial for exp(r), and 2^n put straight into the exponent bits (valid because
// x >= kExpUnderflow keeps 2^n a normal float).
RLENGINE_INLINE float exp_in_range(float x) {
  const float round_shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + round_shift;
  const int32_t n = static_cast<int32_t>(float_to_bits(t)) - static_cast<int32_t>(float_to_bits(round_shift));
  const float nf = t - round_shift;
  float r = x - nf * 0.693145751953125f;
  r = r - nf * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return bits_to_float(float_to_bits(p) + (static_cast<uint32_t>(n) << 23));
}

// exp(x) for any x <= 0 (x may be -inf): exactly 0 below kExpUnderflow.
RLENGINE_INLINE float exp_nonpositive(float x) {
  const float keep = x >= kExpUnderflow ? 1.0f : 0.0f;
  return exp_in_range(x >= kExpUnderflow ? x : kExpUnderflow) * keep;
}

// The functions below are defined in vec_math.cpp with RLENGINE_SIMD_CLONES; the declarations
// must not carry the attribute, so that callers go through the resolver of the plain symbol.

// ---- conversions between storage dtypes and fp32 working buffers ---------------------------

void to_float(const c10::BFloat16* in, float* out, int64_t n);
void to_float(const c10::Half* in, float* out, int64_t n);
void from_float(const float* in, c10::BFloat16* out, int64_t n);
void from_float(const float* in, c10::Half* out, int64_t n);

// ---- reductions and maps over one chunk of a row (n elements, contiguous) ------------------

// The number of nonzero bytes among m[0, n) (a bool mask read as bytes), for any n.
int64_t count_nonzero(const uint8_t* m, int64_t n);

struct ChunkMax {
  float max;        // largest element, -inf if none; NaNs are skipped here and reported below
  bool saw_nan;
};
ChunkMax chunk_max(const float* x, int64_t n);

// sum_i exp(x_i * scale - shift), and if want_weighted also sum_i e_i * (x_i * scale - shift).
// Requires x_i * scale <= shift (shift is the running maximum), so every exponent is <= 0.
struct ChunkSums {
  float sum_exp;
  float sum_exp_times_arg;
};
ChunkSums chunk_sum_exp(const float* x, int64_t n, float scale, float shift, bool want_weighted);

// out_i = scale * -p_i * (a + b * (x_i * scale - lse)),  p_i = exp(x_i * scale - lse).
// The gradient of a*logprob + b*entropy w.r.t. the logits, without the label's one-hot term.
void chunk_softmax_grad(const float* x, float* out, int64_t n, float scale, float lse, float a,
                        float b);

}  // namespace rlengine::cpu
