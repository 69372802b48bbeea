// Argument checks of the ranking family that the CPU kernels and the CUDA glue share, so that
// both backends reject the same arguments with the same messages (`device`: see check_device).
#pragma once

#include <cmath>
#include <optional>

#include "cpu/common.h"

namespace rlengine::cpu::ranking_checks {

inline void check_length_penalty(double length_penalty) {
  TORCH_CHECK_VALUE(std::isfinite(length_penalty) && length_penalty >= 0.0,
                    "rlengine.sequence_scores: length_penalty must be a finite number >= 0, got ",
                    length_penalty);
}

inline void check_rank_inputs(const char* op, const at::Tensor& scores, const at::Tensor& rewards,
                              const std::optional<at::Tensor>& valid, const at::Device& device) {
  check_device(op, "scores", scores, device);
  check_device(op, "rewards", rewards, device);
  check_floating(op, "scores", scores);
  check_floating(op, "rewards", rewards);
  check_dim(op, "scores", scores, 2);
  check_shape(op, "rewards", rewards, scores.sizes());
  if (valid) {
    check_device(op, "valid", *valid, device);
    check_bool(op, "valid", *valid);
    check_shape(op, "valid", *valid, scores.sizes());
  }
}

inline void check_bt_inputs(const char* op, const at::Tensor& chosen, const at::Tensor& rejected,
                            const std::optional<at::Tensor>& margin,
                            const std::optional<at::Tensor>& label_smoothing,
                            const at::Device& device) {
  check_device(op, "chosen", chosen, device);
  check_device(op, "rejected", rejected, device);
  check_floating(op, "chosen", chosen);
  TORCH_CHECK_TYPE(rejected.scalar_type() == chosen.scalar_type(), "rlengine.", op,
                   ": rejected must have the dtype of chosen (", chosen.scalar_type(), "), got ",
                   rejected.scalar_type());
  check_shape(op, "rejected", rejected, chosen.sizes());
  const auto check_optional = [&](const char* name, const std::optional<at::Tensor>& t) {
    if (!t) return;
    check_device(op, name, *t, device);
    check_floating(op, name, *t);
    TORCH_CHECK_VALUE(t->dim() == 0 || t->sizes() == chosen.sizes(), "rlengine.", op, ": ", name,
                      " must be 0-d or have the shape of chosen ", chosen.sizes(), ", got ",
                      t->sizes());
  };
  check_optional("margin", margin);
  check_optional("label_smoothing", label_smoothing);
}

}  // namespace rlengine::cpu::ranking_checks
