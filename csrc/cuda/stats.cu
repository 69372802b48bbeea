// CUDA kernels of rlengine::masked_mean, masked_var, masked_whiten and their backward ops; their
// semantics (masked positions, NaN and inf, output dtypes, the empty selection) are the CPU
// kernels' in csrc/cpu/stats.cpp.
//
// Geometry (stats.h): x is [outer, len, inner]; reduced row j = (o, i) holds x[o, :, i]. A block
// of 256 threads owns a tile of W adjacent reduced rows: W = 1 when inner == 1 (one row, read as
// a contiguous range with 16-byte packs), else W = min(32, next power of two >= inner) columns,
// each walked along len by 256 / W lanes, so that every load instruction of a warp covers whole
// runs of adjacent columns. Rows of up to kWarpRowMax elements (inner == 1) get a warp each, eight
// per block, instead.
//
// Numerics, as on the CPU: everything is accumulated in double (the fp64 throughput of the GPUs
// we target, A100 and H100/H200, is far above the few adds per element these memory-bound loops
// need) and the variance is two-pass, never E[x^2] - E[x]^2. The reduced dim is cut into chunks
// of kChunk elements; each chunk is reduced exactly in two passes (count and sum; then the
// squared deviations from the chunk's own mean, re-read while the chunk is still in L1/L2), and
// chunks are combined with the pairwise update of Chan, Golub and LeVeque in a fixed order,
// which stays exact to rounding when the data share a large offset (1e6 + noise).
//
// Launches: where there are enough tiles for one block each (or a tile is a single chunk), one
// kernel does everything: the statistics, then the result or the elementwise pass over the same
// elements. Reductions with few outputs (dim=None, whitening over the whole tensor, a handful of
// long rows) are spread over `parts` blocks per tile: the first kernel writes each block's
// partial statistics to a workspace, the second merges them; for reductions one block per tile
// writes the result, for the elementwise ops every block merges the same partials in the same
// order (so they all hold the same bits) and then writes its own chunks. That is two launches,
// where a last-block-done scheme would need a zeroed counter (a memset) and as many stream
// operations. No atomics and no host synchronization; the split depends only on the shape, so
// results are bitwise reproducible run to run.
#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/stats.h"

