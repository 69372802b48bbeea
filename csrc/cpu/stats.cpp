// CPU kernels of rlengine::masked_mean, masked_var, masked_whiten and their backward ops.
//
// Numerics: every sum is accumulated in double (the kernels are memory-bound, so the wider
// accumulator is free), and the variance is two-pass: the masked mean first, then the sum of
// squared deviations from it. The one-pass E[x^2] - E[x]^2 loses every digit of the variance
// when the data share a large offset (values around 1e6 with unit spread); two passes do not.
// Element-wise outputs are formed in double from the double statistics and rounded once.
//
// Parallelism and determinism: x is viewed as [outer, len, inner] around the reduced dim
// (dim=None is outer = inner = 1).
//  * inner == 1 (the reduced dim is the last, or all of x): each row is cut into blocks of
//    kBlock elements whose partial sums are computed in parallel and then added in block
//    order. The result depends on kBlock, never on the number of threads.
//  * inner > 1: a task owns a tile of kTile adjacent output columns and walks the len rows
//    of its tile, accumulating per column; no copy (movedim + contiguous) of x is needed, and
//    each output is computed by exactly one task, in a fixed order.
// Element-wise passes (whiten, the gradients) are parallel over flat element ranges.
// Masked-out elements are never used: they are selected away (a blend, not a multiply), so a
// NaN or inf there cannot reach a sum or an output.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/stats_checks.h"
#include "cpu/vec_math.h"

// ---- vectorized chunk primitives ------------------------------------------------------------
// Each works on n <= kChunk contiguous elements, x in fp32 (every non-double dtype is widened
// to fp32 first) or fp64; m is the mask's bytes (any nonzero byte counts as true). They have
// external linkage in a family-specific namespace because target_clones needs an ifunc symbol.
//
// Reductions: GCC sizes `omp simd` loops before target_clones makes the AVX clones, so a
// reduction whose narrowest type is the mask byte is capped at 16 lanes of 16-byte vectors even
// in the AVX-512 clone (measured: 1.7x slower). With GCC the reduction loops are therefore plain
// loops in functions that allow floating-point reassociation (and nothing else of fast-math:
// NaN and inf keep their meaning), which the vectorizer then runs at the clone's full width.
// Either way the order of the additions is fixed when the library is compiled, so results are
// reproducible run to run. Element-wise loops carry no reduction and need neither.
#if defined(__GNUC__) && !defined(__clang__)
#define STATS_REASSOCIATE \
  __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math")))
#define STATS_REDUCE(...)
#else
#define STATS_REASSOCIATE
#define STATS_REDUCE(...) RLENGINE_SIMD_REDUCE(__VA_ARGS__)
#endif

namespace rlengine::cpu::stats {

struct Sums {
  double a = 0.0;  // the first sum of the pass (sum of x, or of squared deviations)
  double b = 0.0;  // the second (sum of the incoming gradient, or of g * (x - mean))
  int64_t count = 0;

  Sums& operator+=(const Sums& o) {
    a += o.a;
    b += o.b;
    count += o.count;
    return *this;
  }
};

// Counts of one chunk fit in 32 bits (n <= kChunk); narrower lanes vectorize better.
template <typename T>
RLENGINE_INLINE STATS_REASSOCIATE Sums sum_count_body(const T* x, const uint8_t* m, int64_t n) {
  double s = 0.0;
  int32_t c = 0;
  STATS_REDUCE(+ : s, c)
  for (int64_t i = 0; i < n; ++i) {
    s += static_cast<double>(keep_or_zero(x[i], m[i]));
    c += m[i] != 0;
  }
  return {s, 0.0, c};
}

template <typename T>
RLENGINE_INLINE STATS_REASSOCIATE Sums sum2_count_body(const T* x, const T* g, const uint8_t* m,
                                                    int64_t n) {
  double sx = 0.0, sg = 0.0;
  int32_t c = 0;
  STATS_REDUCE(+ : sx, sg, c)
  for (int64_t i = 0; i < n; ++i) {
    sx += static_cast<double>(keep_or_zero(x[i], m[i]));
    sg += static_cast<double>(keep_or_zero(g[i], m[i]));
    c += m[i] != 0;
  }
  return {sx, sg, c};
}

template <typename T>
RLENGINE_INLINE STATS_REASSOCIATE double sum_sq_dev_body(const T* x, const uint8_t* m, int64_t n,
                                                      double mu) {
  double s = 0.0;
  STATS_REDUCE(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - mu;
    s += keep_or_zero(d * d, m[i]);
  }
  return s;
}

template <typename T>
RLENGINE_INLINE STATS_REASSOCIATE Sums sum_sq_dev_cross_body(const T* x, const T* g,
                                                          const uint8_t* m, int64_t n,
                                                          double mu) {
  double sxx = 0.0, sgx = 0.0;
  STATS_REDUCE(+ : sxx, sgx)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - mu;
    sxx += keep_or_zero(d * d, m[i]);
    sgx += keep_or_zero(static_cast<double>(g[i]) * d, m[i]);
  }
  return {sxx, sgx, 0};
}

