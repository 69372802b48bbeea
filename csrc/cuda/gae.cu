// CUDA kernels of rlengine::gae, rlengine::discounted_returns and their backwards: the CPU
// kernels' semantics (csrc/cpu/gae.cpp) as a parallel scan over time.
//
// The forward recurrence runs backwards in time over a row's valid positions (t' is the next
// valid position after t, c = gamma * lam):
//     delta_t = r_t + gamma * V_t' - V_t,    A_t = delta_t + c * A_t'
// Its state just right of a position is (A, nv): the advantage and the value at the next valid
// position. A stretch of positions maps that state affinely:
//     A  <- alpha * A + beta * nv + p,        nv <- (has ? q : nv)
// (alpha = c^k and beta = gamma * c^(k-1) for k valid positions, p the stretch's own advantage
// at its first valid position, q its first valid value, has = k > 0). These maps compose
// associatively (GaeOp::then), so a row is a first-order linear scan; a masked position is the
// identity (factor 1, delta 0, as on the CPU) and its rewards and values are never even loaded,
// so NaN or inf there cannot reach anything. The end of a row is a map that ignores its input
// and yields (A, nv) = (0, last_values[b]): the rows become one flat scan of B*T positions (see
// tile_scan.cuh) whatever B and T are. The backward is the transposed recurrence, forwards in
// time (G = dL/d delta, a one-dimensional affine map G <- alpha * G + p, restarted at each row's
// first position): G_t = dL/dA_t + dL/dR_t + c * G_s, s the previous valid position.
//
// Precision: the state, the maps and the look-back records are float64 whatever the input dtype,
// as on the CPU, and each fp32 result is rounded once. A compensated fp32 scheme would save no
// time here: the kernel moves 17 bytes per position and does about ten fp64 operations on it,
// far below the fp64 rate of the H100/A100 class that the bandwidth is spent on (on GPUs with
// 1/64-rate fp64 it would matter; they are not the target), and a float64 state keeps the
// CPU kernel's property exactly: on a row of 1e5 random steps with gamma = lam = 1 (sums of
// size ~300) the float64 scan is off by ~1e-11 before the one final rounding, a plain fp32 scan
// by ~1e-3.
//
// Launch: one memset of the tile flags, then one kernel with ceil(B*T / 2048) blocks of 256
// threads, 8 positions per thread. A block loads its tile striped (consecutive threads read
// consecutive positions: coalesced for any row stride and alignment; strided and expanded
// inputs read in place), transposes it through shared memory so that each thread owns 8
// consecutive positions, composes their maps in registers, scans the block, chains tiles by
// decoupled look-back, re-runs its 8 steps from the true incoming state and writes its results
// back through shared memory as coalesced stores. Minimum traffic: every input byte read once
// (masked positions read only their mask byte), every output byte written once.
#include <climits>

#include "cuda/common.cuh"
#include "cuda/gae.h"
#include "cuda/tile_scan.cuh"

namespace rlengine::cuda {
namespace {

using tile_scan::Blocked;
using tile_scan::blocked_keep;
using tile_scan::kept;
using tile_scan::padded;
using tile_scan::Walk;

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int kTile = kThreads * kItems;

// Resident blocks per SM asked of the register allocator: 4 (1024 threads) where the kernels fit
// 64 registers without spilling; ptxas for sm_80 needs about 70 for the forward's fp64 maps, so
// 3 there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define RLENGINE_GAE_FORWARD_MIN_BLOCKS 3
#else
#define RLENGINE_GAE_FORWARD_MIN_BLOCKS 4
#endif
constexpr int kBackwardMinBlocks = 4;

template <typename E>
constexpr int kPaddedTile = tile_scan::padded_size<E>(kTile);
using StripedWalk = tile_scan::StripedWalk<kThreads>;
using Positions = Blocked<kItems>;

__device__ __forceinline__ uint32_t striped_valid(const Walk& w, const StripedWalk& at,
                                                  const StridedInput& mask, int count) {
  return tile_scan::striped_valid<kThreads, kItems>(w, at, mask, count);
}

template <typename scalar_t>
__device__ __forceinline__ compute_t<scalar_t> load_at(const StridedInput& in, int64_t row,
                                                       int64_t col) {
  return to_compute(
      static_cast<const scalar_t*>(in.data)[row * in.row_stride + col * in.col_stride]);
}

// ---- the scans' summaries ------------------------------------------------------------------

constexpr uint32_t kHas = 1;  // the stretch has a valid position (q is its first valid value)
constexpr uint32_t kCut = 2;  // the stretch contains a row boundary: it ignores its input

struct GaeMap {
  double alpha, beta, p, q;
  uint32_t bits;
  uint32_t pad;

