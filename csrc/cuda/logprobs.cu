// CUDA kernels of rlengine::token_logprobs and its backward (semantics: csrc/cpu/logprobs.cpp).
//
// Both are bandwidth-bound streams over the N x V logits, so each is one launch in which a
// block of kThreads threads owns one row at a time (rows handed out by the hardware block
// scheduler, which balances rows across SMs as blocks finish):
//  - forward: one read of the row. Each thread keeps an online logsumexp in fp32 (fp64 for
//    fp64 logits): the largest logit m seen, s = sum exp(z - m') and, for the entropy,
//    w = sum exp(z - m') (z - m') with z = logit / temperature and m' = m / temperature, both
//    rescaled when m grows. This is the CPU kernel's formulation: the entropy log(s) - w / s
//    is formed from differences to the maximum, so it does not cancel the way lse - E[z] does
//    at large logits. The label's logit is read directly, once. Then two block reductions
//    (max, then the rescaled sums) and one thread writes the row's three results.
//  - backward: one read and one write of the row (the softmax comes from the saved logsumexp).
//    The output may be the logits themselves (in-place backward): every element is read and
//    then written by the same thread, from registers, so aliasing is safe.
// Each row is split into a scalar head up to the first 16-byte boundary, a body of 16-byte
// vectors (8 bf16/fp16, 4 fp32, 2 fp64) and a scalar tail, so misaligned rows (logits[:, 1:],
// odd V) are vectorized as well; each thread issues kUnroll vector loads before using them so
// that enough bytes are in flight per SM to cover the HBM latency.
//
// Row offsets, sizes and indices are int64_t (N x V exceeds 2^31). Labels outside [0, V) that
// are not ignore_index are never dereferenced: the log-prob is NaN (and the backward's row of
// gradient NaN), exactly as on the CPU.
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/logprobs.h"

namespace rlengine::cuda {
namespace {

constexpr int kThreads = 512;  // per block; one row per block at a time
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;     // 16-byte loads in flight per thread
// Two resident blocks per SM (64 registers a thread) keep 1024 threads x kUnroll x 16 B = 64 KiB
// of loads in flight per SM, above what covers HBM latency at full bandwidth. fp64 (the
// gradcheck path) asks for one: its exp() needs more registers than that.
template <typename T>
constexpr int kMinBlocksPerSM = std::is_same_v<T, double> ? 1 : 2;

// Lower clamp of z - max (forward) and log p (backward) where the result multiplies an
// exponential: exp of it is exactly 0 in the type (exp(-128) < 2^-149, exp(-1000) < 2^-1074),
// and the clamp keeps 0 * (-inf) out of the entropy sums and gradients.
template <typename C>
constexpr C kLowClamp = std::is_same_v<C, double> ? C(-1000) : C(-128);

template <typename C>
__device__ __forceinline__ C quiet_nan() {
  if constexpr (std::is_same_v<C, double>) {
    return __longlong_as_double(0x7ff8000000000000LL);
  } else {
    return __int_as_float(0x7fc00000);
  }
}

template <typename C>
__device__ __forceinline__ C neg_inf() {
  if constexpr (std::is_same_v<C, double>) {
    return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
  } else {
    return __int_as_float(static_cast<int>(0xff800000u));
  }
}

// max(a, b) that returns NaN if either is NaN (fmax drops NaNs; a NaN anywhere in a row must
// make its results NaN, as on the CPU). max.NaN is one instruction on sm_80+.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ double max_nan(double a, double b) {
  return (b > a || b != b) ? b : a;
}

// exp(x) for x <= ~0: fp32 through the SFU's ex2 (relative error ~2^-22, far below the
// tolerance of fp32 results; exactly 0 below about -87.3, where the result would be subnormal,
// and for -inf); fp64 through the exact exp.
__device__ __forceinline__ float exp_nonpositive(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
  return r;
}
__device__ __forceinline__ double exp_nonpositive(double x) { return exp(x); }

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// ---- 16-byte vectors of each storage type ----------------------------------------------------
// A vector stays in its four raw 32-bit words; elements are unpacked one at a time where they
// are used (one instruction for bf16/fp16, none for fp32/fp64), so a thread holds kUnroll
// vectors in 4 * kUnroll registers instead of up to 32 unpacked floats.

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Word i of a vector (i a compile-time constant once the callers' loops are unrolled).
__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void set_word(uint4& v, int i, uint32_t value) {
  if (i == 0) v.x = value;
  else if (i == 1) v.y = value;
  else if (i == 2) v.z = value;
  else v.w = value;
}

// Element k of a vector in the compute type.
template <typename T>
__device__ __forceinline__ compute_t<T> element(const uint4& v, int k) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(word(v, k));
  } else if constexpr (std::is_same_v<T, double>) {
    return __hiloint2double(static_cast<int>(word(v, 2 * k + 1)), static_cast<int>(word(v, 2 * k)));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16: the top half of an fp32
    const uint32_t w = word(v, k / 2);
    return __uint_as_float(k % 2 == 0 ? w << 16 : w & 0xffff0000u);
  } else {
    const uint32_t w = word(v, k / 2);
    return __half2float(__ushort_as_half(static_cast<unsigned short>(k % 2 == 0 ? w : w >> 16)));
  }
}

