// A single-pass scan over the flattened rows of a [B, T] batch, one tile of consecutive positions
// per block, tiles chained by decoupled look-back (used by gae.cu and segments.cu; .cu only).
//
// The scans here are first-order recurrences along each row, restarted at every row boundary.
// Each is written as an associative "then" on summaries (Op::Map): then(a, b) is the summary of
// a stretch a followed, in scan order, by a stretch b. A row boundary is a summary that ignores
// what came before it (its `cut` flag), so the whole batch is one flat scan of B*T positions and
// its tiles need not align with rows: every shape (B = 1e5 rows of T = 1, or one row of 1e6)
// becomes ceil(B*T / kTile) equal tiles that fill the GPU, and a chain of look-backs stops at the
// nearest row boundary.
//
// Per block (one tile):
//   1. thread 0 draws a ticket from a global counter: tickets follow the scan order (the first
//      tile to scan gets ticket 0), so every tile a block waits for belongs to a block that has
//      already started, and the spin-waits below cannot deadlock whatever order the hardware
//      schedules blocks in;
//   2. the kernel loads its tile (coalesced) and gives each thread the summary of its items;
//   3. a block-wide exclusive scan of those summaries (warp shuffles, then one value per warp
//      through shared memory) gives each thread the summary of the tile before it;
//   4. warp 0 publishes the tile's summary (flag kAggregate, or kRowBoundary when it contains a
//      row boundary), then looks back 32 predecessors at a time, composing their summaries
//      until it meets a row boundary (see look_back: deterministic results);
//   5. each thread gets the state entering its items: then(tile_in, thread_exclusive).
// Records are written with L2-only stores and published by a release store of the flag; readers
// take the flag with an acquire load, then read the record from L2, so no stale L1 line is read.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/strided.h"

namespace rlengine::cuda::tile_scan {

// A tile's flag: its summary is not published yet, published, or published and containing a row
// boundary (so it is the state after the tile, whatever came before).
enum : uint32_t { kEmpty = 0, kAggregate = 1, kRowBoundary = 2 };

// Workspace: [ticket counter][flags: one per tile][records: one summary per tile]. The counter
// and the flags must be zero before each launch (reset()); records need no reset.
struct Workspace {
  uint32_t* counter;
  uint32_t* flags;
  void* records;
};

__host__ __device__ inline int64_t flags_bytes(int64_t tiles) {
  return (tiles + 1) * int64_t(sizeof(uint32_t));
}

__host__ __device__ inline int64_t records_offset(int64_t tiles) {
  return (flags_bytes(tiles) + 15) / 16 * 16;
}

__host__ __device__ inline int64_t workspace_bytes(int64_t tiles, int64_t map_bytes) {
  return records_offset(tiles) + tiles * map_bytes;
}

__host__ __device__ inline Workspace workspace_at(void* base, int64_t tiles) {
  auto* bytes = static_cast<unsigned char*>(base);
  return {reinterpret_cast<uint32_t*>(bytes), reinterpret_cast<uint32_t*>(bytes) + 1,
          bytes + records_offset(tiles)};
}

inline cudaError_t reset(void* base, int64_t tiles, cudaStream_t stream) {
  return cudaMemsetAsync(base, 0, static_cast<size_t>(flags_bytes(tiles)), stream);
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Op requirements:
//   using Map = ...;                 summaries; Map::shuffle(m, src_lane), m.store_cg(Map*),
//                                    Map::load_cg(const Map*)
//   static constexpr bool kDescending;   scan order: descending positions (a recurrence run
//                                        backwards in time) or ascending
//   static Map identity();  static Map then(const Map& a, const Map& b);
//   static bool is_cut(const Map& m);   m ignores everything before it (a row boundary inside)
template <class Op, int kThreads>
struct TileScan {
  using Map = typename Op::Map;
  static constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0 && kWarps >= 1 && kWarps <= 32, "kThreads: 32..1024");

  struct Storage {
    Map warp_total[kWarps];  // indexed by the warp's rank in scan order
    Map tile_in;
    int64_t ticket;
  };

  // Rank of this thread / lane / warp in scan order.
  __device__ static int rank_of(int index, int count) {
    return Op::kDescending ? count - 1 - index : index;
  }

  // Thread 0 draws the tile's ticket: its position in scan order. Ends with a barrier.
  __device__ static int64_t take_ticket(const Workspace& ws, Storage& s) {
    if (threadIdx.x == 0) s.ticket = atomicAdd(ws.counter, 1u);
    __syncthreads();
    return s.ticket;
  }

  // Returns the state entering this thread's first item (in scan order): a cut Map, except where
  // nothing comes before the tile in scan order (ticket 0) or `needs_in` is false (the tile's
  // first item in scan order starts a row), where it is the identity and the caller's first
  // item must restart the recurrence. Called by every thread of the block.
  __device__ static Map exclusive_state(const Map& mine, int64_t ticket, bool needs_in,
                                        const Workspace& ws, Storage& s) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int lane_rank = rank_of(lane, 32), warp_rank = rank_of(warp, kWarps);
    // The lane `offset` ranks earlier in scan order (valid where lane_rank >= offset).
    const auto earlier = [&](int offset) {
      return Op::kDescending ? lane + offset : lane - offset;
    };

    Map inclusive = mine;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const Map other = Map::shuffle(inclusive, earlier(offset) & 31);
      if (lane_rank >= offset) inclusive = Op::then(other, inclusive);
    }
    Map exclusive = Map::shuffle(inclusive, earlier(1) & 31);
    if (lane_rank == 0) exclusive = Op::identity();
    if (lane_rank == 31) s.warp_total[warp_rank] = inclusive;
    __syncthreads();

