// Shared helpers of the CPU kernels: argument checks that guard memory safety (the Python
// wrappers raise the user-facing errors first) and dtype rules.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <type_traits>

namespace rlengine::cpu {

// Float inputs of any precision produce fp32 results; float64 inputs stay float64 so that the
// gradcheck tests can run the kernels in double precision.
inline at::ScalarType result_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The C++ type of result_dtype, which is also the kernels' working precision: float for
// float/bfloat16/half inputs, double for double.
template <typename scalar_t>
using compute_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Every tensor argument of a kernel is on the kernel's device: the CPU for the CPU kernels, the
// first tensor argument's GPU for the CUDA kernels. The family argument checks that both
// backends share (csrc/cpu/<family>_checks.h) take that device.
inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device) {
  if (device.is_cpu()) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), "rlengine.", op, ": ", name,
                      " must be a CPU tensor for the CPU kernel, got ", t.device());
  } else {
    TORCH_CHECK_VALUE(t.device() == device, "rlengine.", op, ": ", name, " must be on ", device,
                      " like the op's first tensor argument, got ", t.device());
  }
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  check_device(op, name, t, at::Device(at::kCPU));
}

// A dtype argument (the dtype a backward returns its gradient in) or a tensor's dtype.
inline void check_floating(const char* op, const char* name, at::ScalarType d) {
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf,
                   "rlengine.", op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", d);
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  check_floating(op, name, t.scalar_type());
}

inline void check_bool(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBool, "rlengine.", op, ": ", name,
                   " must be a bool tensor, got ", t.scalar_type());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "rlengine.", op, ": ", name, " must have shape ",
                    expected, ", got ", t.sizes());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "rlengine.", op, ": ", name, " must be ", dim,
                    "-D, got shape ", t.sizes());
}

// ---- parallel regions -----------------------------------------------------------------------
// at::parallel_for runs a range on the calling thread alone when it holds at most one grain; a
// larger one opens an OpenMP region, which costs a fork and a join: microseconds on a quiet
// machine while idle threads spin, tens to hundreds when they sleep, and a whole scheduler
// time slice whenever a thread of the region waits for a core that another process holds. Each
// op's grain is half the work (in its own unit) at which 2 threads first ran at least 1.3x
// faster than 1 on a quiet machine with the `rlengine` command's short spin
// (GOMP_SPINCOUNT=10000 and 30000 alike), so that a call too small to gain never opens a
// region: `python bench/ops_threads.py sweep`, bench/results/ops-threads-sweep-2026-12-07.md.
namespace grain {
inline constexpr int64_t kLogprobs = 65536;        // logits (rows x vocabulary)
inline constexpr int64_t kSequenceScores = 65536;  // token positions
inline constexpr int64_t kRankPairs = 32768;       // candidate pairs (K x K per query)
inline constexpr int64_t kBtLoss = 65536;          // preference pairs
inline constexpr int64_t kScan = 32768;            // GAE / discounted-returns positions
inline constexpr int64_t kSegments = 32768;        // token positions
inline constexpr int64_t kStats = 65536;           // elements
}  // namespace grain

// Rows per task for rows of `row_length` units and a grain in the same unit.
inline int64_t rows_per_task(int64_t row_length, int64_t grain_units) {
  return std::max<int64_t>(1, grain_units / std::max<int64_t>(1, row_length));
}

// One row of a tensor: its first element and the distance between positions. Row kernels take
// rows by value, so pointer and stride are locals that the compiler keeps in registers across
// the loop's stores (read through a captured reference they would be reloaded after each).
template <typename T>
struct Row {
  const T* data;
  int64_t stride;
  T operator[](int64_t t) const { return data[t * stride]; }
};

// A 2-D (or 1-D) tensor of any strides, read in place: sliced or expanded inputs (an incoming
// gradient of ones is often an expanded scalar) are never copied. T may differ from the
// tensor's own element type where the bytes mean the same (a bool mask read as uint8_t, which
// GCC vectorizes where it does not vectorize bool).
template <typename T>
struct Rows {
  const T* data = nullptr;  // null for an absent optional tensor (see Rows::of)
  int64_t row_stride = 0;
  int64_t col_stride = 0;

  Rows() = default;
  explicit Rows(const at::Tensor& t)
      : data(static_cast<const T*>(t.const_data_ptr())),
        row_stride(t.dim() >= 1 ? t.stride(0) : 0),
        col_stride(t.dim() >= 2 ? t.stride(1) : 0) {}
  Row<T> operator[](int64_t b) const { return {data + b * row_stride, col_stride}; }
  T at(int64_t b) const { return data[b * row_stride]; }  // 1-D tensors
  const T* ptr(int64_t b, int64_t t) const { return data + b * row_stride + t * col_stride; }
  explicit operator bool() const { return data != nullptr; }

  // Rows of an optional tensor: empty (false) when it is absent or undefined.
  static Rows of(const at::Tensor& t) { return t.defined() ? Rows(t) : Rows(); }
  static Rows of(const std::optional<at::Tensor>& t) { return t ? of(*t) : Rows(); }
};

}  // namespace rlengine::cpu
