// Shared helpers of the CPU kernels: argument checks that guard memory safety (the Python
// wrappers raise the user-facing errors first) and dtype rules.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <string>

namespace rlengine::cpu {

// Float inputs of any precision produce fp32 results; float64 inputs stay float64 so that the
// gradcheck tests can run the kernels in double precision.
inline at::ScalarType result_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "rlengine.", op, ": ", name,
                    " must be a CPU tensor for the CPU kernel, got ", t.device());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf,
                   "rlengine.", op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", d);
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

}  // namespace rlengine::cpu
