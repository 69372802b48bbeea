// CUDA kernels of the segment-reward ops: the CPU kernels' semantics (csrc/cpu/segments.cpp) on
// the GPU, without host synchronization.
//
// entropy_segments is a scan: a position's id is the number of segment ends before it in its
// row. It runs as one flat scan of the B*T positions (tile_scan.cuh, as gae.cu): one memset of
// the tile flags and one kernel; each thread owns 8 consecutive positions, tiles of 2048 chain by
// decoupled look-back, the ids go out through shared memory as coalesced int64 stores and the
// thread holding a row's last position writes its count. The last valid position always ends
// the last segment, which changes only the count (ids are exclusive counts), so the scan carries
// (ends so far, whether the last valid position so far ends a segment, any valid so far).
//
// The other ops need per-segment quantities of rows whose ids are arbitrary labels (a segment's
// tokens need not be adjacent): its number of tokens, its last token, the sum of its tokens'
// values. A "table" kernel builds them in a [B, W] scratch (W = T, or min(T, Kmax) for the
// dense ops): each thread walks 8 consecutive positions of a row, merges runs of one id in
// registers (a contiguous segment costs one atomic per 8 tokens) and adds them with atomics:
// atomicAdd / atomicMax on int32 for counts and last positions (exact, order-free) and
// atomicAdd on float64 for sums (so sums keep the CPU kernel's float64 accumulation; the order
// of those additions varies between runs, so float64 results can differ in the last bit from
// run to run, like torch's scatter_add on CUDA; fp32 results are rounded from the float64 sum).
// A second, elementwise kernel turns the table into the op's output. Launches per call: a memset
// of the scratch, the table, the output kernel; one kernel alone where no table is needed
// (segment_reduce_backward "sum", segment_rewards_to_dense "repeat").
//
// Output shapes never depend on data: segment_reduce returns [B, T] (or [B]) and the dense ops
// take Kmax from segment_rewards.shape[1], so nothing is read back to the host.
//
// Malformed segmentations are never diagnosed here (see segments.h): counts are clamped to
// [0, W], and ids outside [0, clamped count) are "no segment"; every table index is then
// b * W + id with 0 <= id < W, and every gathered position a real position of the row.
#include <climits>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/segments.h"
#include "cuda/tile_scan.cuh"

namespace rlengine::cuda {
namespace {

using tile_scan::quotient;
using tile_scan::Walk;

// ---- shared pieces --------------------------------------------------------------------------

template <typename scalar_t>
__device__ __forceinline__ compute_t<scalar_t> load_at(const StridedInput& in, int64_t row,
                                                       int64_t col) {
  return to_compute(
      static_cast<const scalar_t*>(in.data)[row * in.row_stride + col * in.col_stride]);
}

__device__ __forceinline__ int64_t segment_id(const Segmentation& s, int64_t b, int64_t t) {
  return static_cast<const int64_t*>(s.ids.data)[b * s.ids.row_stride + t * s.ids.col_stride];
}

// counts[b] clamped into [0, cap].
__device__ __forceinline__ int64_t segment_count(const Segmentation& s, int64_t b, int64_t cap) {
  const int64_t k = static_cast<const int64_t*>(s.counts.data)[b * s.counts.row_stride];
  return k < 0 ? 0 : (k > cap ? cap : k);
}

// 0 <= id < count, in one unsigned comparison (-1 and every other negative id wrap to huge).
__device__ __forceinline__ bool in_segment(int64_t id, int64_t count) {
  return static_cast<uint64_t>(id) < static_cast<uint64_t>(count);
}

__device__ __forceinline__ bool mask_at(const StridedInput& m, int64_t b, int64_t t) {
  return static_cast<const uint8_t*>(m.data)[b * m.row_stride + t * m.col_stride] != 0;
}

constexpr int kThreads = 256;

// Grid-stride loops over `work` items, 64-bit.
#define RLENGINE_GRID_STRIDE(i, work)                                               \
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < (work); \
       i += int64_t{gridDim.x} * blockDim.x)

// ---- entropy_segments -----------------------------------------------------------------------

constexpr int kScanItems = 8;
constexpr int kScanTile = kThreads * kScanItems;

constexpr uint32_t kAny = 1;       // a valid position so far
constexpr uint32_t kLastEnds = 2;  // the last valid position so far ends a segment
constexpr uint32_t kCut = 4;       // the stretch contains a row's first position

struct CountMap {
  long long ends;  // segment ends among the valid positions
  uint32_t bits;
  uint32_t pad;

