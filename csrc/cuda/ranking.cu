// CUDA kernels of the ranking and preference losses; their semantics (masked positions, NaN and
// inf, output dtypes) are the CPU kernels' in csrc/cpu/ranking.cpp.
//   sequence_scores (+backward)  one launch; a warp per row of up to kWarpRowMax tokens (eight
//                                rows per block), a block per longer row; 16-byte loads where
//                                the rows are contiguous and x and mask are equally aligned
//   rrhf_rank_loss (+backward)   one launch; a warp per query, its lanes over the K candidates
//                                (K is a few dozen: O(K^2) compares in double, as on the CPU)
//   bt_loss (+backward)          one launch; elementwise, grid-stride
// No host synchronization, no floating-point atomics: each output is written by one thread after
// a reduction in a fixed order (each thread's share, then a butterfly over the warp and the
// warps' partials in warp order), so results are the same bits run to run.
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/ranking.h"

namespace rlengine::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Rows up to this long get a warp each; longer rows a block, whose 256 threads then each still
// have a few 16-byte loads in flight.
constexpr int64_t kWarpRowMax = 1024;

__device__ __forceinline__ double quiet_nan() { return __longlong_as_double(0x7ff8000000000000LL); }

// Element i of a tensor of any float dtype, in working type A (one rounding, as torch's .to()).
template <typename A>
__device__ __forceinline__ A load_as(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat64: return static_cast<A>(static_cast<const double*>(data)[i]);
    case DType::kBFloat16:
      return static_cast<A>(__bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]));
    case DType::kFloat16: return static_cast<A>(__half2float(static_cast<const __half*>(data)[i]));
    case DType::kFloat32:
    default: return static_cast<A>(static_cast<const float*>(data)[i]);
  }
}

// ---- 16-byte packs -----------------------------------------------------------------------------

// K consecutive values; K > 1 packs are moved as whole 16-byte words (their address must be
// aligned: for_each_pack only forms them at aligned positions).
template <typename T, int K>
struct alignas(16) Pack {
  T v[K];
};

template <int K, typename T>
__device__ __forceinline__ Pack<T, K> load_pack(const T* p) {
  Pack<T, K> r;
  if constexpr (K == 1) {
    r.v[0] = *p;
  } else {
    static_assert(K * sizeof(T) % 16 == 0, "packs are whole 16-byte words");
#pragma unroll
    for (int w = 0; w < static_cast<int>(K * sizeof(T) / 16); ++w) {
      reinterpret_cast<uint4*>(r.v)[w] = __ldg(reinterpret_cast<const uint4*>(p) + w);
    }
  }
  return r;
}

// K mask bytes (K = 16 / sizeof of the pack's value type: 2, 4 or 8).
template <int K>
__device__ __forceinline__ Pack<uint8_t, K> load_mask(const uint8_t* p) {
  Pack<uint8_t, K> r;
  if constexpr (K == 1) {
    r.v[0] = *p;
  } else if constexpr (K == 2) {
    *reinterpret_cast<uint16_t*>(r.v) = *reinterpret_cast<const uint16_t*>(p);
  } else if constexpr (K == 4) {
    *reinterpret_cast<uint32_t*>(r.v) = *reinterpret_cast<const uint32_t*>(p);
  } else {
    static_assert(K == 8, "mask packs are 1, 2, 4 or 8 bytes");
    *reinterpret_cast<uint2*>(r.v) = *reinterpret_cast<const uint2*>(p);
  }
  return r;
}

// The mask bytes of positions [t, t + K) of a row: one strided byte, or an aligned pack (whose
// row is then contiguous).
template <int K>
__device__ __forceinline__ Pack<uint8_t, K> mask_at(const uint8_t* row, int64_t t, int64_t stride) {
  if constexpr (K == 1) {
    return Pack<uint8_t, 1>{{row[t * stride]}};
  } else {
    return load_mask<K>(row + t);
  }
}

template <int K, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, K>& r) {
  if constexpr (K == 1) {
    *p = r.v[0];
  } else {
    static_assert(K * sizeof(T) % 16 == 0, "packs are whole 16-byte words");
#pragma unroll
    for (int w = 0; w < static_cast<int>(K * sizeof(T) / 16); ++w) {
      reinterpret_cast<uint4*>(p)[w] = reinterpret_cast<const uint4*>(r.v)[w];
    }
  }
}

template <int K>
using Width = std::integral_constant<int, K>;