// out = m ? (x - mu) * scale + shift : 0
template <typename T>
RLENGINE_INLINE void affine_body(const T* __restrict__ x, const uint8_t* __restrict__ m,
                              T* __restrict__ out, int64_t n, double mu, double scale,
                              double shift) {
  for (int64_t i = 0; i < n; ++i) {
    const double y = (static_cast<double>(x[i]) - mu) * scale + shift;
    out[i] = keep_or_zero(static_cast<T>(y), m[i]);
  }
}

// The whitening gradient: out = m ? s * g - (x - mu) * k + shift : 0
template <typename T>
RLENGINE_INLINE void whiten_grad_body(const T* __restrict__ x, const T* __restrict__ g,
                                   const uint8_t* __restrict__ m, T* __restrict__ out, int64_t n,
                                   double mu, double s, double k, double shift) {
  for (int64_t i = 0; i < n; ++i) {
    const double y = s * static_cast<double>(g[i]) - (static_cast<double>(x[i]) - mu) * k + shift;
    out[i] = keep_or_zero(static_cast<T>(y), m[i]);
  }
}

template <typename T>
RLENGINE_INLINE void fill_body(const uint8_t* __restrict__ m, T* __restrict__ out, int64_t n,
                            double value) {
  const T v = static_cast<T>(value);
  for (int64_t i = 0; i < n; ++i) out[i] = keep_or_zero(v, m[i]);
}

// Column variants: element j of the row segment belongs to output column j. The accumulators
// are per column, so these are element-wise loops too.
template <typename T>
RLENGINE_INLINE void col_sum_count_body(const T* __restrict__ x, const uint8_t* __restrict__ m,
                                     int64_t n, double* __restrict__ sum,
                                     int64_t* __restrict__ count) {
  for (int64_t j = 0; j < n; ++j) {
    sum[j] += static_cast<double>(keep_or_zero(x[j], m[j]));
    count[j] += m[j] != 0;
  }
}

template <typename T>
RLENGINE_INLINE void col_sum_sq_dev_body(const T* __restrict__ x, const uint8_t* __restrict__ m,
                                      int64_t n, const double* __restrict__ mu,
                                      double* __restrict__ acc) {
  for (int64_t j = 0; j < n; ++j) {
    const double d = static_cast<double>(x[j]) - mu[j];
    acc[j] += keep_or_zero(d * d, m[j]);
  }
}

RLENGINE_INLINE void col_count_body(const uint8_t* __restrict__ m, int64_t n,
                                 int64_t* __restrict__ count) {
  for (int64_t j = 0; j < n; ++j) count[j] += m[j] != 0;
}

// out = m ? (x - mu) * scale : 0, per column
template <typename T>
RLENGINE_INLINE void col_scaled_dev_body(const T* __restrict__ x, const uint8_t* __restrict__ m,
                                      T* __restrict__ out, int64_t n,
                                      const double* __restrict__ mu,
                                      const double* __restrict__ scale) {
  for (int64_t j = 0; j < n; ++j) {
    const double y = (static_cast<double>(x[j]) - mu[j]) * scale[j];
    out[j] = keep_or_zero(static_cast<T>(y), m[j]);
  }
}