  __device__ static CountMap shuffle(const CountMap& m, int src) {
    return {__shfl_sync(kFullWarp, m.ends, src), __shfl_sync(kFullWarp, m.bits, src), 0u};
  }
  __device__ void store_cg(CountMap* dst) const {
    __stcg(&dst->ends, ends);
    __stcg(&dst->bits, bits);
  }
  __device__ static CountMap load_cg(const CountMap* src) {
    return {__ldcg(&src->ends), __ldcg(&src->bits), 0u};
  }
};

struct CountOp {
  using Map = CountMap;
  static constexpr bool kDescending = false;

  __device__ static Map identity() { return {0, 0u, 0u}; }
  __device__ static Map row_start() { return {0, kCut, 0u}; }

  __device__ static Map then(const Map& a, const Map& b) {
    if (b.bits & kCut) return b;
    const uint32_t last = (b.bits & kAny) ? (b.bits & kLastEnds) : (a.bits & kLastEnds);
    return {a.ends + b.ends, (a.bits & kCut) | ((a.bits | b.bits) & kAny) | last, 0u};
  }

  __device__ static bool is_cut(const Map& m) { return (m.bits & kCut) != 0; }
};

// The threshold in the entropy's working precision: a float e satisfies (double)e > threshold
// iff e > (threshold rounded down to a float), as the CPU kernel compares.
struct Threshold {
  double exact;
  float below;
};

template <typename scalar_t>
__device__ __forceinline__ bool above(compute_t<scalar_t> e, const Threshold& threshold) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return e > threshold.exact;
  } else {
    return e > threshold.below;  // NaN compares false: it never ends a segment
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 4)
    entropy_segments_kernel(const EntropySegmentsArgs args, const Walk walk,
                            const Threshold threshold) {
  using Scan = tile_scan::TileScan<CountOp, kThreads>;
  alignas(8) __shared__ uint8_t flags[kScanTile];  // bit 0: valid, bit 1: above the threshold
  __shared__ long long ids[tile_scan::padded_size<long long>(kScanTile)];
  __shared__ typename Scan::Storage storage;

  const tile_scan::Workspace ws = tile_scan::workspace_at(args.workspace, walk.tiles);
  const int64_t ticket = Scan::take_ticket(ws, storage);
  const int64_t begin = ticket * kScanTile;
  const int count = static_cast<int>(min(int64_t{kScanTile}, walk.total - begin));
  const int tid = threadIdx.x;

  {
    tile_scan::StripedWalk<kThreads> at(walk, begin);
    const uint32_t valid =
        tile_scan::striped_valid<kThreads, kScanItems>(walk, at, args.mask, count);
#pragma unroll
    for (int s = 0; s < kScanItems; ++s) {
      const bool in = (valid >> s) & 1u;
      const bool ends = in && above<scalar_t>(load_at<scalar_t>(args.entropy, at.row, at.col),
                                              threshold);
      flags[s * kThreads + tid] = static_cast<uint8_t>(in | (ends << 1));
      at.next(walk);
    }
  }
  __syncthreads();

  const tile_scan::Blocked<kScanItems> pos(walk, begin + int64_t{tid} * kScanItems);
  const uint64_t my_flags = tile_scan::blocked_keep(flags);
  CountMap mine = CountOp::identity();
#pragma unroll
  for (int j = 0; j < kScanItems; ++j) {
    if (pos.start(j)) mine = CountOp::row_start();
    const uint32_t f = tile_scan::kept(my_flags, j);
    if (f & 1u) {
      mine.ends += f >> 1;
      mine.bits = (mine.bits & kCut) | kAny | ((f >> 1) ? kLastEnds : 0u);
    }
  }
  const CountMap in = tile_scan::TileScan<CountOp, kThreads>::exclusive_state(
      mine, ticket, begin != quotient(begin, walk.steps) * walk.steps, ws, storage);

  long long ends = in.ends;
  uint32_t bits = in.bits;
#pragma unroll
  for (int j = 0; j < kScanItems; ++j) {
    if (pos.start(j)) {
      ends = 0;
      bits = 0u;
    }
    const uint32_t f = tile_scan::kept(my_flags, j);
    long long id = -1;
    if (f & 1u) {
      id = ends;
      ends += f >> 1;
      bits = kAny | ((f >> 1) ? kLastEnds : 0u);
    }
    // The row's last valid position ends its last segment whatever its entropy.
    if (pos.end(j)) {
      args.counts[pos.row(j)] = (bits & kAny) ? ends - ((bits & kLastEnds) ? 1 : 0) + 1 : 0;
    }
    ids[tile_scan::padded<long long>(tid * kScanItems + j)] = id;
  }
  __syncthreads();

  int64_t* out = args.segment_ids + begin;
#pragma unroll
  for (int s = 0; s < kScanItems; ++s) {
    const int i = s * kThreads + tid;
    if (i < count) out[i] = ids[tile_scan::padded<long long>(i)];
  }
}