// Elements 2i and 2i + 1 of a vector of a 2-byte type, written as one word.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return bit_cast<uint32_t>(__floats2bfloat162_rn(lo, hi));
  } else {
    return bit_cast<uint32_t>(__floats2half2_rn(lo, hi));
  }
}

// The largest element of a vector, NaN if it holds one. bf16/fp16 pairs go through the packed
// NaN-propagating max (exact: a maximum is one of the elements).
template <typename T>
__device__ __forceinline__ compute_t<T> vector_max(const uint4& v) {
  if constexpr (std::is_same_v<T, float>) {
    return max_nan(max_nan(element<T>(v, 0), element<T>(v, 1)),
                   max_nan(element<T>(v, 2), element<T>(v, 3)));
  } else if constexpr (std::is_same_v<T, double>) {
    return max_nan(element<T>(v, 0), element<T>(v, 1));
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
    const T2 pairs = __hmax2_nan(__hmax2_nan(bit_cast<T2>(v.x), bit_cast<T2>(v.y)),
                                 __hmax2_nan(bit_cast<T2>(v.z), bit_cast<T2>(v.w)));
    const uint4 as_vector = make_uint4(bit_cast<uint32_t>(pairs), 0u, 0u, 0u);
    return max_nan(element<T>(as_vector, 0), element<T>(as_vector, 1));
  }
}

// The same value in every element of a vector.
template <typename T>
__device__ __forceinline__ uint4 splat(compute_t<T> value) {
  if constexpr (std::is_same_v<T, double>) {
    const auto lo = static_cast<uint32_t>(__double2loint(value));
    const auto hi = static_cast<uint32_t>(__double2hiint(value));
    return make_uint4(lo, hi, lo, hi);
  } else {
    const uint32_t w = std::is_same_v<T, float> ? __float_as_uint(value)
                                                : pack_pair<T>(value, value);
    return make_uint4(w, w, w, w);
  }
}

// f applied to every element of a vector (f(k, x) gets the element's index in the vector).
template <typename T, typename F>
__device__ __forceinline__ uint4 map_vector(const uint4& v, F&& f) {
  uint4 out;
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int k = 0; k < 4; ++k) set_word(out, k, __float_as_uint(f(k, element<T>(v, k))));
  } else if constexpr (std::is_same_v<T, double>) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const double y = f(k, element<T>(v, k));
      set_word(out, 2 * k, static_cast<uint32_t>(__double2loint(y)));
      set_word(out, 2 * k + 1, static_cast<uint32_t>(__double2hiint(y)));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float lo = f(2 * i, element<T>(v, 2 * i));
      const float hi = f(2 * i + 1, element<T>(v, 2 * i + 1));
      set_word(out, i, pack_pair<T>(lo, hi));
    }
  }
  return out;
}