template <typename T>
RLENGINE_INLINE void col_fill_body(const uint8_t* __restrict__ m, T* __restrict__ out, int64_t n,
                                const double* __restrict__ value) {
  for (int64_t j = 0; j < n; ++j) out[j] = keep_or_zero(static_cast<T>(value[j]), m[j]);
}

#define STATS_CLONES_R RLENGINE_SIMD_CLONES STATS_REASSOCIATE
#define STATS_PRIMITIVES(T)                                                                     \
  STATS_CLONES_R Sums sum_count(const T* x, const uint8_t* m, int64_t n) {                      \
    return sum_count_body(x, m, n);                                                             \
  }                                                                                             \
  STATS_CLONES_R Sums sum2_count(const T* x, const T* g, const uint8_t* m, int64_t n) {         \
    return sum2_count_body(x, g, m, n);                                                         \
  }                                                                                             \
  STATS_CLONES_R double sum_sq_dev(const T* x, const uint8_t* m, int64_t n, double mu) {        \
    return sum_sq_dev_body(x, m, n, mu);                                                        \
  }                                                                                             \
  STATS_CLONES_R Sums sum_sq_dev_cross(const T* x, const T* g, const uint8_t* m, int64_t n,     \
                                       double mu) {                                             \
    return sum_sq_dev_cross_body(x, g, m, n, mu);                                               \
  }                                                                                             \
  RLENGINE_SIMD_CLONES void affine(const T* x, const uint8_t* m, T* out, int64_t n, double mu,  \
                                   double scale, double shift) {                                \
    affine_body(x, m, out, n, mu, scale, shift);                                                \
  }                                                                                             \
  RLENGINE_SIMD_CLONES void whiten_grad(const T* x, const T* g, const uint8_t* m, T* out,       \
                                        int64_t n, double mu, double s, double k,               \
                                        double shift) {                                         \
    whiten_grad_body(x, g, m, out, n, mu, s, k, shift);                                         \
  }                                                                                             \
  RLENGINE_SIMD_CLONES void fill(const uint8_t* m, T* out, int64_t n, double value) {           \
    fill_body(m, out, n, value);                                                                \
  }                                                                                             \
  RLENGINE_SIMD_CLONES void col_sum_count(const T* x, const uint8_t* m, int64_t n, double* sum, \
                                          int64_t* count) {                                     \
    col_sum_count_body(x, m, n, sum, count);                                                    \
  }                                                                                             \
  RLENGINE_SIMD_CLONES void col_sum_sq_dev(const T* x, const uint8_t* m, int64_t n,             \
                                           const double* mu, double* acc) {                     \
    col_sum_sq_dev_body(x, m, n, mu, acc);                                                      \
  }                                                                                             \
  RLENGINE_SIMD_CLONES void col_scaled_dev(const T* x, const uint8_t* m, T* out, int64_t n,     \
                                           const double* mu, const double* scale) {             \
    col_scaled_dev_body(x, m, out, n, mu, scale);                                               \
  }                                                                                             \
  RLENGINE_SIMD_CLONES void col_fill(const uint8_t* m, T* out, int64_t n, const double* value) { \
    col_fill_body(m, out, n, value);                                                            \
  }

STATS_PRIMITIVES(float)
STATS_PRIMITIVES(double)
#undef STATS_PRIMITIVES

RLENGINE_SIMD_CLONES void col_count(const uint8_t* m, int64_t n, int64_t* count) {
  col_count_body(m, n, count);
}
#undef STATS_CLONES_R

}  // namespace rlengine::cpu::stats