// Calls f(t, Width<K>{}) over positions [0, n) of a row shared by `lanes` threads (this one is
// `lane`), each thread in a fixed order. With `vector`, positions from `aligned` (the first
// position whose addresses are 16-byte aligned) on are visited as packs of V, and the few
// before it and after the last whole pack singly; without it, every position singly.
template <int V, typename F>
__device__ __forceinline__ void for_each_pack(int64_t n, int64_t aligned, int lane, int lanes,
                                              bool vector, F&& f) {
  if (!vector || V == 1) {
    for (int64_t t = lane; t < n; t += lanes) f(t, Width<1>{});
    return;
  }
  const int64_t body_begin = aligned < n ? aligned : n;
  const int64_t body_end = body_begin + (n - body_begin) / V * V;
  for (int64_t t = lane; t < body_begin; t += lanes) f(t, Width<1>{});
#pragma unroll 4
  for (int64_t t = body_begin + int64_t(lane) * V; t < body_end; t += int64_t(lanes) * V) {
    f(t, Width<V>{});
  }
  for (int64_t t = body_end + lane; t < n; t += lanes) f(t, Width<1>{});
}

// Sum over the row's threads (a warp, or the block), returned to all of them; every thread gets
// the same bits (xor butterfly, then the warps' sums in warp order).
template <bool kWarpPerRow>
__device__ __forceinline__ double row_sum(double v, double* scratch) {
  if constexpr (kWarpPerRow) {
    return warp_sum(v);
  } else {
    return block_sum(v, scratch);
  }
}

// count ** length_penalty, and 1 for an empty row (its score and gradient are 0 either way);
// the CPU kernel's length_divisor.
__device__ __forceinline__ double length_divisor(double count, double length_penalty) {
  if (count == 0.0 || length_penalty == 0.0) return 1.0;
  if (length_penalty == 1.0) return count;
  return pow(count, length_penalty);
}

// ---- sequence_scores ---------------------------------------------------------------------------

// Rows are walked grid-stride; the loop bound is uniform over a row's threads, so the block-wide
// barriers inside row_sum are reached by every thread of the block.
template <typename T, bool kWarpPerRow>
__global__ void __launch_bounds__(kThreads)
    sequence_scores_kernel(const __grid_constant__ SequenceScoresArgs a, const bool vector) {
  using C = compute_t<T>;
  constexpr int V = 16 / sizeof(T);
  constexpr int kRowsPerBlock = kWarpPerRow ? kWarps : 1;
  constexpr int kLanes = kWarpPerRow ? 32 : kThreads;
  __shared__ double scratch[32];
  const int lane = kWarpPerRow ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t first = int64_t(blockIdx.x) * kRowsPerBlock + (kWarpPerRow ? threadIdx.x / 32 : 0);
  const T* x_base = static_cast<const T*>(a.token_logprobs);
  C* scores = static_cast<C*>(a.scores);
  for (int64_t row = first; row < a.rows; row += int64_t(gridDim.x) * kRowsPerBlock) {
    const T* x = x_base + row * a.x_row_stride;
    const uint8_t* m = a.mask + row * a.mask_row_stride;
    const int64_t phase = int64_t(reinterpret_cast<uintptr_t>(x) / sizeof(T)) % V;
    // fp32 sums per thread (fp64 for fp64 rows), combined across threads in double.
    C sum = 0;
    int64_t count = 0;
    for_each_pack<V>(a.length, (V - phase) % V, lane, kLanes, vector, [&](int64_t t, auto width) {
      constexpr int K = decltype(width)::value;
      if constexpr (K == 1) {
        const bool keep = m[t * a.mask_col_stride] != 0;
        const C v = to_compute(x[t * a.x_col_stride]);
        sum += keep ? v : C(0);  // a select: a masked-out NaN or inf never reaches the sum
        count += keep;
      } else {
        const auto xs = load_pack<K>(x + t);
        const auto ms = load_mask<K>(m + t);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          sum += ms.v[k] != 0 ? to_compute(xs.v[k]) : C(0);
          count += ms.v[k] != 0;
        }
      }
    });
    const double total = row_sum<kWarpPerRow>(static_cast<double>(sum), scratch);
    const double length = row_sum<kWarpPerRow>(static_cast<double>(count), scratch);
    if (lane == 0) scores[row] = static_cast<C>(total / length_divisor(length, a.length_penalty));
  }
}