    if (warp == 0) {
      Map aggregate = Op::identity();
      for (int u = 0; u < kWarps; ++u) aggregate = Op::then(aggregate, s.warp_total[u]);
      if (lane == 0) {
        aggregate.store_cg(&static_cast<Map*>(ws.records)[ticket]);
        store_release(&ws.flags[ticket], Op::is_cut(aggregate) ? kRowBoundary : kAggregate);
      }
      Map tile_in = Op::identity();
      if (needs_in && ticket > 0) tile_in = look_back(ticket, ws);
      if (lane == 0) s.tile_in = tile_in;
    }
    __syncthreads();
    // (composed after the look-back, so that it holds no registers across it)
    Map in = s.tile_in;
    for (int u = 0; u < warp_rank; ++u) in = Op::then(in, s.warp_total[u]);
    return Op::then(in, exclusive);
  }

  // Warp 0: the state entering tile `ticket` (cut): the aggregates of its predecessors composed
  // back to the nearest one with a row boundary, 32 predecessors per round (lane 0 the nearest).
  // Predecessors hold smaller tickets, so their blocks are running or done and publish their
  // aggregate without waiting on anything: the spin ends. Only row boundaries end the look-back
  // (no tile publishes a composed inclusive value), so every tile composes the same summaries
  // in the same order on every run: the results are bitwise reproducible, at the price of
  // ceil(tiles before it in its row / 32) rounds, one round for rows of up to 32 tiles.
  __device__ static Map look_back(int64_t ticket, const Workspace& ws) {
    const int lane = threadIdx.x & 31;
    const Map* records = static_cast<const Map*>(ws.records);
    Map after = Op::identity();  // the predecessors between the current window and the tile
    for (int64_t nearest = ticket - 1;; nearest -= 32) {
      const int64_t p = nearest - lane;
      uint32_t flag = kRowBoundary;
      Map x = Op::identity();
      // (p < 0, before the first tile, is never reached: the first tile in scan order starts
      // with a row boundary; it would count as an empty boundary.)
      if (p >= 0) {
        flag = load_acquire(&ws.flags[p]);
        while (flag == kEmpty) {
          __nanosleep(64);
          flag = load_acquire(&ws.flags[p]);
        }
        x = Map::load_cg(&records[p]);
      }
      const unsigned boundaries = __ballot_sync(kFullWarp, flag == kRowBoundary);
      const int first = boundaries ? __ffs(boundaries) - 1 : 32;
      if (lane > first) x = Op::identity();
      // Compose the window in scan order (higher lanes are earlier) by a fixed tree.
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const Map other = Map::shuffle(x, (lane + offset) & 31);
        if (lane + offset < 32) x = Op::then(other, x);
      }
      after = Op::then(Map::shuffle(x, 0), after);
      if (first < 32) return after;
    }
  }
};