namespace rlengine::cpu {
namespace {

using stats::Sums;

constexpr int64_t kChunk = 2048;   // elements widened to fp32 at a time (8 KiB, stays in L1)
constexpr int64_t kBlock = 16384;  // elements per partial sum of a reduced row
constexpr int64_t kTile = 256;     // output columns per task when the reduced dim is not last

static_assert(kBlock % kChunk == 0 && kTile <= kChunk);

template <typename scalar_t>
constexpr bool kIsCompute = std::is_same_v<scalar_t, compute_t<scalar_t>>;

// n elements of x as compute_t: in place for fp32/fp64, widened into buffer for 16-bit types.
template <typename scalar_t>
const compute_t<scalar_t>* load(const scalar_t* x, int64_t n, float* buffer) {
  if constexpr (kIsCompute<scalar_t>) {
    return x;
  } else {
    to_float(x, buffer, n);
    return buffer;
  }
}

// Where a primitive writes n elements of an out_t output: out itself, or buffer (then narrowed
// into out by finish_store) for 16-bit gradients.
template <typename out_t>
compute_t<out_t>* store_target(out_t* out, float* buffer) {
  if constexpr (kIsCompute<out_t>) {
    return out;
  } else {
    return buffer;
  }
}

template <typename out_t>
void finish_store(out_t* out, const float* buffer, int64_t n) {
  if constexpr (!kIsCompute<out_t>) from_float(buffer, out, n);
}

inline double divisor(int64_t count, bool unbiased) {
  return static_cast<double>(std::max<int64_t>(unbiased ? count - 1 : count, 1));
}

// x viewed as [outer, len, inner] around the reduced dim; dim=None reduces everything.
struct Geometry {
  int64_t outer = 1;
  int64_t len = 0;
  int64_t inner = 1;
};

Geometry geometry_of(const at::Tensor& x, std::optional<int64_t> dim) {
  Geometry g;
  if (!dim) {
    g.len = x.numel();
    return g;
  }
  for (int64_t d = 0; d < *dim; ++d) g.outer *= x.size(d);
  g.len = x.size(*dim);
  for (int64_t d = *dim + 1; d < x.dim(); ++d) g.inner *= x.size(d);
  return g;
}

// ---- argument guards (the Python wrappers raise the user-facing errors first) ---------------

using stats_checks::check_eps;
using stats_checks::reduced_shape;
using stats_checks::wrap_dim;

void check_x_and_mask(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  stats_checks::check_x_and_mask(op, x, mask, at::Device(at::kCPU));
}

const uint8_t* mask_bytes(const at::Tensor& mask) {
  return reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
}

// ---- parallel walkers -------------------------------------------------------------------------

// Reduces each of `rows` contiguous rows of length len: block(row, begin, end) gives the Sums of
// the flat range [begin, end) inside that row, finish(row, sums) receives each row's total.
// Partials of a long row are added in block order, so the totals do not depend on the thread
// count; rows of at most kBlock elements are finished inside their task.
template <typename BlockFn, typename FinishFn>
void reduce_rows(int64_t rows, int64_t len, const BlockFn& block, const FinishFn& finish) {
  if (rows == 0) return;
  const int64_t blocks = len <= kBlock ? 1 : (len + kBlock - 1) / kBlock;
  const int64_t block_len = std::max<int64_t>(1, std::min(len, kBlock));
  const int64_t grain = rows_per_task(block_len, grain::kStats);
  if (blocks == 1) {
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) finish(r, block(r, r * len, (r + 1) * len));
    });
    return;
  }
  std::vector<Sums> partial(static_cast<size_t>(rows * blocks));
  at::parallel_for(0, rows * blocks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / blocks, k = t % blocks;
      const int64_t begin = r * len + k * kBlock;
      partial[t] = block(r, begin, r * len + std::min(len, (k + 1) * kBlock));
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    Sums total;
    for (int64_t k = 0; k < blocks; ++k) total += partial[r * blocks + k];
    finish(r, total);
  }
}

// Calls fn(row, begin, end) on parallel flat ranges of `rows` rows of length len, each range
// inside one row and at most kChunk long.
template <typename Fn>
void map_rows(int64_t rows, int64_t len, const Fn& fn) {
  if (rows == 0 || len == 0) return;
  at::parallel_for(0, rows * len, grain::kStats, [&](int64_t b, int64_t e) {
    for (int64_t pos = b; pos < e;) {
      const int64_t r = pos / len;
      const int64_t end = std::min({e, (r + 1) * len, pos + kChunk});
      fn(r, pos, end);
      pos = end;
    }
  });
}

// Calls fn(o, i0, n) for every tile of n <= kTile adjacent columns [i0, i0 + n) of each outer
// index o, in parallel; the tile's elements are at (o * len + l) * inner + i0 + [0, n).
template <typename Fn>
void for_tiles(const Geometry& g, const Fn& fn) {
  const int64_t tiles = (g.inner + kTile - 1) / kTile;
  if (g.outer == 0 || tiles == 0) return;
  const int64_t tile_elems = std::max<int64_t>(1, g.len * std::min(g.inner, kTile));
  const int64_t grain = rows_per_task(tile_elems, grain::kStats);
  at::parallel_for(0, g.outer * tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t / tiles, i0 = (t % tiles) * kTile;
      fn(o, i0, std::min(kTile, g.inner - i0));
    }
  });
}