template <typename O, bool kWarpPerRow>
__global__ void __launch_bounds__(kThreads)
    sequence_scores_backward_kernel(const __grid_constant__ SequenceScoresBackwardArgs a,
                                    const bool vector) {
  constexpr int V = 16 / sizeof(O);
  constexpr int kRowsPerBlock = kWarpPerRow ? kWarps : 1;
  constexpr int kLanes = kWarpPerRow ? 32 : kThreads;
  __shared__ double scratch[32];
  const int lane = kWarpPerRow ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t first = int64_t(blockIdx.x) * kRowsPerBlock + (kWarpPerRow ? threadIdx.x / 32 : 0);
  O* grad_base = static_cast<O*>(a.grad);
  const O zero = from_compute<O>(0.0f);
  for (int64_t row = first; row < a.rows; row += int64_t(gridDim.x) * kRowsPerBlock) {
    const uint8_t* m = a.mask + row * a.mask_row_stride;
    O* grad = grad_base + row * a.length;
    // The launcher vectorizes only where the mask row has the output row's alignment phase.
    const int64_t aligned = (V - (row * a.length) % V) % V;
    int64_t count = 0;
    for_each_pack<V>(a.length, aligned, lane, kLanes, vector, [&](int64_t t, auto width) {
      constexpr int K = decltype(width)::value;
      const auto ms = mask_at<K>(m, t, a.mask_col_stride);
#pragma unroll
      for (int k = 0; k < K; ++k) count += ms.v[k] != 0;
    });
    const double length = row_sum<kWarpPerRow>(static_cast<double>(count), scratch);
    // An empty row has no selected position, so it is all zeros whatever grad_scores holds.
    const double g =
        load_as<double>(a.grad_scores, a.grad_scores_dtype, row * a.grad_scores_stride);
    const O value = from_compute<O>(g / length_divisor(length, a.length_penalty));
    for_each_pack<V>(a.length, aligned, lane, kLanes, vector, [&](int64_t t, auto width) {
      constexpr int K = decltype(width)::value;
      const auto ms = mask_at<K>(m, t, a.mask_col_stride);
      Pack<O, K> out;
#pragma unroll
      for (int k = 0; k < K; ++k) out.v[k] = ms.v[k] != 0 ? value : zero;
      store_pack<K>(grad + t, out);
    });
  }
}

// Rows of length <= kWarpRowMax: a warp each; longer: a block each.
template <typename Kernel, typename Args>
cudaError_t launch_rows(Kernel warp_kernel, Kernel block_kernel, const Args& a, bool vector,
                        cudaStream_t stream) {
  if (a.length <= kWarpRowMax) {
    warp_kernel<<<grid_for(a.rows, kWarps), kThreads, 0, stream>>>(a, vector);
  } else {
    block_kernel<<<grid_for(a.rows, 1), kThreads, 0, stream>>>(a, vector);
  }
  return cudaGetLastError();
}

int64_t mod(int64_t a, int64_t b) { return ((a % b) + b) % b; }

}  // namespace

cudaError_t launch_sequence_scores(const SequenceScoresArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return dispatch_float(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t V = 16 / sizeof(T);
    // Packs need both rows contiguous and x and mask at the same alignment phase in every row.
    const bool vector =
        a.x_col_stride == 1 && a.mask_col_stride == 1 &&
        mod(int64_t(reinterpret_cast<uintptr_t>(a.token_logprobs) / sizeof(T)), V) ==
            mod(int64_t(reinterpret_cast<uintptr_t>(a.mask)), V) &&
        mod(a.x_row_stride - a.mask_row_stride, V) == 0;
    return launch_rows(sequence_scores_kernel<T, true>, sequence_scores_kernel<T, false>, a,
                       vector, stream);
  });
}

cudaError_t launch_sequence_scores_backward(const SequenceScoresBackwardArgs& a,
                                            cudaStream_t stream) {
  if (a.rows == 0 || a.length == 0) return cudaSuccess;
  return dispatch_float(a.grad_dtype, [&](auto tag) {
    using O = decltype(tag);
    constexpr int64_t V = 16 / sizeof(O);
    // The output is contiguous (row r starts at r * length); the mask rows must share its phase.
    const bool vector = a.mask_col_stride == 1 &&
                        reinterpret_cast<uintptr_t>(a.grad) % 16 == 0 &&
                        mod(int64_t(reinterpret_cast<uintptr_t>(a.mask)), V) == 0 &&
                        mod(a.mask_row_stride - a.length, V) == 0;
    return launch_rows(sequence_scores_backward_kernel<O, true>,
                       sequence_scores_backward_kernel<O, false>, a, vector, stream);
  });
}

// ---- rrhf_rank_loss ----------------------------------------------------------------------------