namespace rlengine::cuda {
namespace masked_stats {

using Op = MaskedStatsOp;

// What each op reads and forms (a named namespace: nvcc warns about the members one op does not
// use when the class has internal linkage).
template <Op kOp>
struct Traits {
  static constexpr bool kReadsX = kOp != Op::kMeanBackward;
  static constexpr bool kTwoPass =
      kOp == Op::kVar || kOp == Op::kWhiten || kOp == Op::kWhitenBackward;
  static constexpr bool kElementGrad = kOp == Op::kWhitenBackward;
  static constexpr bool kRowGrad = kOp == Op::kMeanBackward || kOp == Op::kVarBackward;
  static constexpr bool kReduces = kOp == Op::kMean || kOp == Op::kVar;  // else elementwise
  // How many sums the first pass (count, x, g) and the second (squares, g x cross) form.
  static constexpr int kFirstSums = kElementGrad ? 3 : kReadsX ? 2 : 1;
  static constexpr int kSecondSums = kElementGrad ? 2 : 1;
};

}  // namespace masked_stats

namespace {

using masked_stats::Op;
using masked_stats::Traits;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elements of the reduced dim per chunk of a tile (a chunk of a W-column tile is kChunk / W
// steps along len): 32 KiB of fp32 per block, small enough for the second pass to find the
// chunk in L1 or L2 rather than DRAM.
constexpr int64_t kChunk = 8192;
// A reduction with fewer tiles than this is split over up to kTargetBlocks / tiles blocks per
// tile: enough blocks to keep every SM of an H100 (132) busy a few times over at these
// kernels' register counts, and few partials (at most 512 per tile) for every block of the
// second kernel to merge. A constant, not the device's SM count, so that the split (and with
// it every bit of the result) depends on the shape alone.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kWarpRowMax = 1024;
constexpr int kPartialFields = 5;  // Moments in the workspace
constexpr int kMaxSums = 3;        // values summed at once over a tile's lanes

// Output element type: the working type for the forward ops, x's dtype for the gradients (for
// kMeanBackward, T is that dtype already).
template <Op kOp, typename T>
using out_t = std::conditional_t<kOp == Op::kMean || kOp == Op::kVar || kOp == Op::kWhiten,
                                 compute_t<T>, T>;

// How the work is cut; computed on the host (plan_of) and passed by value.
struct Plan {
  int width;                // W: adjacent reduced rows per tile
  bool warp_rows;           // a warp per row instead of a block per tile
  int64_t tiles_per_outer;  // ceil(inner / W)
  int64_t tiles;
  int64_t chunk_len;        // steps along len per chunk
  int64_t chunks;
  int64_t parts;            // blocks per tile; 1: one fused kernel
};

// ---- statistics -------------------------------------------------------------------------------

// Count, sum and second moments of a set of selected elements: m2 = sum (x - mean)^2 and
// cross = sum g (x - mean) around their own mean = sum / n; gsum = sum g.
struct Moments {
  double n = 0.0, sum = 0.0, m2 = 0.0, gsum = 0.0, cross = 0.0;
};

__device__ __forceinline__ double mean_of(double sum, double n) { return sum / fmax(n, 1.0); }

__device__ __forceinline__ double divisor(double n, bool unbiased) {
  return fmax(unbiased ? n - 1.0 : n, 1.0);
}

// a and b merged (Chan et al.): with delta = mean_b - mean_a,
//   m2 = m2_a + m2_b + delta^2 n_a n_b / n,
//   cross = cross_a + cross_b + delta (n_a g_b - n_b g_a) / n.
// An empty side is skipped outright (its mean would be 0 / 0 in the formula).
template <bool kTwoPass>
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  Moments r;
  r.n = a.n + b.n;
  r.sum = a.sum + b.sum;
  r.gsum = a.gsum + b.gsum;
  if constexpr (kTwoPass) {
    if (a.n == 0.0) {
      r.m2 = b.m2;
      r.cross = b.cross;
    } else if (b.n == 0.0) {
      r.m2 = a.m2;
      r.cross = a.cross;
    } else {
      const double delta = b.sum / b.n - a.sum / a.n;
      r.m2 = a.m2 + b.m2 + delta * delta * (a.n * b.n / r.n);
      r.cross = a.cross + b.cross + delta * (a.n * b.gsum - b.n * a.gsum) / r.n;
    }
  }
  return r;
}

// ---- thread mapping ---------------------------------------------------------------------------

struct Mapping {
  int column;  // this thread's reduced row within the tile (0 for W = 1)
  int lane;    // its lane along len
  int lanes;   // lanes per reduced row
};

template <bool kWarpRows>
__device__ __forceinline__ Mapping mapping_of(int width) {
  if constexpr (kWarpRows) {
    return {0, static_cast<int>(threadIdx.x & 31), 32};
  } else {
    return {static_cast<int>(threadIdx.x & (width - 1)), static_cast<int>(threadIdx.x / width),
            kThreads / width};
  }
}

// The reduced row of `tile` that this thread serves.
struct Row {
  int64_t o, i, j;  // j = o * inner + i: the index of its output
  bool valid;       // false past the last column of a partial tile
};

__device__ __forceinline__ Row row_of(const MaskedStatsArgs& a, const Plan& p, const Mapping& m,
                                      int64_t tile) {
  Row r;
  r.o = tile / p.tiles_per_outer;
  r.i = (tile % p.tiles_per_outer) * p.width + m.column;
  r.valid = r.i < a.inner;
  r.j = r.o * a.inner + r.i;
  return r;
}

// Sums v over the threads that serve the same reduced row and returns the sums to each of them,
// with the same bits: a xor butterfly within the warp (offsets >= W keep the column, and each
// step adds the same two values on both sides), then the warps' sums in warp order. Every
// thread of the block must call it (it has barriers) unless kWarpRows.
template <bool kWarpRows, int N>
__device__ __forceinline__ void row_sum(double (&v)[N], int width, double* scratch) {
  static_assert(N <= kMaxSums, "scratch holds kMaxSums values per thread column");
  const int lowest = kWarpRows ? 1 : width;
  for (int offset = 16; offset >= lowest; offset >>= 1) {
#pragma unroll
    for (int f = 0; f < N; ++f) v[f] += __shfl_xor_sync(kFullWarp, v[f], offset);
  }
  if constexpr (!kWarpRows) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane < width) {
#pragma unroll
      for (int f = 0; f < N; ++f) scratch[(warp * 32 + lane) * kMaxSums + f] = v[f];
    }
    __syncthreads();
    const int column = lane & (width - 1);
#pragma unroll
    for (int f = 0; f < N; ++f) {
      double total = 0.0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += scratch[(w * 32 + column) * kMaxSums + f];
      v[f] = total;
    }
  }
}