// Sum and count of the masked x over flat [begin, end).
template <typename scalar_t>
Sums block_sum_count(const scalar_t* x, const uint8_t* m, int64_t begin, int64_t end) {
  float buffer[kIsCompute<scalar_t> ? 1 : kChunk];
  Sums total;
  for (int64_t s = begin; s < end; s += kChunk) {
    const int64_t n = std::min(kChunk, end - s);
    total += stats::sum_count(load(x + s, n, buffer), m + s, n);
  }
  return total;
}

// Sum of squared deviations of the masked x from mu over flat [begin, end).
template <typename scalar_t>
double block_sum_sq_dev(const scalar_t* x, const uint8_t* m, int64_t begin, int64_t end,
                        double mu) {
  float buffer[kIsCompute<scalar_t> ? 1 : kChunk];
  double total = 0.0;
  for (int64_t s = begin; s < end; s += kChunk) {
    const int64_t n = std::min(kChunk, end - s);
    total += stats::sum_sq_dev(load(x + s, n, buffer), m + s, n, mu);
  }
  return total;
}

// Masked mean and count of each row of x viewed as g (inner == 1); calls finish(row, mean,
// count) once per row. For inner > 1, tile_means computes them per column tile instead.
template <typename scalar_t, typename FinishFn>
void row_means(const scalar_t* x, const uint8_t* m, const Geometry& g, const FinishFn& finish) {
  reduce_rows(
      g.outer, g.len, [&](int64_t, int64_t b, int64_t e) { return block_sum_count(x, m, b, e); },
      [&](int64_t r, const Sums& s) {
        finish(r, s.a / static_cast<double>(std::max<int64_t>(s.count, 1)), s.count);
      });
}

// Column tile statistics: mean and count of the masked x per column of the tile.
template <typename scalar_t>
void tile_means(const scalar_t* x, const uint8_t* m, const Geometry& g, int64_t o, int64_t i0,
                int64_t n, double* mean, int64_t* count, float* buffer) {
  std::fill(mean, mean + n, 0.0);
  std::fill(count, count + n, int64_t{0});
  for (int64_t l = 0; l < g.len; ++l) {
    const int64_t pos = (o * g.len + l) * g.inner + i0;
    stats::col_sum_count(load(x + pos, n, buffer), m + pos, n, mean, count);
  }
  for (int64_t j = 0; j < n; ++j) mean[j] /= static_cast<double>(std::max<int64_t>(count[j], 1));
}

// ---- masked_mean ------------------------------------------------------------------------------