namespace {

// One query's candidate k in double (exact for every input dtype); an invalid candidate's
// reward is NaN, so that `r_i < r_j` alone decides whether a pair counts.
template <typename S, typename R>
struct Query {
  const RrhfRankLossArgs& a;
  int64_t q;

  __device__ double score(int64_t k) const {
    const S* s = static_cast<const S*>(a.scores);
    return static_cast<double>(to_compute(s[q * a.scores_stride0 + k * a.scores_stride1]));
  }
  __device__ double reward(int64_t k) const {
    if (a.valid != nullptr && a.valid[q * a.valid_stride0 + k * a.valid_stride1] == 0) {
      return quiet_nan();
    }
    const R* r = static_cast<const R*>(a.rewards);
    return static_cast<double>(to_compute(r[q * a.rewards_stride0 + k * a.rewards_stride1]));
  }
};

// Whether the pair (worse i, better j) contributes: r_i < r_j and the hinge gap p_i - p_j not
// <= 0 (positive, or NaN, which passes through as torch.relu's value and gradient do).
__device__ __forceinline__ bool active(double r_i, double r_j, double gap) {
  return r_i < r_j && !(gap <= 0.0);
}

// A warp per query (grid-stride over queries, uniform per warp), lane l taking candidates
// l, l + 32, ... as the worse one of its pairs.
template <typename S, typename R>
__global__ void __launch_bounds__(kThreads)
    rrhf_rank_loss_kernel(const __grid_constant__ RrhfRankLossArgs a) {
  using C = compute_t<S>;
  const int lane = threadIdx.x & 31;
  const int64_t K = a.candidates;
  for (int64_t q = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; q < a.batch;
       q += int64_t(gridDim.x) * kWarps) {
    const Query<S, R> query{a, q};
    double total = 0.0;
    for (int64_t i = lane; i < K; i += 32) {
      const double r_i = query.reward(i);
      if (r_i != r_i) continue;  // invalid or NaN reward: no pair counts
      const double p_i = query.score(i);
      for (int64_t j = 0; j < K; ++j) {
        const double gap = p_i - query.score(j);
        if (active(r_i, query.reward(j), gap)) total += gap;
      }
    }
    total = warp_sum(total);
    if (lane == 0) static_cast<C*>(a.loss)[q] = static_cast<C>(total);
  }
}

// d loss / d p_k = grad_loss * (number of active pairs where k is the worse candidate - number
// where it is the better one); a query without any active pair keeps a zero row whatever
// grad_loss holds (even NaN), as on the CPU.
template <typename S, typename R>
__global__ void __launch_bounds__(kThreads)
    rrhf_rank_loss_backward_kernel(const __grid_constant__ RrhfRankLossBackwardArgs b) {
  const RrhfRankLossArgs& a = b.forward;
  const int lane = threadIdx.x & 31;
  const int64_t K = a.candidates;
  S* grad = static_cast<S*>(b.grad);
  for (int64_t q = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; q < a.batch;
       q += int64_t(gridDim.x) * kWarps) {
    const Query<S, R> query{a, q};
    bool any = false;
    for (int64_t i = lane; i < K && !any; i += 32) {
      const double r_i = query.reward(i), p_i = query.score(i);
      for (int64_t j = 0; j < K && !any; ++j) {
        any = active(r_i, query.reward(j), p_i - query.score(j));
      }
    }
    any = __any_sync(kFullWarp, any);
    for (int64_t k = lane; k < K; k += 32) {
      double value = 0.0;
      if (any) {
        const double r_k = query.reward(k), p_k = query.score(k);
        double coefficient = 0.0;  // small integers: exact, so the gradient is rounded once
        for (int64_t j = 0; j < K; ++j) {
          const double r_j = query.reward(j), p_j = query.score(j);
          coefficient += active(r_k, r_j, p_k - p_j);  // k is the worse one
          coefficient -= active(r_j, r_k, p_j - p_k);  // k is the better one
        }
        value = load_as<double>(b.grad_loss, b.grad_loss_dtype, q * b.grad_loss_stride) *
                coefficient;
      }
      grad[q * K + k] = from_compute<S>(value);
    }
  }
}

}  // namespace

