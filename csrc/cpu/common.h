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

// Threads get at least this many scalar elements of work each: below it the fork/join of
// at::parallel_for costs more than it saves.
constexpr int64_t kMinElementsPerTask = 32768;

inline int64_t rows_per_task(int64_t row_length) {
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, row_length));
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