// ---- element access ---------------------------------------------------------------------------

// Element i of a tensor of any float dtype, as double (exact).
__device__ __forceinline__ double load_as_double(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat64: return static_cast<const double*>(data)[i];
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]);
    case DType::kFloat16: return __half2float(static_cast<const __half*>(data)[i]);
    case DType::kFloat32:
    default: return static_cast<const float*>(data)[i];
  }
}

// K consecutive values; K > 1 packs are moved as whole 16-byte words (for_each_pack forms them
// only at aligned positions).
template <typename T, int K>
struct alignas(16) Pack {
  T v[K];
};

template <int K>
using Width = std::integral_constant<int, K>;

template <int K, typename T>
__device__ __forceinline__ Pack<T, K> load_at(const T* base, int64_t e) {
  Pack<T, K> r;
  if constexpr (K == 1) {
    r.v[0] = base[e];
  } else if constexpr (sizeof(T) == 1) {  // mask bytes: K = 2, 4 or 8
    using Word = std::conditional_t<K == 2, uint16_t, std::conditional_t<K == 4, uint32_t, uint2>>;
    static_assert(sizeof(Word) == K, "mask packs are 2, 4 or 8 bytes");
    *reinterpret_cast<Word*>(r.v) = *reinterpret_cast<const Word*>(base + e);
  } else {
    static_assert(K * sizeof(T) % 16 == 0, "packs are whole 16-byte words");
#pragma unroll
    for (int w = 0; w < static_cast<int>(K * sizeof(T) / 16); ++w) {
      reinterpret_cast<uint4*>(r.v)[w] = __ldg(reinterpret_cast<const uint4*>(base + e) + w);
    }
  }
  return r;
}

template <int K, typename T>
__device__ __forceinline__ void store_at(T* base, int64_t e, const Pack<T, K>& r) {
  if constexpr (K == 1) {
    base[e] = r.v[0];
  } else {
    static_assert(K * sizeof(T) % 16 == 0, "packs are whole 16-byte words");
#pragma unroll
    for (int w = 0; w < static_cast<int>(K * sizeof(T) / 16); ++w) {
      reinterpret_cast<uint4*>(base + e)[w] = reinterpret_cast<const uint4*>(r.v)[w];
    }
  }
}

// The incoming per-element gradient (kWhitenBackward) at [e, e + K): a pack where it is
// contiguous and aligned, else K strided loads (stride 0: an expanded scalar).
template <int K, typename C>
__device__ __forceinline__ Pack<C, K> grad_at(const C* g, int64_t e, int64_t stride,
                                              bool packed) {
  if constexpr (K > 1) {
    if (packed) return load_at<K>(g, e);
  }
  Pack<C, K> r;
#pragma unroll
  for (int k = 0; k < K; ++k) r.v[k] = g[(e + k) * stride];
  return r;
}

// Calls f(e, Width<K>{}) over the flat range [begin, end) shared by `lanes` threads (this one is
// `lane`), each in a fixed order. With `vector` (all bases 16-byte aligned), positions that are
// multiples of V are the starts of packs of V; the few before the first and after the last
// whole pack are visited singly.
template <int V, typename F>
__device__ __forceinline__ void for_each_pack(int64_t begin, int64_t end, int lane, int lanes,
                                              bool vector, F&& f) {
  if (!vector) {
    for (int64_t e = begin + lane; e < end; e += lanes) f(e, Width<1>{});
    return;
  }
  const int64_t body_begin = min(end, (begin + V - 1) / V * V);
  const int64_t body_end = max(body_begin, end / V * V);
  for (int64_t e = begin + lane; e < body_begin; e += lanes) f(e, Width<1>{});
#pragma unroll 2
  for (int64_t e = body_begin + int64_t(lane) * V; e < body_end; e += int64_t(lanes) * V) {
    f(e, Width<V>{});
  }
  for (int64_t e = body_end + lane; e < end; e += lanes) f(e, Width<1>{});
}

