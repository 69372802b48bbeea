// Argument checks of token_logprobs and its backward ops that the CPU kernels and the CUDA glue
// share, so that both backends reject the same arguments with the same messages (`device`: see
// check_device).
#pragma once

#include <cmath>
#include <optional>

#include "cpu/common.h"

namespace rlengine::cpu::logprobs_checks {

// labels: int64 or int32 of shape logits.shape[:-1], on `device`.
inline void check_labels(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                         const at::Device& device) {
  TORCH_CHECK_VALUE(logits.dim() >= 1, "rlengine.token_logprobs: logits must have a vocabulary ",
                    "dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1),
                    "rlengine.token_logprobs: labels must have shape logits.shape[:-1] = ",
                    logits.sizes().slice(0, logits.dim() - 1), ", got ", labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "rlengine.token_logprobs: labels must be int64 or int32, got ",
                   labels.scalar_type());
  check_device(op, "labels", labels, device);
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "rlengine.token_logprobs: temperature must be a finite number > 0, got ",
                    temperature);
}

// The forward's inputs: floating logits on `device` and their labels.
inline void check_forward_args(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                               double temperature, const at::Device& device) {
  check_device(op, "logits", logits, device);
  check_floating(op, "logits", logits);
  check_labels(op, logits, labels, device);
  check_temperature(temperature);
}

// The backward ops' inputs: the forward's, plus its saved logsumexp (and entropy when the
// entropy has a gradient) and the incoming gradients, all of labels' shape.
inline void check_backward_args(const char* op, const std::optional<at::Tensor>& grad_logprobs,
                                const std::optional<at::Tensor>& grad_entropy,
                                const at::Tensor& logits, const at::Tensor& labels,
                                const at::Tensor& logsumexp, const at::Tensor& entropy,
                                double temperature, const at::Device& device) {
  check_forward_args(op, logits, labels, temperature, device);
  check_shape(op, "logsumexp", logsumexp, labels.sizes());
  check_device(op, "logsumexp", logsumexp, device);
  if (grad_logprobs) {
    check_shape(op, "grad_logprobs", *grad_logprobs, labels.sizes());
    check_device(op, "grad_logprobs", *grad_logprobs, device);
  }
  if (grad_entropy) {
    check_shape(op, "grad_entropy", *grad_entropy, labels.sizes());
    check_device(op, "grad_entropy", *grad_entropy, device);
    check_shape(op, "entropy", entropy, labels.sizes());
    check_device(op, "entropy", entropy, device);
  }
}

}  // namespace rlengine::cpu::logprobs_checks