at::Tensor masked_mean_cpu(const at::Tensor& x_in, const at::Tensor& mask_in,
                           std::optional<int64_t> dim_in) {
  constexpr const char* op = "masked_mean";
  check_x_and_mask(op, x_in, mask_in);
  const auto dim = wrap_dim(op, x_in, dim_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const Geometry g = geometry_of(x, dim);
  at::Tensor out = at::empty(reduced_shape(x, dim), x.options().dtype(result_dtype(x)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using out_t = compute_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask_bytes(mask);
    out_t* outp = out.mutable_data_ptr<out_t>();
    if (g.inner == 1) {
      row_means(xp, mp, g, [&](int64_t r, double mean, int64_t) {
        outp[r] = static_cast<out_t>(mean);
      });
      return;
    }
    for_tiles(g, [&](int64_t o, int64_t i0, int64_t n) {
      double mean[kTile];
      int64_t count[kTile];
      float buffer[kIsCompute<scalar_t> ? 1 : kTile];
      tile_means(xp, mp, g, o, i0, n, mean, count, buffer);
      for (int64_t j = 0; j < n; ++j) outp[o * g.inner + i0 + j] = static_cast<out_t>(mean[j]);
    });
  });
  return out;
}

// d mean / d x_i = [m_i] / count: the incoming gradient of x_i's output spread over its
// selected elements; x itself is not needed.
at::Tensor masked_mean_backward_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                    std::optional<int64_t> dim_in, at::ScalarType dtype) {
  constexpr const char* op = "masked_mean_backward";
  check_cpu(op, "grad", grad_in);
  check_cpu(op, "mask", mask_in);
  check_bool(op, "mask", mask_in);
  check_floating(op, "grad", grad_in);
  check_floating(op, "dtype", dtype);
  const auto dim = wrap_dim(op, mask_in, dim_in);
  check_shape(op, "grad", grad_in, reduced_shape(mask_in, dim));
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  const Geometry g = geometry_of(mask, dim);
  at::Tensor dx = at::empty(mask.sizes(), mask.options().dtype(dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    const uint8_t* mp = mask_bytes(mask);
    const double* gp = grad.const_data_ptr<double>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    if (g.inner == 1) {
      std::vector<double> value(static_cast<size_t>(g.outer));
      reduce_rows(
          g.outer, g.len,
          [&](int64_t, int64_t b, int64_t e) {
            Sums s;
            s.count = count_nonzero(mp + b, e - b);
            return s;
          },
          [&](int64_t r, const Sums& s) {
            value[r] = gp[r] / static_cast<double>(std::max<int64_t>(s.count, 1));
          });
      map_rows(g.outer, g.len, [&](int64_t r, int64_t b, int64_t e) {
        float buffer[kIsCompute<scalar_t> ? 1 : kChunk];
        stats::fill(mp + b, store_target(dp + b, buffer), e - b, value[r]);
        finish_store(dp + b, buffer, e - b);
      });
      return;
    }
    for_tiles(g, [&](int64_t o, int64_t i0, int64_t n) {
      int64_t count[kTile] = {};
      double value[kTile];
      float buffer[kIsCompute<scalar_t> ? 1 : kTile];
      for (int64_t l = 0; l < g.len; ++l) {
        stats::col_count(mp + (o * g.len + l) * g.inner + i0, n, count);
      }
      for (int64_t j = 0; j < n; ++j) {
        value[j] = gp[o * g.inner + i0 + j] / static_cast<double>(std::max<int64_t>(count[j], 1));
      }
      for (int64_t l = 0; l < g.len; ++l) {
        const int64_t pos = (o * g.len + l) * g.inner + i0;
        stats::col_fill(mp + pos, store_target(dp + pos, buffer), n, value);
        finish_store(dp + pos, buffer, n);
      }
    });
  });
  return dx;
}

// ---- masked_var -------------------------------------------------------------------------------