// A row as [0, head) scalars, `vectors` 16-byte vectors, then scalars from tail_begin to V.
// The head ends at the first 16-byte boundary; a pointer that is not even aligned to its
// element (never the case for a torch tensor) gets an all-scalar row.
struct RowSplit {
  int64_t head;
  int64_t vectors;
  int64_t tail_begin;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void* row, int64_t vocab) {
  const auto address = reinterpret_cast<uintptr_t>(row);
  int64_t head = vocab;
  if (address % sizeof(T) == 0) {
    const int64_t to_boundary = static_cast<int64_t>((16 - address % 16) % 16 / sizeof(T));
    head = to_boundary < vocab ? to_boundary : vocab;
  }
  const int64_t vectors = (vocab - head) / kVec<T>;
  return {head, vectors, head + vectors * kVec<T>};
}

__device__ __forceinline__ int64_t row_offset(const RowLayout& layout, int64_t row) {
  int64_t offset = 0;
#pragma unroll
  for (int d = 0; d < kMaxRowDims - 1; ++d) {
    if (d + 1 >= layout.ndims) break;
    offset += (row % layout.sizes[d]) * layout.strides[d];
    row /= layout.sizes[d];
  }
  return layout.ndims > 0 ? offset + row * layout.strides[layout.ndims - 1] : 0;
}

__device__ __forceinline__ int64_t load_label(const void* labels, bool int32, int64_t row) {
  return int32 ? static_cast<int64_t>(static_cast<const int32_t*>(labels)[row])
               : static_cast<const int64_t*>(labels)[row];
}

template <typename C>
__device__ __forceinline__ C load_row_value(const void* values, int64_t step, int64_t row) {
  return static_cast<const C*>(values)[row * step];
}

// ---- forward ---------------------------------------------------------------------------------

// One thread's online logsumexp. s and w are relative to mz = m * scale, the same rounded
// product the block reduction uses, so the thread holding the row's maximum needs no rescale.
template <typename C>
struct Online {
  C m;   // largest logit seen (unscaled: scale > 0 keeps the order); NaN once a NaN is seen
  C mz;  // m * scale
  C s;   // sum exp(z - mz)
  C w;   // sum exp(z - mz) * (z - mz), for the entropy
};

// Moves (s, w) from shift `from` to shift `to` >= from. A shift of -inf (nothing finite seen)
// or an underflowing factor leaves nothing, never 0 * inf.
template <typename C>
__device__ __forceinline__ void rescale(C& s, C& w, C from, C to) {
  const C delta = from - to;
  const C alpha = exp_nonpositive(delta);
  w = alpha == C(0) ? C(0) : alpha * fma(delta, s, w);
  s *= alpha;
}

// Takes a new candidate maximum (of a batch of elements) before the batch is added.
template <typename C>
__device__ __forceinline__ void raise_max(Online<C>& state, C batch_max, C scale) {
  if (!(batch_max <= state.m)) {  // grew, or a NaN: rare after the first batches of a row
    const C m = max_nan(state.m, batch_max);
    const C mz = m * scale;
    rescale(state.s, state.w, state.mz, mz);
    state.m = m;
    state.mz = mz;
  }
}

// Whether adding elements can matter: not while only -inf was seen (nothing to add), nor once
// the maximum is NaN, +inf or overflows (the row's results are NaN whatever the sums hold).
// The CPU kernel skips the same cases.
template <typename C>
__device__ __forceinline__ bool summing(const Online<C>& state) {
  return isfinite(state.mz);
}