// Calls f(e, Width<K>{}) for this thread's elements of chunk c of its reduced row.
template <int V, typename F>
__device__ __forceinline__ void for_chunk(const MaskedStatsArgs& a, const Plan& p,
                                          const Mapping& m, const Row& r, int64_t c, bool vector,
                                          F&& f) {
  const int64_t l_begin = c * p.chunk_len;
  const int64_t l_end = min(a.len, l_begin + p.chunk_len);
  if (p.width == 1) {  // inner == 1: the chunk is a contiguous range
    const int64_t base = r.o * a.len;
    for_each_pack<V>(base + l_begin, base + l_end, m.lane, m.lanes, vector, f);
    return;
  }
  if (!r.valid) return;
  for (int64_t l = l_begin + m.lane; l < l_end; l += m.lanes) {
    f((r.o * a.len + l) * a.inner + r.i, Width<1>{});
  }
}

// ---- the three phases -------------------------------------------------------------------------

// Statistics of this thread's reduced row over chunks first, first + step, ... (identical in
// every thread that serves the row).
template <Op kOp, typename T, bool kWarpRows>
__device__ Moments row_moments(const MaskedStatsArgs& a, const Plan& p, const Mapping& m,
                               const Row& r, int64_t first, int64_t step, bool vector,
                               bool grad_packed, double* scratch) {
  using Tr = Traits<kOp>;
  using C = compute_t<T>;
  constexpr int V = 16 / sizeof(T);
  const T* x = static_cast<const T*>(a.x);
  const C* g = static_cast<const C*>(a.grad);
  Moments total;
  for (int64_t c = first; c < p.chunks; c += step) {
    // Pass 1: count, sum of x, sum of g. Selects, not products: a masked-out NaN or inf never
    // reaches a sum.
    double s1[Tr::kFirstSums] = {};
    for_chunk<V>(a, p, m, r, c, vector, [&](int64_t e, auto width) {
      constexpr int K = decltype(width)::value;
      const auto keep = load_at<K>(a.mask, e);
      Pack<T, K> xs;
      Pack<C, K> gs;
      if constexpr (Tr::kReadsX) xs = load_at<K>(x, e);
      if constexpr (Tr::kElementGrad) gs = grad_at<K>(g, e, a.grad_stride, grad_packed);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const bool selected = keep.v[k] != 0;
        s1[0] += selected ? 1.0 : 0.0;
        if constexpr (Tr::kReadsX) {
          s1[1] += selected ? static_cast<double>(to_compute(xs.v[k])) : 0.0;
        }
        if constexpr (Tr::kElementGrad) s1[2] += selected ? static_cast<double>(gs.v[k]) : 0.0;
      }
    });
    row_sum<kWarpRows>(s1, p.width, scratch);
    Moments chunk;
    chunk.n = s1[0];
    if constexpr (Tr::kReadsX) chunk.sum = s1[1];
    if constexpr (Tr::kElementGrad) chunk.gsum = s1[2];
    if constexpr (Tr::kTwoPass) {
      // Pass 2: squared deviations (and the g cross term) around the chunk's exact mean.
      const double mean = mean_of(chunk.sum, chunk.n);
      double s2[Tr::kSecondSums] = {};
      for_chunk<V>(a, p, m, r, c, vector, [&](int64_t e, auto width) {
        constexpr int K = decltype(width)::value;
        const auto keep = load_at<K>(a.mask, e);
        const auto xs = load_at<K>(x, e);
        Pack<C, K> gs;
        if constexpr (Tr::kElementGrad) gs = grad_at<K>(g, e, a.grad_stride, grad_packed);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const bool selected = keep.v[k] != 0;
          const double d = static_cast<double>(to_compute(xs.v[k])) - mean;
          s2[0] += selected ? d * d : 0.0;
          if constexpr (Tr::kElementGrad) {
            s2[1] += selected ? static_cast<double>(gs.v[k]) * d : 0.0;
          }
        }
      });
      row_sum<kWarpRows>(s2, p.width, scratch);
      chunk.m2 = s2[0];
      if constexpr (Tr::kElementGrad) chunk.cross = s2[1];
    }
    total = merge<Tr::kTwoPass>(total, chunk);
  }
  return total;
}