// ---- walking the flat positions f = b * T + t --------------------------------------------

// a / b for a >= 0 and b > 0: a 32-bit division where both fit (the common case) instead of the
// much longer 64-bit division subroutine.
__device__ __forceinline__ int64_t quotient(int64_t a, int64_t b) {
  if (((a | b) >> 31) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

struct Walk {
  int64_t tiles;
  int64_t total;        // B * T
  int64_t steps;        // T
  int64_t stride_rows;  // kThreads = stride_rows * T + stride_cols: one striped step
  int64_t stride_cols;
};

template <int kThreads, int kItems>
inline Walk make_walk(int64_t rows, int64_t steps) {
  const int64_t total = rows * steps;
  return {ceil_div(total, int64_t{kThreads} * kItems), total, steps, kThreads / steps,
          kThreads % steps};
}

// Walks a thread's striped items: item s is position begin + s * kThreads + threadIdx.x.
template <int kThreads>
struct StripedWalk {
  int64_t row, col;
  __device__ StripedWalk(const Walk& w, int64_t begin) {
    const int64_t f = begin + threadIdx.x;
    row = quotient(f, w.steps);
    col = f - row * w.steps;
  }
  __device__ void next(const Walk& w) {
    col += w.stride_cols;
    row += w.stride_rows;
    if (col >= w.steps) {
      col -= w.steps;
      ++row;
    }
  }
};

// Bit s set where striped item s is in the tile (index < count) and its mask byte is nonzero.
// The mask is read first, on its own, so that the other inputs are loaded only at valid
// positions.
template <int kThreads, int kItems>
__device__ __forceinline__ uint32_t striped_valid(const Walk& w, StripedWalk<kThreads> at,
                                                  const StridedInput& mask, int count) {
  uint32_t valid = 0;
#pragma unroll
  for (int s = 0; s < kItems; ++s) {
    if (s * kThreads + int(threadIdx.x) < count &&
        static_cast<const uint8_t*>(mask.data)[at.row * mask.row_stride +
                                               at.col * mask.col_stride] != 0) {
      valid |= 1u << s;
    }
    at.next(w);
  }
  return valid;
}

// The row boundaries among a thread's blocked items (positions first .. first + kItems - 1):
// bit j of `starts` / `ends` is set where item j is a row's first / last position, and item j
// lies in row first_row + (number of starts among items 1..j).
template <int kItems>
struct Blocked {
  static_assert(kItems <= 8, "one 8-byte read of the mask bytes (blocked_keep)");
  int64_t first_row;
  uint32_t starts = 0;
  uint32_t ends = 0;
  __device__ Blocked(const Walk& w, int64_t first) {
    first_row = quotient(first, w.steps);
    int64_t t = first - first_row * w.steps;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (first + j < w.total) {
        if (t == 0) starts |= 1u << j;
        if (t == w.steps - 1) ends |= 1u << j;
      }
      if (++t == w.steps) t = 0;
    }
  }
  __device__ bool start(int j) const { return (starts >> j) & 1u; }
  __device__ bool end(int j) const { return (ends >> j) & 1u; }
  __device__ int64_t row(int j) const { return first_row + __popc(starts & ((2u << j) - 2u)); }
};

// Shared-memory slots with one pad element per 128 bytes: the blocked reads and writes (thread
// i touches items 8i..8i+7) then fall in distinct banks, and the striped ones stay consecutive.
template <typename E>
__host__ __device__ constexpr int padded_size(int n) {
  return n + n / int(128 / sizeof(E));
}

template <typename E>
__device__ __forceinline__ int padded(int i) {
  return i + i / int(128 / sizeof(E));
}

// The 8 bytes (one per item) of a thread's blocked items in a byte array of the tile, from one
// 8-byte shared-memory read (the array must be 8-byte aligned).
__device__ __forceinline__ uint64_t blocked_keep(const uint8_t* bytes) {
  return reinterpret_cast<const uint64_t*>(bytes)[threadIdx.x];
}

__device__ __forceinline__ uint32_t kept(uint64_t bytes, int j) {
  return static_cast<uint32_t>(bytes >> (8 * j)) & 0xffu;
}

}  // namespace rlengine::cuda::tile_scan