  __device__ static GaeMap shuffle(const GaeMap& m, int src) {
    return {__shfl_sync(kFullWarp, m.alpha, src), __shfl_sync(kFullWarp, m.beta, src),
            __shfl_sync(kFullWarp, m.p, src), __shfl_sync(kFullWarp, m.q, src),
            __shfl_sync(kFullWarp, m.bits, src), 0u};
  }
  __device__ void store_cg(GaeMap* dst) const {
    __stcg(&dst->alpha, alpha);
    __stcg(&dst->beta, beta);
    __stcg(&dst->p, p);
    __stcg(&dst->q, q);
    __stcg(&dst->bits, bits);
  }
  __device__ static GaeMap load_cg(const GaeMap* src) {
    return {__ldcg(&src->alpha), __ldcg(&src->beta), __ldcg(&src->p), __ldcg(&src->q),
            __ldcg(&src->bits), 0u};
  }
};

// Backwards in time: then(a, b) is the map of a stretch a followed (earlier in time) by b.
struct GaeOp {
  using Map = GaeMap;
  static constexpr bool kDescending = true;

  __device__ static Map identity() { return {1.0, 0.0, 0.0, 0.0, 0u, 0u}; }

  // The end of a row: (A, nv) = (0, bootstrap) whatever comes after it.
  __device__ static Map row_end(double bootstrap) {
    return {0.0, 0.0, 0.0, bootstrap, kHas | kCut, 0u};
  }

  __device__ static Map then(const Map& a, const Map& b) {
    if (b.bits & kCut) return b;
    const bool a_has = (a.bits & kHas) != 0;
    Map r;
    r.alpha = b.alpha * a.alpha;
    r.beta = b.alpha * a.beta + (a_has ? 0.0 : b.beta);
    r.p = b.p + b.alpha * a.p + (a_has ? b.beta * a.q : 0.0);
    r.q = (b.bits & kHas) ? b.q : a.q;
    r.bits = a.bits | b.bits;
    r.pad = 0u;
    return r;
  }

  __device__ static bool is_cut(const Map& m) { return (m.bits & kCut) != 0; }
};

struct GradMap {
  double alpha, p;
  uint32_t cut;
  uint32_t pad;

  __device__ static GradMap shuffle(const GradMap& m, int src) {
    return {__shfl_sync(kFullWarp, m.alpha, src), __shfl_sync(kFullWarp, m.p, src),
            __shfl_sync(kFullWarp, m.cut, src), 0u};
  }
  __device__ void store_cg(GradMap* dst) const {
    __stcg(&dst->alpha, alpha);
    __stcg(&dst->p, p);
    __stcg(&dst->cut, cut);
  }
  __device__ static GradMap load_cg(const GradMap* src) {
    return {__ldcg(&src->alpha), __ldcg(&src->p), __ldcg(&src->cut), 0u};
  }
};

// Forwards in time: G <- alpha * G + p; a row's first position restarts from G = 0.
struct GradOp {
  using Map = GradMap;
  static constexpr bool kDescending = false;

  __device__ static Map identity() { return {1.0, 0.0, 0u, 0u}; }
  __device__ static Map row_start() { return {0.0, 0.0, 1u, 0u}; }

  __device__ static Map then(const Map& a, const Map& b) {
    if (b.cut) return b;
    return {b.alpha * a.alpha, b.alpha * a.p + b.p, a.cut, 0u};
  }

