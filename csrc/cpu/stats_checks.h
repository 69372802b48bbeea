// Argument checks of the masked statistics that the CPU kernels and the CUDA glue share, so that
// both backends reject the same arguments with the same messages (`device`: see check_device).
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/common.h"

namespace rlengine::cpu::stats_checks {

// The reduced dim, wrapped to [0, ndim); nullopt for all of x (dim=None, or any valid dim of a
// 0-d x, as torch's reductions treat it).
inline std::optional<int64_t> wrap_dim(const char* op, const at::Tensor& x,
                                       std::optional<int64_t> dim) {
  if (!dim) return std::nullopt;
  const int64_t ndim = x.dim();
  const int64_t limit = std::max<int64_t>(ndim, 1);
  TORCH_CHECK_VALUE(*dim >= -limit && *dim < limit, "rlengine.", op, ": dim must be in [",
                    -limit, ", ", limit - 1, "] for a ", ndim, "-D x, got ", *dim);
  if (ndim == 0) return std::nullopt;
  return *dim < 0 ? *dim + ndim : *dim;
}

inline std::vector<int64_t> reduced_shape(const at::Tensor& x, std::optional<int64_t> dim) {
  std::vector<int64_t> shape;
  if (!dim) return shape;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (d != *dim) shape.push_back(x.size(d));
  }
  return shape;
}

inline void check_x_and_mask(const char* op, const at::Tensor& x, const at::Tensor& mask,
                             const at::Device& device) {
  check_device(op, "x", x, device);
  check_device(op, "mask", mask, device);
  check_floating(op, "x", x);
  check_bool(op, "mask", mask);
  check_shape(op, "mask", mask, x.sizes());
}

inline void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "rlengine.", op,
                    ": eps must be a finite number >= 0, got ", eps);
}

}  // namespace rlengine::cpu::stats_checks
