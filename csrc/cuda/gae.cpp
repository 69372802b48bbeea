// Torch glue of the CUDA kernels of rlengine::gae, rlengine::discounted_returns and their
// backwards (kernels in gae.cu): the argument checks shared with the CPU kernels
// (csrc/cpu/gae_checks.h), outputs, the scan's workspace, the launch on torch's current stream.
// No host synchronization.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/gae_checks.h"
#include "cuda/gae.h"
#include "cuda/glue.h"

namespace rlengine::cuda {
namespace {

using cpu::gae_checks::check_gamma_lam;
using cpu::gae_checks::check_mask;

void check_forward_inputs(const char* op, const at::Tensor& rewards, const at::Tensor* values,
                          const at::Tensor& mask, const std::optional<at::Tensor>& last_values) {
  cpu::gae_checks::check_forward_inputs(op, rewards, values, mask, last_values, rewards.device());
}

StridedInput strided(const at::Tensor& t) {
  return {t.const_data_ptr(), t.dim() >= 1 ? t.stride(0) : 0, t.dim() >= 2 ? t.stride(1) : 0};
}

StridedInput strided(const std::optional<at::Tensor>& t) {
  return t && t->defined() ? strided(*t) : StridedInput{};
}

at::Tensor workspace(const at::Tensor& like, int64_t rows, int64_t steps, bool backward) {
  return at::empty({gae_workspace_bytes(rows, steps, backward)}, like.options().dtype(at::kByte));
}

// values is undefined for discounted_returns; returns receives gae's returns only.
void forward(const char* op, const at::Tensor& rewards, const at::Tensor& values,
             const at::Tensor& mask, const std::optional<at::Tensor>& last_values,
             at::Tensor& advantages, at::Tensor& returns, double gamma, double c) {
  if (rewards.numel() == 0) return;
  const at::Tensor ws = workspace(rewards, rewards.size(0), rewards.size(1), false);
  GaeForwardArgs args;
  args.dtype = dtype_of(rewards);
  args.rewards = strided(rewards);
  if (values.defined()) args.values = strided(values);
  args.mask = strided(mask);
  args.last_values = strided(last_values);
  args.advantages = advantages.mutable_data_ptr();
  args.returns = returns.defined() ? returns.mutable_data_ptr() : nullptr;
  args.rows = rewards.size(0);
  args.steps = rewards.size(1);
  args.gamma = gamma;
  args.c = c;
  args.workspace = ws.mutable_data_ptr();
  check_launch(op, launch_gae_forward(args, current_stream()));
}

// Incoming gradients in the gradients' dtype (fp64 if any is fp64, else fp32), read in place
// with their strides; an absent one is not read at all (the kernel takes it as 0).
std::optional<at::Tensor> incoming_gradient(const char* op, const char* name,
                                            const std::optional<at::Tensor>& grad,
                                            const at::Tensor& mask, at::ScalarType dtype) {
  if (!grad || !grad->defined()) return std::nullopt;
  check_cuda(op, name, *grad, mask.device());
  check_floating(op, name, *grad);
  check_shape(op, name, *grad, mask.sizes());
  return grad->to(dtype);
}

at::ScalarType gradient_dtype(std::initializer_list<const std::optional<at::Tensor>*> grads) {
  for (const auto* g : grads) {
    if (*g && (*g)->defined() && (*g)->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

void backward(const char* op, const std::optional<at::Tensor>& grad_advantages,
              const std::optional<at::Tensor>& grad_returns, const at::Tensor& mask,
              at::Tensor& grad_rewards, at::Tensor& grad_values, at::Tensor& grad_last_values,
              double gamma, double c, bool with_values) {
  const int64_t rows = mask.size(0), steps = mask.size(1);
  if (steps == 0) {  // no valid position: nothing reaches last_values
    grad_last_values.zero_();
    return;
  }
  if (rows == 0) return;
  const at::Tensor ws = workspace(mask, rows, steps, true);
  GaeBackwardArgs args;
  args.dtype = dtype_of(grad_rewards);
  args.grad_advantages = strided(grad_advantages);
  args.grad_returns = strided(grad_returns);
  args.mask = strided(mask);
  args.grad_rewards = grad_rewards.mutable_data_ptr();
  args.grad_values = with_values ? grad_values.mutable_data_ptr() : nullptr;
  args.grad_last_values = grad_last_values.mutable_data_ptr();
  args.rows = rows;
  args.steps = steps;
  args.gamma = gamma;
  args.c = c;
  args.with_values = with_values;
  args.workspace = ws.mutable_data_ptr();
  check_launch(op, launch_gae_backward(args, current_stream()));
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask,
                                            const std::optional<at::Tensor>& last_values,
                                            double gamma, double lam) {
  constexpr const char* op = "gae";
  check_forward_inputs(op, rewards, &values, mask, last_values);
  check_gamma_lam(op, gamma, lam);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const auto options = rewards.options().dtype(result_dtype(rewards));
  at::Tensor advantages = at::empty(rewards.sizes(), options);
  at::Tensor returns = at::empty(rewards.sizes(), options);
  forward(op, rewards, values, mask, last_values, advantages, returns, gamma, gamma * lam);
  return {advantages, returns};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_backward_cuda(
    const std::optional<at::Tensor>& grad_advantages,
    const std::optional<at::Tensor>& grad_returns, const at::Tensor& mask, double gamma,
    double lam) {
  constexpr const char* op = "gae_backward";
  check_mask(op, mask, mask.device());
  check_gamma_lam(op, gamma, lam);
  const c10::cuda::CUDAGuard guard(mask.device());
  const at::ScalarType dtype = gradient_dtype({&grad_advantages, &grad_returns});
  const auto ga = incoming_gradient(op, "grad_advantages", grad_advantages, mask, dtype);
  const auto gr = incoming_gradient(op, "grad_returns", grad_returns, mask, dtype);
  const auto options = mask.options().dtype(dtype);
  at::Tensor grad_rewards = at::empty(mask.sizes(), options);
  at::Tensor grad_values = at::empty(mask.sizes(), options);
  at::Tensor grad_last_values = at::empty({mask.size(0)}, options);
  backward(op, ga, gr, mask, grad_rewards, grad_values, grad_last_values, gamma, gamma * lam,
           true);
  return {grad_rewards, grad_values, grad_last_values};
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const at::Tensor& mask,
                                   const std::optional<at::Tensor>& last_values, double gamma) {
  constexpr const char* op = "discounted_returns";
  check_forward_inputs(op, rewards, nullptr, mask, last_values);
  check_gamma_lam(op, gamma, 1.0);
  const c10::cuda::CUDAGuard guard(rewards.device());
  at::Tensor returns = at::empty(rewards.sizes(), rewards.options().dtype(result_dtype(rewards)));
  at::Tensor unused;
  forward(op, rewards, at::Tensor(), mask, last_values, returns, unused, gamma, gamma);
  return returns;
}

std::tuple<at::Tensor, at::Tensor> discounted_returns_backward_cuda(
    const at::Tensor& grad_returns, const at::Tensor& mask, double gamma) {
  constexpr const char* op = "discounted_returns_backward";
  check_mask(op, mask, mask.device());
  check_gamma_lam(op, gamma, 1.0);
  const c10::cuda::CUDAGuard guard(mask.device());
  const std::optional<at::Tensor> grad(grad_returns);
  const at::ScalarType dtype = gradient_dtype({&grad});
  const auto g = incoming_gradient(op, "grad_returns", grad, mask, dtype);
  const auto options = mask.options().dtype(dtype);
  at::Tensor grad_rewards = at::empty(mask.sizes(), options);
  at::Tensor grad_last_values = at::empty({mask.size(0)}, options);
  at::Tensor unused;
  backward(op, g, std::nullopt, mask, grad_rewards, unused, grad_last_values, gamma, gamma,
           false);
  return {grad_rewards, grad_last_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CUDA, m) {
  m.impl("gae", &gae_cuda);
  m.impl("gae_backward", &gae_backward_cuda);
  m.impl("discounted_returns", &discounted_returns_cuda);
  m.impl("discounted_returns_backward", &discounted_returns_backward_cuda);
}

}  // namespace rlengine::cuda