  __device__ static bool is_cut(const Map& m) { return m.cut != 0; }
};

// ---- forward -------------------------------------------------------------------------------

template <typename scalar_t, bool kValues>
__global__ void __launch_bounds__(kThreads, RLENGINE_GAE_FORWARD_MIN_BLOCKS)
    gae_forward_kernel(const GaeForwardArgs args, const Walk walk) {
  using C = compute_t<scalar_t>;
  using Scan = tile_scan::TileScan<GaeOp, kThreads>;
  __shared__ C first[kPaddedTile<C>];                   // rewards, then advantages
  __shared__ C second[kValues ? kPaddedTile<C> : 1];    // values, then returns
  alignas(8) __shared__ uint8_t keep[kTile];
  __shared__ typename Scan::Storage storage;

  const tile_scan::Workspace ws = tile_scan::workspace_at(args.workspace, walk.tiles);
  const int64_t ticket = Scan::take_ticket(ws, storage);
  const int64_t begin = (walk.tiles - 1 - ticket) * kTile;  // the last tile scans first
  const int count = static_cast<int>(min(int64_t{kTile}, walk.total - begin));
  const int tid = threadIdx.x;

  {
    StripedWalk at(walk, begin);
    const uint32_t valid = striped_valid(walk, at, args.mask, count);
#pragma unroll
    for (int s = 0; s < kItems; ++s) {
      const int i = s * kThreads + tid;
      const bool kept = (valid >> s) & 1u;
      C r = 0, v = 0;
      if (kept) {
        r = load_at<scalar_t>(args.rewards, at.row, at.col);
        if constexpr (kValues) v = load_at<scalar_t>(args.values, at.row, at.col);
      }
      first[padded<C>(i)] = r;
      if constexpr (kValues) second[padded<C>(i)] = v;
      keep[i] = kept;
      at.next(walk);
    }
  }
  __syncthreads();

  // From here on each thread reads and writes only its own 8 consecutive slots.
  const Positions pos(walk, begin + int64_t{tid} * kItems);
  const uint64_t keep_bytes = blocked_keep(keep);
  const auto bootstrap = [&](int j) {
    return args.last_values.data ? double(load_at<scalar_t>(args.last_values, pos.row(j), 0))
                                 : 0.0;
  };
  const double gamma = args.gamma, c = args.c;

  GaeMap mine = GaeOp::identity();
#pragma unroll
  for (int j = kItems - 1; j >= 0; --j) {
    if (pos.end(j)) mine = GaeOp::row_end(bootstrap(j));
    if (kept(keep_bytes, j)) {
      // then(mine, one valid step): the step's factor c, its nv coefficient gamma, its own
      // delta r - v and its value.
      const int slot = padded<C>(tid * kItems + j);
      const double r = first[slot], v = kValues ? double(second[slot]) : 0.0;
      const bool has = (mine.bits & kHas) != 0;
      mine.p = (r - v) + c * mine.p + (has ? gamma * mine.q : 0.0);
      mine.beta = c * mine.beta + (has ? 0.0 : gamma);
      mine.alpha = c * mine.alpha;
      mine.q = v;
      mine.bits |= kHas;
    }
  }
  // The tile's first position in scan order is its last one: a row's end needs no carry.
  const int64_t end = begin + count;
  const bool needs_in = end != tile_scan::quotient(end, walk.steps) * walk.steps;
  const GaeMap in = Scan::exclusive_state(mine, ticket, needs_in, ws, storage);

  // The same steps again from the true state, results in place of the inputs. Without a carry
  // (`in` the identity) the first item that matters ends a row and restarts the state.
  double advantage = in.p, next_value = in.q;
#pragma unroll
  for (int j = kItems - 1; j >= 0; --j) {
    if (pos.end(j)) {
      advantage = 0.0;
      next_value = bootstrap(j);
    }
    const int slot = padded<C>(tid * kItems + j);
    C a_out = 0, r_out = 0;
    if (kept(keep_bytes, j)) {
      const double r = first[slot], v = kValues ? double(second[slot]) : 0.0;
      advantage = (r + gamma * next_value - v) + c * advantage;
      next_value = v;
      a_out = static_cast<C>(advantage);
      r_out = static_cast<C>(advantage + v);
    }
    first[slot] = a_out;
    if constexpr (kValues) second[slot] = r_out;
  }
  __syncthreads();

  C* advantages = static_cast<C*>(args.advantages) + begin;
  C* returns = kValues ? static_cast<C*>(args.returns) + begin : nullptr;
#pragma unroll
  for (int s = 0; s < kItems; ++s) {
    const int i = s * kThreads + tid;
    if (i < count) {
      advantages[i] = first[padded<C>(i)];
      if constexpr (kValues) returns[i] = second[padded<C>(i)];
    }
  }
}

// ---- backward ------------------------------------------------------------------------------

template <typename grad_t, bool kValues>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks)
    gae_backward_kernel(const GaeBackwardArgs args, const Walk walk) {
  using Scan = tile_scan::TileScan<GradOp, kThreads>;
  __shared__ grad_t first[kPaddedTile<grad_t>];                 // dL/dA, then dL/dr
  __shared__ grad_t second[kValues ? kPaddedTile<grad_t> : 1];  // dL/dR, then dL/dV
  alignas(8) __shared__ uint8_t keep[kTile];
  __shared__ typename Scan::Storage storage;

  const tile_scan::Workspace ws = tile_scan::workspace_at(args.workspace, walk.tiles);
  const int64_t ticket = Scan::take_ticket(ws, storage);
  const int64_t begin = ticket * kTile;  // the first tile scans first
  const int count = static_cast<int>(min(int64_t{kTile}, walk.total - begin));
  const int tid = threadIdx.x;

  {
    StripedWalk at(walk, begin);
    const uint32_t valid = striped_valid(walk, at, args.mask, count);
#pragma unroll
    for (int s = 0; s < kItems; ++s) {
      const int i = s * kThreads + tid;
      const bool kept = (valid >> s) & 1u;
      grad_t ga = 0, gr = 0;
      // Incoming gradients at masked positions (the gradients of constant zeros) are not read.
      if (kept) {
        if (args.grad_advantages.data) ga = load_at<grad_t>(args.grad_advantages, at.row, at.col);
        if (kValues && args.grad_returns.data) {
          gr = load_at<grad_t>(args.grad_returns, at.row, at.col);
        }
      }
      first[padded<grad_t>(i)] = ga;
      if constexpr (kValues) second[padded<grad_t>(i)] = gr;
      keep[i] = kept;
      at.next(walk);
    }
  }
  __syncthreads();

  // From here on each thread reads and writes only its own 8 consecutive slots.
  const Positions pos(walk, begin + int64_t{tid} * kItems);
  const uint64_t keep_bytes = blocked_keep(keep);
  const double gamma = args.gamma, c = args.c;

  GradMap mine = GradOp::identity();
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (pos.start(j)) mine = GradOp::row_start();
    if (kept(keep_bytes, j)) {
      const int slot = padded<grad_t>(tid * kItems + j);
      const double incoming = double(first[slot]) + (kValues ? double(second[slot]) : 0.0);
      mine.p = incoming + c * mine.p;
      mine.alpha = c * mine.alpha;
    }
  }
  const bool needs_in = begin != tile_scan::quotient(begin, walk.steps) * walk.steps;
  const GradMap in = Scan::exclusive_state(mine, ticket, needs_in, ws, storage);