// ---- per-segment tables ---------------------------------------------------------------------

// [B, W] tables, each null when unused: the sum of a segment's values (float64), its number of
// tokens and its last token (-1 if none). Laid out in one workspace: sums, counts, last.
struct Tables {
  double* sum = nullptr;
  int* count = nullptr;
  int* last = nullptr;
  int64_t width = 0;
};

struct TableNeeds {
  bool sum = false, count = false, last = false;
};

int64_t table_bytes(int64_t rows, int64_t width, TableNeeds needs) {
  const int64_t cells = rows * width;
  return cells * ((needs.sum ? 8 : 0) + (needs.count ? 4 : 0) + (needs.last ? 4 : 0));
}

Tables tables_at(void* workspace, int64_t rows, int64_t width, TableNeeds needs) {
  auto* bytes = static_cast<unsigned char*>(workspace);
  const int64_t cells = rows * width;
  Tables t;
  t.width = width;
  if (needs.sum) {
    t.sum = reinterpret_cast<double*>(bytes);
    bytes += cells * 8;
  }
  if (needs.count) {
    t.count = reinterpret_cast<int*>(bytes);
    bytes += cells * 4;
  }
  if (needs.last) t.last = reinterpret_cast<int*>(bytes);
  return t;
}

// Sums and counts start at 0, last positions at -1 (all bytes 0xff).
cudaError_t reset_tables(const Tables& t, int64_t rows, cudaStream_t stream) {
  const auto cells = static_cast<size_t>(rows * t.width);
  const size_t zero_bytes = (t.sum ? 8 * cells : 0) + (t.count ? 4 * cells : 0);
  void* first = t.sum ? static_cast<void*>(t.sum) : static_cast<void*>(t.count);
  if (zero_bytes > 0) {
    if (const cudaError_t e = cudaMemsetAsync(first, 0, zero_bytes, stream)) return e;
  }
  if (t.last) return cudaMemsetAsync(t.last, 0xff, 4 * cells, stream);
  return cudaSuccess;
}

constexpr int kChunk = 8;  // consecutive positions of a row per thread in the table kernel

struct TableArgs {
  Segmentation segments;
  int64_t cap;           // counts are clamped to [0, cap]; cap <= tables.width
  StridedInput take;     // [B, T] bool: the positions that count (null: all)
  StridedInput values;   // [B, T]: summed into tables.sum (null when there is no sum)
  Tables tables;
};

template <typename value_t>
__device__ __forceinline__ void flush_run(const TableArgs& a, int64_t b, int64_t id, int last,
                                          int length, double sum) {
  if (id < 0) return;
  const int64_t cell = b * a.tables.width + id;
  if (a.tables.sum) atomicAdd(&a.tables.sum[cell], sum);
  if (a.tables.count) atomicAdd(&a.tables.count[cell], length);
  if (a.tables.last) atomicMax(&a.tables.last[cell], last);
}