// Adds one element x <= m (raise_max saw it) to the sums.
template <bool kEntropy, typename C>
__device__ __forceinline__ void add(Online<C>& state, C x, C scale) {
  C d = fma(x, scale, -state.mz);
  if constexpr (kEntropy) d = fmax(d, kLowClamp<C>);
  const C e = exp_nonpositive(d);
  state.s += e;
  if constexpr (kEntropy) state.w = fma(e, d, state.w);
}

template <bool kEntropy, typename C>
__device__ __forceinline__ void add_scalar(Online<C>& state, C x, C scale) {
  raise_max(state, x, scale);
  if (summing(state)) add<kEntropy>(state, x, scale);
}

template <typename C>
__device__ __forceinline__ C warp_max_nan(C x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = max_nan(x, __shfl_xor_sync(kFullWarp, x, offset));
  }
  return x;
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<T>)
    token_logprobs_kernel(const TokenLogprobsArgs args) {
  using C = compute_t<T>;
  __shared__ C shared_max[kWarps];
  __shared__ C shared_s[kWarps];
  __shared__ C shared_w[kWarps];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const C scale = static_cast<C>(args.scale);
  const int64_t vocab = args.vocab;
  C* logprobs = static_cast<C*>(args.logprobs);
  C* logsumexp = static_cast<C*>(args.logsumexp);
  C* entropy = static_cast<C*>(args.entropy);

  // Block-uniform loop: every thread of the block sees the same row and label, so the
  // `continue` and the barriers below are reached by all threads or none.
  for (int64_t row = blockIdx.x; row < args.num_rows; row += gridDim.x) {
    const int64_t label = load_label(args.labels, args.labels_int32, row);
    if (label == args.ignore_index) {  // exactly 0, and the row is never read
      if (threadIdx.x == 0) {
        logprobs[row] = C(0);
        logsumexp[row] = C(0);
        if constexpr (kEntropy) entropy[row] = C(0);
      }
      continue;
    }
    const T* x = static_cast<const T*>(args.logits) + row_offset(args.rows, row);
    const bool label_in_range = label >= 0 && label < vocab;
    C label_logit = C(0);  // read early so its latency hides behind the row
    if (threadIdx.x == 0 && label_in_range) label_logit = to_compute(x[label]);

    Online<C> state{neg_inf<C>(), neg_inf<C>(), C(0), C(0)};
    const RowSplit split = split_row<T>(x, vocab);
    for (int64_t j = threadIdx.x; j < split.head; j += kThreads) {
      add_scalar<kEntropy>(state, to_compute(x[j]), scale);
    }
    const uint4* body = reinterpret_cast<const uint4*>(x + split.head);
    for (int64_t base = threadIdx.x; base < split.vectors; base += kThreads * kUnroll) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads < split.vectors) raw[u] = body[base + u * kThreads];
      }
      C batch_max = neg_inf<C>();
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads < split.vectors) {
          batch_max = max_nan(batch_max, vector_max<T>(raw[u]));
        }
      }
      raise_max(state, batch_max, scale);
      if (!summing(state)) continue;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kThreads >= split.vectors) continue;