  grad_t* grad_last = static_cast<grad_t*>(args.grad_last_values);
  double g = in.p;  // G at the previous valid position
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (pos.start(j)) g = 0.0;
    const int slot = padded<grad_t>(tid * kItems + j);
    grad_t gr_out = 0, gv_out = 0;
    if (kept(keep_bytes, j)) {
      const double grad_return = kValues ? double(second[slot]) : 0.0;
      const double incoming = double(first[slot]) + grad_return;
      const double previous = g;
      g = incoming + c * previous;
      gr_out = static_cast<grad_t>(g);
      // V_t enters R_t (+1), delta_t (-1) and the previous valid position's delta (+gamma).
      gv_out = static_cast<grad_t>(grad_return - g + gamma * previous);
    }
    // last_values is V after the row's last valid position: it enters that position's delta.
    if (pos.end(j)) grad_last[pos.row(j)] = static_cast<grad_t>(gamma * g);
    first[slot] = gr_out;
    if constexpr (kValues) second[slot] = gv_out;
  }
  __syncthreads();

  grad_t* grad_rewards = static_cast<grad_t*>(args.grad_rewards) + begin;
  grad_t* grad_values = kValues ? static_cast<grad_t*>(args.grad_values) + begin : nullptr;
#pragma unroll
  for (int s = 0; s < kItems; ++s) {
    const int i = s * kThreads + tid;
    if (i < count) {
      grad_rewards[i] = first[padded<grad_t>(i)];
      if constexpr (kValues) grad_values[i] = second[padded<grad_t>(i)];
    }
  }
}

}  // namespace

int64_t gae_workspace_bytes(int64_t rows, int64_t steps, bool backward) {
  const int64_t total = rows * steps;
  if (total == 0) return 0;
  return tile_scan::workspace_bytes(ceil_div(total, kTile),
                                    backward ? sizeof(GradMap) : sizeof(GaeMap));
}

cudaError_t launch_gae_forward(const GaeForwardArgs& args, cudaStream_t stream) {
  if (args.rows * args.steps == 0) return cudaSuccess;
  const Walk walk = tile_scan::make_walk<kThreads, kItems>(args.rows, args.steps);
  if (walk.tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  if (const cudaError_t error = tile_scan::reset(args.workspace, walk.tiles, stream)) return error;
  const auto blocks = static_cast<unsigned int>(walk.tiles);
  dispatch_float(args.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (args.values.data) {
      gae_forward_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(args, walk);
    } else {
      gae_forward_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(args, walk);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_gae_backward(const GaeBackwardArgs& args, cudaStream_t stream) {
  if (args.rows * args.steps == 0) return cudaSuccess;
  if (args.dtype != DType::kFloat32 && args.dtype != DType::kFloat64) return cudaErrorInvalidValue;
  const Walk walk = tile_scan::make_walk<kThreads, kItems>(args.rows, args.steps);
  if (walk.tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  if (const cudaError_t error = tile_scan::reset(args.workspace, walk.tiles, stream)) return error;
  const auto blocks = static_cast<unsigned int>(walk.tiles);
  const auto launch = [&](auto tag) {
    using grad_t = decltype(tag);
    if (args.with_values) {
      gae_backward_kernel<grad_t, true><<<blocks, kThreads, 0, stream>>>(args, walk);
    } else {
      gae_backward_kernel<grad_t, false><<<blocks, kThreads, 0, stream>>>(args, walk);
    }
  };
  if (args.dtype == DType::kFloat64) {
    launch(double{});
  } else {
    launch(float{});
  }
  return cudaGetLastError();
}

}  // namespace rlengine::cuda