// The statistics of a tile's reduced rows from the `parts` partials in the workspace: each lane
// merges partials lane, lane + lanes, ... pairwise, then the lanes' results are combined as
//   n = sum n_t, sum = sum sum_t, m2 = sum (m2_t + n_t (mean_t - mean)^2),
//   cross = sum (cross_t + (mean_t - mean) gsum_t),
// (the exact decomposition around the overall mean), in a fixed order.
template <Op kOp>
__device__ Moments merged_partials(const MaskedStatsArgs& a, const Plan& p, const Mapping& m,
                                   const Row& r, int64_t tile, double* scratch) {
  constexpr bool kTwoPass = Traits<kOp>::kTwoPass;
  const double* partials = static_cast<const double*>(a.workspace);
  Moments mine;
  if (r.valid) {
    for (int64_t q = m.lane; q < p.parts; q += m.lanes) {
      const double* f = partials + ((tile * p.parts + q) * p.width + m.column) * kPartialFields;
      Moments part;
      part.n = f[0];
      part.sum = f[1];
      part.m2 = f[2];
      part.gsum = f[3];
      part.cross = f[4];
      mine = merge<kTwoPass>(mine, part);
    }
  }
  double s1[3] = {mine.n, mine.sum, mine.gsum};
  row_sum<false>(s1, p.width, scratch);
  Moments total;
  total.n = s1[0];
  total.sum = s1[1];
  total.gsum = s1[2];
  if constexpr (kTwoPass) {
    const double d = mine.n > 0.0 ? mean_of(mine.sum, mine.n) - mean_of(total.sum, total.n) : 0.0;
    double s2[2] = {mine.m2 + mine.n * d * d, mine.cross + d * mine.gsum};
    row_sum<false>(s2, p.width, scratch);
    total.m2 = s2[0];
    total.cross = s2[1];
  }
  return total;
}

// The reductions' result for this thread's reduced row.
template <Op kOp, typename T>
__device__ __forceinline__ void write_result(const MaskedStatsArgs& a, const Mapping& m,
                                             const Row& r, const Moments& s) {
  if (m.lane != 0 || !r.valid) return;
  using O = out_t<kOp, T>;
  const double value =
      kOp == Op::kMean ? mean_of(s.sum, s.n) : s.m2 / divisor(s.n, a.unbiased);
  static_cast<O*>(a.out)[r.j] = static_cast<O>(value);
}

// The elementwise ops' outputs over chunks first, first + step, ... of this thread's reduced
// row: mask ? y : 0 with y formed in double from the row's statistics and rounded once (via
// fp32 for 16-bit outputs), as on the CPU.
template <Op kOp, typename T>
__device__ void write_elements(const MaskedStatsArgs& a, const Plan& p, const Mapping& m,
                               const Row& r, const Moments& s, int64_t first, int64_t step,
                               bool vector, bool grad_packed) {
  using Tr = Traits<kOp>;
  using C = compute_t<T>;
  using O = out_t<kOp, T>;
  constexpr int V = 16 / sizeof(T);
  const T* x = static_cast<const T*>(a.x);
  const C* g = static_cast<const C*>(a.grad);
  O* out = static_cast<O*>(a.out);
  const double mean = mean_of(s.sum, s.n);
  double row_grad = 0.0;
  if constexpr (Tr::kRowGrad) {
    if (r.valid) row_grad = load_as_double(a.grad, a.grad_dtype, r.j * a.grad_stride);
  }
  // y = scale (x - mean) + shift, or for the whitening gradient (CPU formula, s = inv_std,
  // k = s^3 cross / divisor): y = s g - (x - mean) k + shift.
  double scale = 0.0, shift = 0.0, k = 0.0, inv_std = 0.0;
  if constexpr (kOp == Op::kMeanBackward) {
    shift = row_grad / fmax(s.n, 1.0);
  } else if constexpr (kOp == Op::kVarBackward) {
    scale = 2.0 * row_grad / divisor(s.n, a.unbiased);
  } else {
    const double var = s.m2 / divisor(s.n, a.unbiased);
    // eps = 0 with a zero variance gives inf here and NaN outputs, as the reference does.
    inv_std = 1.0 / sqrt(var + a.eps);
    if constexpr (kOp == Op::kWhiten) {
      scale = inv_std;
      shift = a.shift_mean ? 0.0 : mean;
    } else {
      const double g_bar = mean_of(s.gsum, s.n);
      k = inv_std * inv_std * inv_std * s.cross / divisor(s.n, a.unbiased);
      shift = (a.shift_mean ? 0.0 : g_bar) - inv_std * g_bar;
    }
  }
  const O zero = from_compute<O>(0.0f);
  for (int64_t c = first; c < p.chunks; c += step) {
    for_chunk<V>(a, p, m, r, c, vector, [&](int64_t e, auto width) {
      constexpr int K = decltype(width)::value;
      const auto keep = load_at<K>(a.mask, e);
      Pack<T, K> xs;
      Pack<C, K> gs;
      if constexpr (Tr::kReadsX) xs = load_at<K>(x, e);
      if constexpr (Tr::kElementGrad) gs = grad_at<K>(g, e, a.grad_stride, grad_packed);
      Pack<O, K> ys;
#pragma unroll
      for (int q = 0; q < K; ++q) {
        double y = shift;
        if constexpr (kOp == Op::kWhitenBackward) {
          y = inv_std * static_cast<double>(gs.v[q]) -
              (static_cast<double>(to_compute(xs.v[q])) - mean) * k + shift;
        } else if constexpr (Tr::kReadsX) {
          y = (static_cast<double>(to_compute(xs.v[q])) - mean) * scale + shift;
        }
        ys.v[q] = keep.v[q] != 0 ? from_compute<O>(y) : zero;
      }
      store_at<K>(out, e, ys);
    });
  }
}

