// CPU kernels of rlengine::gae and rlengine::discounted_returns, forward and backward.
//
// Each row is one reverse scan in registers (rows in parallel). Masked positions are skipped,
// not treated as time steps: a valid position's "next" is the next valid position of its row
// (the multi-turn convention of veRL), and after the last valid position come last_values (or
// 0) and a zero advantage. The backward passes are the transposed recurrences, forward scans:
//   gae:  d_t = gA_t + gR_t + gamma*lam * d_prev        (d = dL/d delta; prev = previous valid)
//         dL/dr_t = d_t,  dL/dV_t = gR_t - d_t + gamma * d_prev,  dL/dlast = gamma * d_last
//   discounted returns:  d_t = gG_t + gamma * d_prev,  dL/dr_t = d_t,  dL/dlast = gamma * d_last
// Rows are read through their strides (Rows, in common.h), so sliced inputs and expanded
// incoming gradients (the gradient of a .sum() is an expanded scalar) are never copied.
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "cpu/common.h"

namespace rlengine::cpu {
namespace {

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

void check_discount(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0 && value <= 1.0, "rlengine.", op, ": ",
                    name, " must be a finite number in [0, 1], got ", value);
}

// Shared checks of the [B, T] inputs; returns (B, T).
std::pair<int64_t, int64_t> check_rows(const char* op, const at::Tensor& rewards,
                                       const at::Tensor& mask,
                                       const std::optional<at::Tensor>& last_values) {
  check_cpu(op, "rewards", rewards);
  check_cpu(op, "mask", mask);
  check_floating(op, "rewards", rewards);
  check_dim(op, "rewards", rewards, 2);
  check_bool(op, "mask", mask);
  check_shape(op, "mask", mask, rewards.sizes());
  const int64_t B = rewards.size(0);
  if (last_values) {
    check_cpu(op, "last_values", *last_values);
    check_shape(op, "last_values", *last_values, {B});
    TORCH_CHECK_TYPE(last_values->scalar_type() == rewards.scalar_type(), "rlengine.", op,
                     ": last_values must have the dtype of rewards (", rewards.scalar_type(),
                     "), got ", last_values->scalar_type());
  }
  return {B, rewards.size(1)};
}

// ---- gae -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask,
                                           const std::optional<at::Tensor>& last_values,
                                           double gamma, double lam) {
  constexpr const char* op = "gae";
  const auto [B, T] = check_rows(op, rewards, mask, last_values);
  check_cpu(op, "values", values);
  check_shape(op, "values", values, rewards.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == rewards.scalar_type(), "rlengine.gae: values must ",
                   "have the dtype of rewards (", rewards.scalar_type(), "), got ",
                   values.scalar_type());
  check_discount(op, "gamma", gamma);
  check_discount(op, "lam", lam);
  const auto options = rewards.options().dtype(result_dtype(rewards));
  at::Tensor advantages = at::empty({B, T}, options);
  at::Tensor returns = at::empty({B, T}, options);
  if (B == 0 || T == 0) {
    return {advantages, returns};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    const Rows<scalar_t> rewards_rows(rewards), values_rows(values);
    const Rows<bool> mask_rows(mask);
    const auto last = Rows<scalar_t>::of(last_values);
    acc* adv = advantages.mutable_data_ptr<acc>();
    acc* ret = returns.mutable_data_ptr<acc>();
    const acc g = static_cast<acc>(gamma);
    const acc gl = static_cast<acc>(gamma * lam);
    at::parallel_for(0, B, rows_per_task(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Row<scalar_t> r = rewards_rows[b], v = values_rows[b];
        const Row<bool> m = mask_rows[b];
        acc next_value = last ? static_cast<acc>(last.at(b)) : acc(0);
        acc next_advantage = 0;
        acc* adv_row = adv + b * T;
        acc* ret_row = ret + b * T;
        for (int64_t t = T - 1; t >= 0; --t) {
          if (m[t]) {
            const acc value = static_cast<acc>(v[t]);
            const acc advantage = static_cast<acc>(r[t]) + g * next_value - value +
                                  gl * next_advantage;
            adv_row[t] = advantage;
            ret_row[t] = advantage + value;
            next_value = value;
            next_advantage = advantage;
          } else {  // skipped: nothing read, exactly 0 written
            adv_row[t] = 0;
            ret_row[t] = 0;
          }
        }
      }
    });
  });
  return {advantages, returns};
}