template <typename value_t>
__global__ void __launch_bounds__(kThreads) segment_table_kernel(const TableArgs a) {
  const int64_t steps = a.segments.steps;
  const int64_t chunks_per_row = (steps + kChunk - 1) / kChunk;
  RLENGINE_GRID_STRIDE(chunk, a.segments.rows * chunks_per_row) {
    const int64_t b = quotient(chunk, chunks_per_row);
    const int64_t t0 = (chunk - b * chunks_per_row) * kChunk;
    const int64_t t1 = min(steps, t0 + kChunk);
    const int64_t count = segment_count(a.segments, b, a.cap);
    int64_t run = -1;  // the id of the current run of positions (-1: none yet)
    int run_last = 0, run_length = 0;
    double run_sum = 0.0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t id = segment_id(a.segments, b, t);
      if (!in_segment(id, count) || (a.take.data && !mask_at(a.take, b, t))) continue;
      if (id != run) {
        flush_run<value_t>(a, b, run, run_last, run_length, run_sum);
        run = id;
        run_length = 0;
        run_sum = 0.0;
      }
      run_last = static_cast<int>(t);
      ++run_length;
      if (a.tables.sum) run_sum += static_cast<double>(load_at<value_t>(a.values, b, t));
    }
    flush_run<value_t>(a, b, run, run_last, run_length, run_sum);
  }
}

unsigned int grid_of(int64_t work) { return grid_for(work, kThreads); }

template <typename value_t>
cudaError_t build_tables(const TableArgs& a, cudaStream_t stream) {
  if (const cudaError_t e = reset_tables(a.tables, a.segments.rows, stream)) return e;
  const int64_t chunks = a.segments.rows * ceil_div(a.segments.steps, kChunk);
  segment_table_kernel<value_t><<<grid_of(chunks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// ---- segment_reduce -------------------------------------------------------------------------

TableNeeds reduce_needs(SegmentReduction reduce, bool backward) {
  TableNeeds n;
  switch (reduce) {
    case SegmentReduction::kSum: n.sum = !backward; break;
    case SegmentReduction::kMean: n.sum = !backward; n.count = true; break;
    case SegmentReduction::kEnd:
    case SegmentReduction::kEndMean: n.last = true; break;
  }
  return n;
}

// out[b, k] for every k < T ([B, T] results: 0 for k >= counts[b] and for empty segments).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    reduce_columns_kernel(const SegmentReduceArgs a, const Tables tables) {
  using C = compute_t<scalar_t>;
  const int64_t steps = a.segments.steps;
  C* out = static_cast<C*>(a.out);
  RLENGINE_GRID_STRIDE(i, a.segments.rows * steps) {
    const int64_t b = quotient(i, steps), k = i - b * steps;
    C result = 0;
    if (k < segment_count(a.segments, b, steps)) {
      switch (a.reduce) {
        case SegmentReduction::kSum: result = static_cast<C>(tables.sum[i]); break;
        case SegmentReduction::kMean:
          result = static_cast<C>(tables.sum[i] / static_cast<double>(max(tables.count[i], 1)));
          break;
        default: {
          const int last = tables.last[i];
          if (last >= 0) result = load_at<scalar_t>(a.values, b, last);
        }
      }
    }
    out[i] = result;
  }
}

// end_mean: one warp per row, the mean over its segments of the value at each one's last token.
// The float64 sum is lane-strided then a fixed shuffle tree: the same order on every run.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    reduce_end_mean_kernel(const SegmentReduceArgs a, const Tables tables) {
  using C = compute_t<scalar_t>;
  const int64_t steps = a.segments.steps;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  for (int64_t b = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32; b < a.segments.rows;
       b += warps) {
    const int64_t count = segment_count(a.segments, b, steps);
    double sum = 0.0;
    for (int64_t k = lane; k < count; k += 32) {
      const int last = tables.last[b * steps + k];
      if (last >= 0) sum += static_cast<double>(load_at<scalar_t>(a.values, b, last));
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      static_cast<C*>(a.out)[b] =
          static_cast<C>(sum / static_cast<double>(count > 1 ? count : 1));
    }
  }
}