#pragma unroll
        for (int k = 0; k < kVec<T>; ++k) add<kEntropy>(state, element<T>(raw[u], k), scale);
      }
    }
    for (int64_t j = split.tail_begin + threadIdx.x; j < vocab; j += kThreads) {
      add_scalar<kEntropy>(state, to_compute(x[j]), scale);
    }

    // Row maximum (NaN if any thread saw a NaN), then every thread's sums moved to it and
    // added up. Each scratch array is written only after a barrier that follows the previous
    // row's reads of it (the max's reads precede this row's second barrier, the sums' reads
    // the next row's first), so both barriers are reached whatever the row holds.
    C row_max = warp_max_nan(state.m);
    if (lane == 0) shared_max[warp] = row_max;
    __syncthreads();
    row_max = warp_max_nan(lane < kWarps ? shared_max[lane] : neg_inf<C>());
    const C row_mz = row_max * scale;
    // Not finite: all -inf, a NaN, +inf, or an overflow of logit / temperature; the same in
    // every thread, so the sums below are simply unused.
    const bool row_is_finite = isfinite(row_mz);
    if (row_is_finite) rescale(state.s, state.w, state.mz, row_mz);
    C s = warp_sum(state.s);
    C w = kEntropy ? warp_sum(state.w) : C(0);
    if (lane == 0) {
      shared_s[warp] = s;
      shared_w[warp] = w;
    }
    __syncthreads();
    if (warp == 0) {
      s = warp_sum(lane < kWarps ? shared_s[lane] : C(0));
      if constexpr (kEntropy) w = warp_sum(lane < kWarps ? shared_w[lane] : C(0));
      if (lane == 0) {
        if (!row_is_finite) {
          logprobs[row] = quiet_nan<C>();
          logsumexp[row] = quiet_nan<C>();
          if constexpr (kEntropy) entropy[row] = quiet_nan<C>();
        } else {
          // Once per row, in double like the CPU kernel's combination of its chunk sums.
          const double log_s = log(static_cast<double>(s));
          const double lse = static_cast<double>(row_mz) + log_s;
          logsumexp[row] = static_cast<C>(lse);
          if constexpr (kEntropy) entropy[row] = static_cast<C>(log_s - static_cast<double>(w) / s);
          // An out-of-range label (only reachable past the Python check, e.g. in compiled
          // graphs) is never read: its log-prob is NaN.
          logprobs[row] = label_in_range
                              ? static_cast<C>(static_cast<double>(label_logit) *
                                                   static_cast<double>(scale) - lse)
                              : quiet_nan<C>();
        }
      }
    }
  }
}

// ---- backward --------------------------------------------------------------------------------

// d/dz_j [a * logp_label + b * H] / temperature without the label's one-hot term:
//   -scale * p_j * (a + b * H + b * logp_j),  p_j = exp(logp_j),  logp_j = x_j * scale - lse.
// A log-prob below the clamp has p_j = 0 exactly and gives 0, never 0 * (-inf).
template <typename C>
struct RowGradient {
  C scale, lse, a_plus_b_entropy, b;

  __device__ __forceinline__ C operator()(C x) const {
    const C logp = fmax(fma(x, scale, -lse), kLowClamp<C>);
    const C p = exp_nonpositive(logp);
    return -scale * p * fma(b, logp, a_plus_b_entropy);
  }
};

template <typename T>
__device__ __forceinline__ void fill_row(T* out, int64_t vocab, compute_t<T> value) {
  const T scalar = from_compute<T>(value);
  const RowSplit split = split_row<T>(out, vocab);
  for (int64_t j = threadIdx.x; j < split.head; j += kThreads) out[j] = scalar;
  const uint4 vector = splat<T>(value);
  uint4* body = reinterpret_cast<uint4*>(out + split.head);
  for (int64_t i = threadIdx.x; i < split.vectors; i += kThreads) body[i] = vector;
  for (int64_t j = split.tail_begin + threadIdx.x; j < vocab; j += kThreads) out[j] = scalar;
}