// ---- kernels ----------------------------------------------------------------------------------
// Tiles (or, for the split reductions, (tile, part) items) are walked grid-stride; the loop
// bounds depend on blockIdx only (on the warp for kWarpRows), so every thread of a block reaches
// row_sum's barriers together.

template <Op kOp, typename T, bool kWarpRows>
__global__ void __launch_bounds__(kThreads)
    fused_kernel(const __grid_constant__ MaskedStatsArgs a, const Plan p, const bool vector,
                 const bool grad_packed) {
  __shared__ double scratch[kWarps * 32 * kMaxSums];
  const Mapping m = mapping_of<kWarpRows>(p.width);
  const int64_t per_block = kWarpRows ? kWarps : 1;
  const int64_t first = int64_t(blockIdx.x) * per_block + (kWarpRows ? threadIdx.x / 32 : 0);
  for (int64_t tile = first; tile < p.tiles; tile += int64_t(gridDim.x) * per_block) {
    const Row r = row_of(a, p, m, tile);
    const Moments s =
        row_moments<kOp, T, kWarpRows>(a, p, m, r, 0, 1, vector, grad_packed, scratch);
    if constexpr (Traits<kOp>::kReduces) {
      write_result<kOp, T>(a, m, r, s);
    } else {
      write_elements<kOp, T>(a, p, m, r, s, 0, 1, vector, grad_packed);
    }
  }
}

template <Op kOp, typename T>
__global__ void __launch_bounds__(kThreads)
    partials_kernel(const __grid_constant__ MaskedStatsArgs a, const Plan p, const bool vector,
                    const bool grad_packed) {
  __shared__ double scratch[kWarps * 32 * kMaxSums];
  const Mapping m = mapping_of<false>(p.width);
  double* partials = static_cast<double*>(a.workspace);
  for (int64_t item = blockIdx.x; item < p.tiles * p.parts; item += gridDim.x) {
    const int64_t tile = item / p.parts, part = item % p.parts;
    const Row r = row_of(a, p, m, tile);
    const Moments s =
        row_moments<kOp, T, false>(a, p, m, r, part, p.parts, vector, grad_packed, scratch);
    if (m.lane == 0 && r.valid) {
      double* f = partials + (item * p.width + m.column) * kPartialFields;
      f[0] = s.n;
      f[1] = s.sum;
      f[2] = s.m2;
      f[3] = s.gsum;
      f[4] = s.cross;
    }
  }
}

template <Op kOp, typename T>
__global__ void __launch_bounds__(kThreads)
    from_partials_kernel(const __grid_constant__ MaskedStatsArgs a, const Plan p,
                         const bool vector, const bool grad_packed) {
  __shared__ double scratch[kWarps * 32 * kMaxSums];
  constexpr bool kReduces = Traits<kOp>::kReduces;
  const Mapping m = mapping_of<false>(p.width);
  const int64_t items = kReduces ? p.tiles : p.tiles * p.parts;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tile = kReduces ? item : item / p.parts;
    const Row r = row_of(a, p, m, tile);
    const Moments s = merged_partials<kOp>(a, p, m, r, tile, scratch);
    if constexpr (kReduces) {
      write_result<kOp, T>(a, m, r, s);
    } else {
      write_elements<kOp, T>(a, p, m, r, s, item % p.parts, p.parts, vector, grad_packed);
    }
  }
}