// grad_values[b, t]: the gradient of the output the position was reduced into, 0 elsewhere.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    reduce_backward_kernel(const SegmentReduceBackwardArgs a, const Tables tables) {
  const int64_t steps = a.segments.steps;
  out_t* out = static_cast<out_t*>(a.grad_values);
  RLENGINE_GRID_STRIDE(i, a.segments.rows * steps) {
    const int64_t b = quotient(i, steps), t = i - b * steps;
    const int64_t count = segment_count(a.segments, b, steps);
    const int64_t id = segment_id(a.segments, b, t);
    double g = 0.0;
    if (in_segment(id, count)) {
      const int64_t cell = b * steps + id;
      switch (a.reduce) {
        case SegmentReduction::kSum: g = load_at<acc_t>(a.grad, b, id); break;
        case SegmentReduction::kMean:
          g = static_cast<double>(load_at<acc_t>(a.grad, b, id)) /
              static_cast<double>(tables.count[cell]);  // >= 1: this position is counted
          break;
        case SegmentReduction::kEnd:
          if (tables.last[cell] == t) g = load_at<acc_t>(a.grad, b, id);
          break;
        case SegmentReduction::kEndMean:
          if (tables.last[cell] == t) {
            g = static_cast<double>(load_at<acc_t>(a.grad, b, 0)) /
                static_cast<double>(count > 1 ? count : 1);
          }
          break;
      }
    }
    out[i] = from_compute<out_t>(g);
  }
}

// ---- segment_rewards_to_dense ---------------------------------------------------------------

// sigma(p) of the location-aware normalizer is floored here; it must equal the CPU kernel's
// kSigmaFloor and rlengine.ops.reference.SIGMA_FLOOR.
constexpr double kSigmaFloor = 1e-3;

struct TokenReward {
  double value;  // the reward of each receiving token of the segment
  double slope;  // d value / d segment_rewards[b, k]; 0 where the clamp is active
};

// Segment k of a row with K segments (location p = (k + 1) / K), `receivers` receiving tokens
// (the even spread's divisor): the CPU kernel's DenseRule, in float64.
__device__ TokenReward token_reward(const DenseRuleParams& rule, double r, int64_t k, int64_t K,
                                    int64_t receivers) {
  double slope = 1.0;
  if (rule.normalize) {
    const double log_p = log(static_cast<double>(k + 1)) - log(static_cast<double>(K));
    const double mu = rule.a_mu * log_p + rule.b_mu;
    double sigma = rule.a_sigma * log_p + rule.b_sigma;
    sigma = sigma < kSigmaFloor ? kSigmaFloor : sigma;
    r = (r - mu) / sigma;
    slope = 1.0 / sigma;
  }
  if (rule.spread == SegmentSpread::kEven) {
    const double n = static_cast<double>(receivers > 1 ? receivers : 1);
    r /= n;
    slope /= n;
  }
  if (rule.clamped) {
    // torch.clamp: NaN stays NaN; the gradient passes where -clamp <= r <= clamp.
    if (!(r >= -rule.clamp && r <= rule.clamp)) slope = 0.0;
    r = r < -rule.clamp ? -rule.clamp : (r > rule.clamp ? rule.clamp : r);
  }
  return {r, slope};
}

TableNeeds dense_needs(SegmentSpread spread, bool backward) {
  TableNeeds n;
  n.last = spread == SegmentSpread::kEnd;
  n.count = spread == SegmentSpread::kEven;
  n.sum = backward && spread != SegmentSpread::kEnd;
  return n;
}