cudaError_t launch_rrhf_rank_loss(const RrhfRankLossArgs& a, cudaStream_t stream) {
  if (a.batch == 0) return cudaSuccess;
  return dispatch_float(a.scores_dtype, [&](auto score_tag) {
    return dispatch_float(a.rewards_dtype, [&](auto reward_tag) {
      using S = decltype(score_tag);
      using R = decltype(reward_tag);
      rrhf_rank_loss_kernel<S, R><<<grid_for(a.batch, kWarps), kThreads, 0, stream>>>(a);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_rrhf_rank_loss_backward(const RrhfRankLossBackwardArgs& b,
                                           cudaStream_t stream) {
  const RrhfRankLossArgs& a = b.forward;
  if (a.batch == 0 || a.candidates == 0) return cudaSuccess;
  return dispatch_float(a.scores_dtype, [&](auto score_tag) {
    return dispatch_float(a.rewards_dtype, [&](auto reward_tag) {
      using S = decltype(score_tag);
      using R = decltype(reward_tag);
      rrhf_rank_loss_backward_kernel<S, R>
          <<<grid_for(a.batch, kWarps), kThreads, 0, stream>>>(b);
      return cudaGetLastError();
    });
  });
}

// ---- bt_loss -----------------------------------------------------------------------------------

namespace {

template <typename A>
__device__ __forceinline__ A load_operand(const BtOperand& o, int64_t i) {
  return o.data == nullptr ? static_cast<A>(o.value) : load_as<A>(o.data, o.dtype, i * o.stride);
}

// log1p(exp(-|d|)) + (1 - a) max(-d, 0) + a max(d, 0): the CPU kernel's form of
// (1 - a) softplus(-d) + a softplus(d), two non-negative terms and one exp. Infinite d follows
// IEEE arithmetic as the reference does (0 * inf = NaN); a NaN d stays NaN.
template <typename A>
__device__ __forceinline__ A bt_value(A d, A a) {
  const A tail = log1p(exp(-fabs(d)));
  const A up = d > A(0) ? d : A(0);
  const A down = d < A(0) ? -d : A(0);
  const A v = tail + (A(1) - a) * down + a * up;
  return d != d ? d : v;
}

// dloss/dd = a sigma(d) - (1 - a) sigma(-d), both sigmoids from e = exp(-|d|) so that the small
// one keeps its relative precision; the association of the product follows the CPU kernel's
// fp32 and fp64 loops.
template <typename A>
__device__ __forceinline__ A bt_grad(A d, A a, A g) {
  const A e = exp(-fabs(d));
  const A numerator = d >= A(0) ? a - (A(1) - a) * e : a * e - (A(1) - a);
  if constexpr (std::is_same_v<A, float>) {
    return d != d ? d : g * numerator / (1.0f + e);
  } else {
    return d != d ? g * d : g * (numerator / (1.0 + e));
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    bt_loss_kernel(const __grid_constant__ BtLossArgs a) {
  A* loss = static_cast<A*>(a.loss);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < a.pairs;
       i += int64_t(gridDim.x) * kThreads) {
    const A d = load_operand<A>(a.chosen, i) - load_operand<A>(a.rejected, i) -
                load_operand<A>(a.margin, i);
    loss[i] = bt_value(d, load_operand<A>(a.label_smoothing, i));
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    bt_loss_backward_kernel(const __grid_constant__ BtLossBackwardArgs a) {
  A* grad_delta = static_cast<A*>(a.grad_delta);
  A* grad_smoothing = static_cast<A*>(a.grad_label_smoothing);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < a.pairs;
       i += int64_t(gridDim.x) * kThreads) {
    const A d = load_operand<A>(a.chosen, i) - load_operand<A>(a.rejected, i) -
                load_operand<A>(a.margin, i);
    const A g = load_operand<A>(a.grad_loss, i);
    grad_delta[i] = bt_grad(d, load_operand<A>(a.label_smoothing, i), g);
    if (grad_smoothing != nullptr) grad_smoothing[i] = g * d;  // dloss/da = delta exactly
  }
}

}  // namespace

cudaError_t launch_bt_loss(const BtLossArgs& a, cudaStream_t stream) {
  if (a.pairs == 0) return cudaSuccess;
  const unsigned int blocks = grid_for(a.pairs, kThreads);
  if (a.dtype == DType::kFloat64) {
    bt_loss_kernel<double><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    bt_loss_kernel<float><<<blocks, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_bt_loss_backward(const BtLossBackwardArgs& a, cudaStream_t stream) {
  if (a.pairs == 0) return cudaSuccess;
  const unsigned int blocks = grid_for(a.pairs, kThreads);
  if (a.dtype == DType::kFloat64) {
    bt_loss_backward_kernel<double><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    bt_loss_backward_kernel<float><<<blocks, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace rlengine::cuda