// Incoming gradients may be absent (an output that did not reach the loss); the backward
// dtype follows whichever is present.
at::ScalarType grad_dtype(const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b) {
  if (a && a->scalar_type() == at::kDouble) return at::kDouble;
  if (b && b->scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_backward_cpu(
    const std::optional<at::Tensor>& grad_advantages_in,
    const std::optional<at::Tensor>& grad_returns_in, const at::Tensor& mask, double gamma,
    double lam) {
  constexpr const char* op = "gae_backward";
  check_cpu(op, "mask", mask);
  check_bool(op, "mask", mask);
  check_dim(op, "mask", mask, 2);
  check_discount(op, "gamma", gamma);
  check_discount(op, "lam", lam);
  const int64_t B = mask.size(0), T = mask.size(1);
  const at::ScalarType dtype = grad_dtype(grad_advantages_in, grad_returns_in);
  // Incoming gradients are read in the working precision; a missing one reads as zeros.
  const auto incoming = [&](const std::optional<at::Tensor>& g, const char* name) {
    if (!g) return at::Tensor();
    check_cpu(op, name, *g);
    check_shape(op, name, *g, mask.sizes());
    return g->scalar_type() == dtype ? *g : g->to(dtype);
  };
  const at::Tensor grad_adv = incoming(grad_advantages_in, "grad_advantages");
  const at::Tensor grad_ret = incoming(grad_returns_in, "grad_returns");
  const auto options = mask.options().dtype(dtype);
  at::Tensor grad_rewards = at::empty({B, T}, options);
  at::Tensor grad_values = at::empty({B, T}, options);
  at::Tensor grad_last = at::empty({B}, options);
  if (B == 0) return {grad_rewards, grad_values, grad_last};
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    const auto grad_adv_rows = Rows<scalar_t>::of(grad_adv);
    const auto grad_ret_rows = Rows<scalar_t>::of(grad_ret);
    const Rows<bool> mask_rows(mask);
    scalar_t* out_r = grad_rewards.mutable_data_ptr<scalar_t>();
    scalar_t* out_v = grad_values.mutable_data_ptr<scalar_t>();
    scalar_t* out_last = grad_last.mutable_data_ptr<scalar_t>();
    const scalar_t g = static_cast<scalar_t>(gamma);
    const scalar_t gl = static_cast<scalar_t>(gamma * lam);
    at::parallel_for(0, B, rows_per_task(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Row<bool> m = mask_rows[b];
        scalar_t carried = 0;  // dL/d delta at the previous valid position
        for (int64_t t = 0; t < T; ++t) {
          if (m[t]) {
            const scalar_t g_ret = grad_ret_rows ? grad_ret_rows[b][t] : scalar_t(0);
            const scalar_t g_adv = grad_adv_rows ? grad_adv_rows[b][t] : scalar_t(0);
            const scalar_t d = g_adv + g_ret + gl * carried;
            out_r[b * T + t] = d;
            out_v[b * T + t] = g_ret - d + g * carried;
            carried = d;
          } else {
            out_r[b * T + t] = 0;
            out_v[b * T + t] = 0;
          }
        }
        out_last[b] = g * carried;
      }
    });
  });
  return {grad_rewards, grad_values, grad_last};
}

// ---- discounted returns ------------------------------------------------------------------------

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& last_values, double gamma) {
  constexpr const char* op = "discounted_returns";
  const auto [B, T] = check_rows(op, rewards, mask, last_values);
  check_discount(op, "gamma", gamma);
  at::Tensor returns = at::empty({B, T}, rewards.options().dtype(result_dtype(rewards)));
  if (B == 0 || T == 0) return returns;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), op, [&] {
    using acc = acc_t<scalar_t>;
    const Rows<scalar_t> rewards_rows(rewards);
    const Rows<bool> mask_rows(mask);
    const auto last = Rows<scalar_t>::of(last_values);
    acc* ret = returns.mutable_data_ptr<acc>();
    const acc g = static_cast<acc>(gamma);
    at::parallel_for(0, B, rows_per_task(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Row<scalar_t> r = rewards_rows[b];
        const Row<bool> m = mask_rows[b];
        acc next_return = last ? static_cast<acc>(last.at(b)) : acc(0);
        acc* row = ret + b * T;
        for (int64_t t = T - 1; t >= 0; --t) {
          if (m[t]) {
            next_return = static_cast<acc>(r[t]) + g * next_return;
            row[t] = next_return;
          } else {
            row[t] = 0;
          }
        }
      }
    });
  });
  return returns;
}

std::tuple<at::Tensor, at::Tensor> discounted_returns_backward_cpu(const at::Tensor& grad_in,
                                                                   const at::Tensor& mask,
                                                                   double gamma) {
  constexpr const char* op = "discounted_returns_backward";
  check_cpu(op, "mask", mask);
  check_bool(op, "mask", mask);
  check_dim(op, "mask", mask, 2);
  check_cpu(op, "grad_returns", grad_in);
  check_shape(op, "grad_returns", grad_in, mask.sizes());
  check_discount(op, "gamma", gamma);
  const int64_t B = mask.size(0), T = mask.size(1);
  const at::ScalarType dtype = grad_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad = grad_in.scalar_type() == dtype ? grad_in : grad_in.to(dtype);
  const auto options = mask.options().dtype(dtype);
  at::Tensor grad_rewards = at::empty({B, T}, options);
  at::Tensor grad_last = at::empty({B}, options);
  if (B == 0) return {grad_rewards, grad_last};
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    const Rows<scalar_t> grad_rows(grad);
    const Rows<bool> mask_rows(mask);
    scalar_t* out = grad_rewards.mutable_data_ptr<scalar_t>();
    scalar_t* out_last = grad_last.mutable_data_ptr<scalar_t>();
    const scalar_t g = static_cast<scalar_t>(gamma);
    at::parallel_for(0, B, rows_per_task(T), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Row<scalar_t> gin = grad_rows[b];
        const Row<bool> m = mask_rows[b];
        scalar_t carried = 0;
        for (int64_t t = 0; t < T; ++t) {
          if (m[t]) {
            carried = gin[t] + g * carried;
            out[b * T + t] = carried;
          } else {
            out[b * T + t] = 0;
          }
        }
        out_last[b] = g * carried;
      }
    });
  });
  return {grad_rewards, grad_last};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("gae_backward", &gae_backward_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("discounted_returns_backward", &discounted_returns_backward_cpu);
}

}  // namespace rlengine::cpu