int64_t dense_width(int64_t steps, int64_t max_segments) {
  return steps < max_segments ? steps : max_segments;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dense_kernel(const DenseArgs a, const Tables tables) {
  using C = compute_t<scalar_t>;
  const int64_t steps = a.segments.steps;
  C* out = static_cast<C*>(a.dense);
  RLENGINE_GRID_STRIDE(i, a.segments.rows * steps) {
    const int64_t b = quotient(i, steps), t = i - b * steps;
    const int64_t count = segment_count(a.segments, b, tables.width);
    const int64_t id = segment_id(a.segments, b, t);
    C result = 0;
    if (in_segment(id, count) && mask_at(a.mask, b, t)) {
      const int64_t cell = b * tables.width + id;
      int64_t receivers = 1;
      bool receives = true;
      if (a.rule.spread == SegmentSpread::kEven) receivers = tables.count[cell];
      if (a.rule.spread == SegmentSpread::kEnd) receives = tables.last[cell] == t;
      if (receives) {
        const double r = load_at<scalar_t>(a.segment_rewards, b, id);
        result = static_cast<C>(token_reward(a.rule, r, id, count, receivers).value);
      }
    }
    out[i] = result;
  }
}

// grad_segment[b, k] = (sum of dL/d dense over the segment's receiving tokens) * slope, for every
// k < Kmax (0 for k >= counts[b]). A clamped segment gets exactly 0, even if its tokens'
// gradients are not finite.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dense_backward_kernel(const DenseArgs a, const Tables tables) {
  using acc_t = compute_t<scalar_t>;
  const int64_t kmax = a.max_segments;
  scalar_t* out = static_cast<scalar_t*>(a.grad_segment);
  RLENGINE_GRID_STRIDE(i, a.segments.rows * kmax) {
    const int64_t b = quotient(i, kmax), k = i - b * kmax;
    const int64_t count = segment_count(a.segments, b, tables.width);
    double g = 0.0;
    if (k < count) {
      const int64_t cell = b * tables.width + k;
      double grad_sum = 0.0;
      int64_t receivers = 1;
      if (a.rule.spread == SegmentSpread::kEnd) {
        const int last = tables.last[cell];
        if (last >= 0) grad_sum = load_at<acc_t>(a.grad, b, last);
      } else {
        grad_sum = tables.sum[cell];
        if (a.rule.spread == SegmentSpread::kEven) receivers = tables.count[cell];
      }
      const double r = load_at<scalar_t>(a.segment_rewards, b, k);
      const double slope = token_reward(a.rule, r, k, count, receivers).slope;
      g = slope == 0.0 ? 0.0 : grad_sum * slope;
    }
    out[i] = from_compute<scalar_t>(g);
  }
}

float float_threshold_below(double threshold) {
  float t = static_cast<float>(threshold);
  if (static_cast<double>(t) > threshold) t = std::nextafter(t, -INFINITY);
  return t;
}

bool steps_fit_int(int64_t steps) { return steps <= INT_MAX; }

}  // namespace

// ---- launchers ------------------------------------------------------------------------------

int64_t entropy_segments_workspace_bytes(int64_t rows, int64_t steps) {
  const int64_t total = rows * steps;
  if (total == 0) return 0;
  return tile_scan::workspace_bytes(ceil_div(total, kScanTile), sizeof(CountMap));
}

cudaError_t launch_entropy_segments(const EntropySegmentsArgs& args, cudaStream_t stream) {
  if (args.rows * args.steps == 0) return cudaSuccess;
  const Walk walk = tile_scan::make_walk<kThreads, kScanItems>(args.rows, args.steps);
  if (walk.tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  if (const cudaError_t e = tile_scan::reset(args.workspace, walk.tiles, stream)) return e;
  const Threshold threshold{args.threshold, float_threshold_below(args.threshold)};
  const auto blocks = static_cast<unsigned int>(walk.tiles);
  dispatch_float(args.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    entropy_segments_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(args, walk, threshold);
  });
  return cudaGetLastError();
}

int64_t segment_reduce_workspace_bytes(int64_t rows, int64_t steps, SegmentReduction reduce,
                                       bool backward) {
  return table_bytes(rows, steps, reduce_needs(reduce, backward));
}