// The logits and the gradient are deliberately not __restrict__: they are the same buffer in
// the in-place backward. Each element is loaded, then stored, by one thread.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<T>)
    token_logprobs_backward_kernel(const TokenLogprobsBackwardArgs args) {
  using C = compute_t<T>;
  const int64_t vocab = args.vocab;
  for (int64_t row = blockIdx.x; row < args.num_rows; row += gridDim.x) {
    const int64_t label = load_label(args.labels, args.labels_int32, row);
    T* out = static_cast<T*>(args.grad_logits) + row_offset(args.grad_rows, row);
    if (label == args.ignore_index) {
      fill_row<T>(out, vocab, C(0));
      continue;
    }
    const C lse = load_row_value<C>(args.logsumexp, args.logsumexp_step, row);
    if (!isfinite(lse) || label < 0 || label >= vocab) {
      fill_row<T>(out, vocab, quiet_nan<C>());
      continue;
    }
    const T* x = static_cast<const T*>(args.logits) + row_offset(args.rows, row);
    // The per-row coefficients in double, then rounded, as the CPU kernel forms them.
    const double a = args.grad_logprobs
                         ? static_cast<double>(load_row_value<C>(args.grad_logprobs,
                                                                 args.grad_logprobs_step, row))
                         : 0.0;
    double b = 0.0, h = 0.0;
    if (args.grad_entropy) {
      b = static_cast<double>(load_row_value<C>(args.grad_entropy, args.grad_entropy_step, row));
      h = static_cast<double>(load_row_value<C>(args.entropy, args.entropy_step, row));
    }
    const C scale = static_cast<C>(args.scale);
    const RowGradient<C> gradient{scale, lse, static_cast<C>(a + b * h), static_cast<C>(b)};
    const C label_term = static_cast<C>(args.scale * a);  // the one-hot part, scale * a

    const auto in_address = reinterpret_cast<uintptr_t>(x);
    const auto out_address = reinterpret_cast<uintptr_t>(out);
    if (in_address % 16 != out_address % 16) {
      // Input and output rows at different offsets from a 16-byte boundary (an out-of-place
      // gradient of logits[..., 1:], say) cannot share vectors: plain coalesced scalars.
      for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
        C g = gradient(to_compute(x[j]));
        if (j == label) g += label_term;
        out[j] = from_compute<T>(g);
      }
      continue;
    }
    const RowSplit split = split_row<T>(x, vocab);
    for (int64_t j = threadIdx.x; j < split.head; j += kThreads) {
      C g = gradient(to_compute(x[j]));
      if (j == label) g += label_term;
      out[j] = from_compute<T>(g);
    }
    const uint4* in_body = reinterpret_cast<const uint4*>(x + split.head);
    uint4* out_body = reinterpret_cast<uint4*>(out + split.head);
    for (int64_t base = threadIdx.x; base < split.vectors; base += kThreads * kUnroll) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < split.vectors) raw[u] = in_body[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i >= split.vectors) continue;
        // The one-hot term lands in one vector of the row: that thread takes a slower path.
        const auto label_at = static_cast<uint64_t>(label - (split.head + i * kVec<T>));
        if (label_at < static_cast<uint64_t>(kVec<T>)) {
          out_body[i] = map_vector<T>(raw[u], [&](int k, C v) {
            const C g = gradient(v);
            return k == static_cast<int>(label_at) ? g + label_term : g;
          });
        } else {
          out_body[i] = map_vector<T>(raw[u], [&](int, C v) { return gradient(v); });
        }
      }
    }
    for (int64_t j = split.tail_begin + threadIdx.x; j < vocab; j += kThreads) {
      C g = gradient(to_compute(x[j]));
      if (j == label) g += label_term;
      out[j] = from_compute<T>(g);
    }
  }
}

// One block per row; rows beyond the grid's x limit are looped over.
unsigned int row_blocks(int64_t rows) { return grid_for(rows, 1, int64_t{0x7fffffff}); }

}  // namespace

cudaError_t launch_token_logprobs(const TokenLogprobsArgs& args, cudaStream_t stream) {
  if (args.num_rows == 0) return cudaSuccess;
  dispatch_float(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (args.with_entropy) {
      token_logprobs_kernel<T, true><<<row_blocks(args.num_rows), kThreads, 0, stream>>>(args);
    } else {
      token_logprobs_kernel<T, false><<<row_blocks(args.num_rows), kThreads, 0, stream>>>(args);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_token_logprobs_backward(const TokenLogprobsBackwardArgs& args,
                                           cudaStream_t stream) {
  if (args.num_rows == 0 || args.vocab == 0) return cudaSuccess;
  dispatch_float(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    token_logprobs_backward_kernel<T>
        <<<row_blocks(args.num_rows), kThreads, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

}  // namespace rlengine::cuda