at::Tensor masked_var_cpu(const at::Tensor& x_in, const at::Tensor& mask_in,
                          std::optional<int64_t> dim_in, bool unbiased) {
  constexpr const char* op = "masked_var";
  check_x_and_mask(op, x_in, mask_in);
  const auto dim = wrap_dim(op, x_in, dim_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const Geometry g = geometry_of(x, dim);
  at::Tensor out = at::empty(reduced_shape(x, dim), x.options().dtype(result_dtype(x)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using out_t = compute_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask_bytes(mask);
    out_t* outp = out.mutable_data_ptr<out_t>();
    if (g.inner == 1) {
      std::vector<double> mean(static_cast<size_t>(g.outer));
      std::vector<int64_t> count(static_cast<size_t>(g.outer));
      row_means(xp, mp, g, [&](int64_t r, double mu, int64_t c) {
        mean[r] = mu;
        count[r] = c;
      });
      reduce_rows(
          g.outer, g.len,
          [&](int64_t r, int64_t b, int64_t e) {
            Sums s;
            s.a = block_sum_sq_dev(xp, mp, b, e, mean[r]);
            return s;
          },
          [&](int64_t r, const Sums& s) {
            outp[r] = static_cast<out_t>(s.a / divisor(count[r], unbiased));
          });
      return;
    }
    for_tiles(g, [&](int64_t o, int64_t i0, int64_t n) {
      double mean[kTile];
      int64_t count[kTile];
      double squares[kTile] = {};
      float buffer[kIsCompute<scalar_t> ? 1 : kTile];
      tile_means(xp, mp, g, o, i0, n, mean, count, buffer);
      for (int64_t l = 0; l < g.len; ++l) {
        const int64_t pos = (o * g.len + l) * g.inner + i0;
        stats::col_sum_sq_dev(load(xp + pos, n, buffer), mp + pos, n, mean, squares);
      }
      for (int64_t j = 0; j < n; ++j) {
        outp[o * g.inner + i0 + j] = static_cast<out_t>(squares[j] / divisor(count[j], unbiased));
      }
    });
  });
  return out;
}

// d var / d x_i = [m_i] * 2 (x_i - mean) / c, c = max(count - 1 or count, 1) (the deviations
// sum to zero, so the mean's own dependence on x_i drops out).
at::Tensor masked_var_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                   const at::Tensor& mask_in, std::optional<int64_t> dim_in,
                                   bool unbiased) {
  constexpr const char* op = "masked_var_backward";
  check_x_and_mask(op, x_in, mask_in);
  check_cpu(op, "grad", grad_in);
  check_floating(op, "grad", grad_in);
  const auto dim = wrap_dim(op, x_in, dim_in);
  check_shape(op, "grad", grad_in, reduced_shape(x_in, dim));
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  const Geometry g = geometry_of(x, dim);
  at::Tensor dx = at::empty(x.sizes(), x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask_bytes(mask);
    const double* gp = grad.const_data_ptr<double>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    if (g.inner == 1) {
      std::vector<double> mean(static_cast<size_t>(g.outer));
      std::vector<double> scale(static_cast<size_t>(g.outer));
      row_means(xp, mp, g, [&](int64_t r, double mu, int64_t c) {
        mean[r] = mu;
        scale[r] = 2.0 * gp[r] / divisor(c, unbiased);
      });
      map_rows(g.outer, g.len, [&](int64_t r, int64_t b, int64_t e) {
        float in[kIsCompute<scalar_t> ? 1 : kChunk];
        float out[kIsCompute<scalar_t> ? 1 : kChunk];
        stats::affine(load(xp + b, e - b, in), mp + b, store_target(dp + b, out), e - b, mean[r],
                      scale[r], 0.0);
        finish_store(dp + b, out, e - b);
      });
      return;
    }
    for_tiles(g, [&](int64_t o, int64_t i0, int64_t n) {
      double mean[kTile];
      int64_t count[kTile];
      double scale[kTile];
      float in[kIsCompute<scalar_t> ? 1 : kTile];
      float out[kIsCompute<scalar_t> ? 1 : kTile];
      tile_means(xp, mp, g, o, i0, n, mean, count, in);
      for (int64_t j = 0; j < n; ++j) {
        scale[j] = 2.0 * gp[o * g.inner + i0 + j] / divisor(count[j], unbiased);
      }
      for (int64_t l = 0; l < g.len; ++l) {
        const int64_t pos = (o * g.len + l) * g.inner + i0;
        stats::col_scaled_dev(load(xp + pos, n, in), mp + pos, store_target(dp + pos, out), n, mean,
                              scale);
        finish_store(dp + pos, out, n);
      }
    });
  });
  return dx;
}

// ---- masked_whiten ----------------------------------------------------------------------------

// Global masked mean, count and variance (two passes over x).
struct Moments {
  double mean;
  double var;
  int64_t count;
};

template <typename scalar_t>
Moments global_moments(const scalar_t* x, const uint8_t* m, int64_t N, bool unbiased) {
  Moments mo{0.0, 0.0, 0};
  reduce_rows(
      1, N, [&](int64_t, int64_t b, int64_t e) { return block_sum_count(x, m, b, e); },
      [&](int64_t, const Sums& s) {
        mo.count = s.count;
        mo.mean = s.a / static_cast<double>(std::max<int64_t>(s.count, 1));
      });
  reduce_rows(
      1, N,
      [&](int64_t, int64_t b, int64_t e) {
        Sums s;
        s.a = block_sum_sq_dev(x, m, b, e, mo.mean);
        return s;
      },
      [&](int64_t, const Sums& s) { mo.var = s.a / divisor(mo.count, unbiased); });
  return mo;
}