cudaError_t launch_segment_reduce(const SegmentReduceArgs& args, cudaStream_t stream) {
  const Segmentation& s = args.segments;
  if (s.rows == 0) return cudaSuccess;
  if (!steps_fit_int(s.steps)) return cudaErrorInvalidValue;
  const Tables tables =
      tables_at(args.workspace, s.rows, s.steps, reduce_needs(args.reduce, false));
  return dispatch_float(args.dtype, [&](auto tag) -> cudaError_t {
    using scalar_t = decltype(tag);
    if (s.steps > 0) {
      const TableArgs table{s, s.steps, StridedInput{}, args.values, tables};
      if (const cudaError_t e = build_tables<scalar_t>(table, stream)) return e;
    }
    if (args.reduce == SegmentReduction::kEndMean) {
      reduce_end_mean_kernel<scalar_t>
          <<<grid_for(s.rows, kThreads / 32), kThreads, 0, stream>>>(args, tables);
    } else if (s.steps > 0) {
      reduce_columns_kernel<scalar_t><<<grid_of(s.rows * s.steps), kThreads, 0, stream>>>(
          args, tables);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_segment_reduce_backward(const SegmentReduceBackwardArgs& args,
                                           cudaStream_t stream) {
  const Segmentation& s = args.segments;
  if (s.rows * s.steps == 0) return cudaSuccess;
  if (!steps_fit_int(s.steps)) return cudaErrorInvalidValue;
  const TableNeeds needs = reduce_needs(args.reduce, true);
  const Tables tables = tables_at(args.workspace, s.rows, s.steps, needs);
  if (needs.count || needs.last) {
    const TableArgs table{s, s.steps, StridedInput{}, StridedInput{}, tables};
    if (const cudaError_t e = build_tables<float>(table, stream)) return e;
  }
  const auto launch = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    dispatch_float(args.dtype, [&](auto out_tag) {
      using out_t = decltype(out_tag);
      reduce_backward_kernel<acc_t, out_t>
          <<<grid_of(s.rows * s.steps), kThreads, 0, stream>>>(args, tables);
    });
  };
  if (args.grad_dtype == DType::kFloat64) {
    launch(double{});
  } else {
    launch(float{});
  }
  return cudaGetLastError();
}

int64_t dense_workspace_bytes(int64_t rows, int64_t steps, int64_t max_segments,
                              SegmentSpread spread, bool backward) {
  return table_bytes(rows, dense_width(steps, max_segments), dense_needs(spread, backward));
}

cudaError_t launch_segment_rewards_to_dense(const DenseArgs& args, cudaStream_t stream) {
  const Segmentation& s = args.segments;
  if (s.rows * s.steps == 0) return cudaSuccess;
  if (!steps_fit_int(s.steps)) return cudaErrorInvalidValue;
  const int64_t width = dense_width(s.steps, args.max_segments);
  const TableNeeds needs = dense_needs(args.rule.spread, false);
  const Tables tables = tables_at(args.workspace, s.rows, width, needs);
  if ((needs.count || needs.last) && width > 0) {
    const TableArgs table{s, width, args.mask, StridedInput{}, tables};
    if (const cudaError_t e = build_tables<float>(table, stream)) return e;
  }
  dispatch_float(args.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    dense_kernel<scalar_t><<<grid_of(s.rows * s.steps), kThreads, 0, stream>>>(args, tables);
  });
  return cudaGetLastError();
}

cudaError_t launch_segment_rewards_to_dense_backward(const DenseArgs& args, cudaStream_t stream) {
  const Segmentation& s = args.segments;
  if (s.rows * args.max_segments == 0) return cudaSuccess;
  if (!steps_fit_int(s.steps)) return cudaErrorInvalidValue;
  const int64_t width = dense_width(s.steps, args.max_segments);
  const TableNeeds needs = dense_needs(args.rule.spread, true);
  const Tables tables = tables_at(args.workspace, s.rows, width, needs);
  return dispatch_float(args.dtype, [&](auto tag) -> cudaError_t {
    using scalar_t = decltype(tag);
    if (width > 0) {
      const TableArgs table{s, width, args.mask, args.grad, tables};
      if (const cudaError_t e = build_tables<compute_t<scalar_t>>(table, stream)) return e;
    }
    dense_backward_kernel<scalar_t>
        <<<grid_of(s.rows * args.max_segments), kThreads, 0, stream>>>(args, tables);
    return cudaGetLastError();
  });
}

}  // namespace rlengine::cuda