// ---- launch -----------------------------------------------------------------------------------

Plan plan_of(const MaskedStatsArgs& a) {
  Plan p;
  p.width = 1;
  if (a.inner > 1) {
    p.width = 2;
    while (p.width < 32 && p.width < a.inner) p.width *= 2;
  }
  p.tiles_per_outer = ceil_div(a.inner, p.width);
  p.tiles = a.outer * p.tiles_per_outer;
  p.chunk_len = kChunk / p.width;
  p.chunks = std::max<int64_t>(1, ceil_div(a.len, p.chunk_len));
  p.parts = std::min(p.chunks, std::max<int64_t>(1, ceil_div(kTargetBlocks, std::max<int64_t>(
                                                                               p.tiles, 1))));
  p.warp_rows = p.width == 1 && p.parts == 1 && a.len <= kWarpRowMax;
  return p;
}

bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <Op kOp, typename T>
cudaError_t launch(const MaskedStatsArgs& a, const Plan& p, cudaStream_t stream) {
  using Tr = Traits<kOp>;
  constexpr uintptr_t V = 16 / sizeof(T);
  // Packs are formed at flat positions that are multiples of V, so every base they touch must be
  // aligned: x (16 bytes), mask (V bytes), the elementwise output and a contiguous gradient
  // (V elements of at least T's size: 16 bytes).
  const bool vector = p.width == 1 && (!Tr::kReadsX || aligned(a.x, 16)) &&
                      aligned(a.mask, V) && (Tr::kReduces || aligned(a.out, 16));
  const bool grad_packed = Tr::kElementGrad && a.grad_stride == 1 && aligned(a.grad, 16);
  if (p.parts == 1) {
    if (p.warp_rows) {
      fused_kernel<kOp, T, true><<<grid_for(p.tiles, kWarps), kThreads, 0, stream>>>(
          a, p, vector, grad_packed);
    } else {
      fused_kernel<kOp, T, false><<<grid_for(p.tiles, 1), kThreads, 0, stream>>>(
          a, p, vector, grad_packed);
    }
    return cudaGetLastError();
  }
  partials_kernel<kOp, T><<<grid_for(p.tiles * p.parts, 1), kThreads, 0, stream>>>(
      a, p, vector, grad_packed);
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const int64_t items = Tr::kReduces ? p.tiles : p.tiles * p.parts;
  from_partials_kernel<kOp, T><<<grid_for(items, 1), kThreads, 0, stream>>>(a, p, vector,
                                                                           grad_packed);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_op(const MaskedStatsArgs& a, const Plan& p, cudaStream_t stream) {
  switch (a.op) {
    case Op::kMean: return launch<Op::kMean, T>(a, p, stream);
    case Op::kVar: return launch<Op::kVar, T>(a, p, stream);
    case Op::kMeanBackward: return launch<Op::kMeanBackward, T>(a, p, stream);
    case Op::kVarBackward: return launch<Op::kVarBackward, T>(a, p, stream);
    case Op::kWhiten: return launch<Op::kWhiten, T>(a, p, stream);
    case Op::kWhitenBackward: return launch<Op::kWhitenBackward, T>(a, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t masked_stats_workspace_bytes(const MaskedStatsArgs& a) {
  const Plan p = plan_of(a);
  if (p.parts == 1) return 0;
  return p.tiles * p.parts * p.width * kPartialFields * int64_t(sizeof(double));
}

cudaError_t launch_masked_stats(const MaskedStatsArgs& a, cudaStream_t stream) {
  const bool reduces = a.op == Op::kMean || a.op == Op::kVar;
  const int64_t outputs = reduces ? a.outer * a.inner : a.outer * a.len * a.inner;
  if (outputs == 0) return cudaSuccess;
  const Plan p = plan_of(a);
  return dispatch_float(a.dtype, [&](auto tag) { return launch_op<decltype(tag)>(a, p, stream); });
}

}  // namespace rlengine::cuda
