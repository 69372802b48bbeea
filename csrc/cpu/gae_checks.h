// Argument checks of the gae family that the CPU kernels and the CUDA glue share, so that both
// backends reject the same arguments with the same messages (`device`: see check_device).
#pragma once

#include <cmath>
#include <optional>

#include "cpu/common.h"

namespace rlengine::cpu::gae_checks {

inline void check_gamma_lam(const char* op, double gamma, double lam) {
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0 && gamma <= 1.0, "rlengine.", op,
                    ": gamma must be a finite number in [0, 1], got ", gamma);
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0 && lam <= 1.0, "rlengine.", op,
                    ": lam must be a finite number in [0, 1], got ", lam);
}

inline void check_mask(const char* op, const at::Tensor& mask, const at::Device& device) {
  check_device(op, "mask", mask, device);
  check_bool(op, "mask", mask);
  check_dim(op, "mask", mask, 2);
}

// The forward's float inputs: rewards [B, T] (and values), last_values [B], all one dtype.
inline void check_forward_inputs(const char* op, const at::Tensor& rewards,
                                 const at::Tensor* values, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& last_values,
                                 const at::Device& device) {
  check_device(op, "rewards", rewards, device);
  check_floating(op, "rewards", rewards);
  check_dim(op, "rewards", rewards, 2);
  check_mask(op, mask, device);
  check_shape(op, "mask", mask, rewards.sizes());
  const auto same_dtype = [&](const char* name, const at::Tensor& t) {
    check_device(op, name, t, device);
    TORCH_CHECK_TYPE(t.scalar_type() == rewards.scalar_type(), "rlengine.", op, ": ", name,
                     " must have the dtype of rewards (", rewards.scalar_type(), "), got ",
                     t.scalar_type());
  };
  if (values != nullptr) {
    same_dtype("values", *values);
    check_shape(op, "values", *values, rewards.sizes());
  }
  if (last_values) {
    same_dtype("last_values", *last_values);
    check_shape(op, "last_values", *last_values, {rewards.size(0)});
  }
}

}  // namespace rlengine::cpu::gae_checks