at::Tensor masked_whiten_cpu(const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean,
                             bool unbiased, double eps) {
  constexpr const char* op = "masked_whiten";
  check_x_and_mask(op, x_in, mask_in);
  check_eps(op, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t N = x.numel();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(result_dtype(x)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using out_t = compute_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask_bytes(mask);
    out_t* outp = out.mutable_data_ptr<out_t>();
    const Moments mo = global_moments(xp, mp, N, unbiased);
    // eps = 0 with a zero variance gives inf here and NaN outputs, as the reference does.
    const double s = 1.0 / std::sqrt(mo.var + eps);
    const double shift = shift_mean ? 0.0 : mo.mean;
    map_rows(1, N, [&](int64_t, int64_t b, int64_t e) {
      float buffer[kIsCompute<scalar_t> ? 1 : kChunk];
      stats::affine(load(xp + b, e - b, buffer), mp + b, outp + b, e - b, mo.mean, s, shift);
    });
  });
  return out;
}

// With s = (var + eps)^-1/2, c = max(count - 1 or count, 1) and g_bar the masked mean of g:
//   dx_i = [m_i] (s (g_i - g_bar) - s^3 (x_i - mean) / c * sum_j m_j g_j (x_j - mean)
//                 + (shift_mean ? 0 : g_bar))
at::Tensor masked_whiten_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                      const at::Tensor& mask_in, bool shift_mean, bool unbiased,
                                      double eps) {
  constexpr const char* op = "masked_whiten_backward";
  check_x_and_mask(op, x_in, mask_in);
  check_cpu(op, "grad", grad_in);
  check_floating(op, "grad", grad_in);
  check_shape(op, "grad", grad_in, x_in.sizes());
  check_eps(op, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor grad = grad_in.to(result_dtype(x)).contiguous();
  const int64_t N = x.numel();
  at::Tensor dx = at::empty(x.sizes(), x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using g_t = compute_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask_bytes(mask);
    const g_t* gp = grad.const_data_ptr<g_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();

    double mean = 0.0, g_bar = 0.0, var = 0.0, cross = 0.0;
    int64_t count = 0;
    reduce_rows(
        1, N,
        [&](int64_t, int64_t b, int64_t e) {
          float buffer[kIsCompute<scalar_t> ? 1 : kChunk];
          Sums total;
          for (int64_t c = b; c < e; c += kChunk) {
            const int64_t n = std::min(kChunk, e - c);
            total += stats::sum2_count(load(xp + c, n, buffer), gp + c, mp + c, n);
          }
          return total;
        },
        [&](int64_t, const Sums& s) {
          count = s.count;
          const double n = static_cast<double>(std::max<int64_t>(s.count, 1));
          mean = s.a / n;
          g_bar = s.b / n;
        });
    reduce_rows(
        1, N,
        [&](int64_t, int64_t b, int64_t e) {
          float buffer[kIsCompute<scalar_t> ? 1 : kChunk];
          Sums total;
          for (int64_t c = b; c < e; c += kChunk) {
            const int64_t n = std::min(kChunk, e - c);
            total += stats::sum_sq_dev_cross(load(xp + c, n, buffer), gp + c, mp + c, n, mean);
          }
          return total;
        },
        [&](int64_t, const Sums& s) {
          var = s.a / divisor(count, unbiased);
          cross = s.b;
        });
    const double s = 1.0 / std::sqrt(var + eps);
    const double k = s * s * s * cross / divisor(count, unbiased);
    const double shift = (shift_mean ? 0.0 : g_bar) - s * g_bar;
    map_rows(1, N, [&](int64_t, int64_t b, int64_t e) {
      float in[kIsCompute<scalar_t> ? 1 : kChunk];
      float out[kIsCompute<scalar_t> ? 1 : kChunk];
      stats::whiten_grad(load(xp + b, e - b, in), gp + b, mp + b, store_target(dp + b, out),
                         e - b, mean, s, k, shift);
      finish_store(dp + b, out, e - b);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CPU, m) {
  m.impl("masked_mean", &masked_mean_cpu);
  m.impl("masked_mean_backward", &masked_mean_backward_cpu);
  m.impl("masked_var", &masked_var_cpu);
  m.impl("masked_var_backward", &masked_var_backward_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
  m.impl("masked_whiten_backward", &masked_whiten_backward_cpu);
}

}  // namespace rlengine::cpu
