// CPU kernels of rlengine::gae, rlengine::discounted_returns and their backwards.
//
// Both forward ops are one first-order linear recurrence over the valid positions of a row, run
// backwards in time (t' is the next valid position after t, c = gamma * lam):
//     delta_t = r_t + gamma * V_t' - V_t,    A_t = delta_t + c * A_t'
// discounted_returns is the same scan with V = 0 and c = gamma (lam = 1), the bootstrap
// last_values entering through V after the last valid position. Their backwards are the
// transposed recurrence, run forwards in time: with G_t = dL/d delta_t and s the previous valid
// position,  G_t = dL/dA_t + dL/dR_t + c * G_s.
//
// A row is a scalar scan whose state lives in double registers. A masked position is passed
// over as the step (delta, factor) = (0, 1), chosen by selects, so the loop-carried chain is a
// single multiply-add (about 1 ns a step; with a select on the chain and the state packed as a
// pair in one vector register, as compilers like to do, it was 3x slower), and whatever a masked
// position holds (NaN, inf) is loaded but never reaches the state or an output. Accumulating in
// double costs nothing over fp32 in a latency-bound scan and keeps 1e5-step rows with
// gamma = lam = 1 accurate: each fp32 result is rounded once. Inputs are read in place through
// their strides (values[:, :-1], transposes, gradients expanded from a scalar are not copied);
// a bool mask is read as bytes, nonzero = true (Rows, in common.h).
//
// Rows run in parallel. With fewer rows than threads and long rows, each row is also cut into
// time blocks (a two-pass scan): pass 1 scans every block in parallel with a zero carry (the
// block that ends the recurrence gets the true one); a short serial pass per row turns the block
// summaries into each block's true carry; pass 2 adds that carry's contribution, which reaches
// the k-th valid position into the block scaled by c^k, to every valid position.
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/gae_checks.h"
#include "cpu/vec_math.h"

namespace rlengine::cpu {
namespace {

// A time block gets at least this many steps (about 20 us of scanning): shorter blocks would
// spend more on the second pass and the extra fork/join than the parallelism saves.
constexpr int64_t kMinBlockSteps = 16384;
// Pass 2 costs about 4/5 of pass 1 per step (measured: 0.8 vs 1.0 ns), so cutting a row in k
// blocks takes about (1 + 4/5) / k of the sequential scan's time on k free cores: next to
// nothing gained at k = 2, 1.7x faster at k = 3.
constexpr int64_t kMinTimeBlocks = 3;

// The forward recurrence's state just right of a position.
struct ForwardCarry {
  double next_value;      // V at the next valid position (last_values past the last one)
  double next_advantage;  // A at the next valid position (0 past the last one)
};

struct ForwardScan {
  int64_t valid;       // valid positions in the block
  ForwardCarry carry;  // the state at the block's first valid position (the carry-in if none)
};

struct BackwardScan {
  int64_t valid;
  double carry;  // G at the block's last valid position (the carry-in if none)
};

// One block of a row: rewards, values and mask start at the block's first position; outputs are
// contiguous. Without kValues, V is 0 and only `advantages` (then the returns) is written.
template <typename scalar_t, typename out_t>
struct ForwardSpan {
  const scalar_t* rewards;
  int64_t rewards_stride;
  const scalar_t* values;
  int64_t values_stride;
  const uint8_t* mask;
  int64_t mask_stride;
  out_t* advantages;
  out_t* returns;
};

template <bool kValues, typename scalar_t, typename out_t>
RLENGINE_SIMD_CLONES ForwardScan scan_forward(ForwardSpan<scalar_t, out_t> s, int64_t n,
                                              ForwardCarry carry, double gamma, double c) {
  double next_value = carry.next_value;
  double advantage = carry.next_advantage;
  int64_t valid = 0;
  for (int64_t t = n - 1; t >= 0; --t) {
    const bool keep = s.mask[t * s.mask_stride] != 0;
    const double value = kValues ? static_cast<double>(s.values[t * s.values_stride]) : 0.0;
    const double delta = static_cast<double>(s.rewards[t * s.rewards_stride]) + gamma * next_value - value;
    advantage = (keep ? delta : 0.0) + (keep ? c : 1.0) * advantage;
    next_value = keep ? value : next_value;
    s.advantages[t] = keep ? static_cast<out_t>(advantage) : out_t(0);
    if constexpr (kValues) s.returns[t] = keep ? static_cast<out_t>(advantage + value) : out_t(0);
    valid += keep;
  }
  return {valid, {next_value, advantage}};
}

// Pass 2 of the forward: the carry into a block adds x * c^k to the advantage (and the return)
// of the valid position with k valid positions after it in the block.
template <bool kValues, typename out_t>
RLENGINE_SIMD_CLONES void add_forward_carry(const uint8_t* mask, int64_t mask_stride,
                                            out_t* advantages, out_t* returns, int64_t n,
                                            double x, double c) {
  double w = x;
  for (int64_t t = n - 1; t >= 0; --t) {
    const bool keep = mask[t * mask_stride] != 0;
    const double add = keep ? w : 0.0;
    advantages[t] = static_cast<out_t>(advantages[t] + add);
    if constexpr (kValues) returns[t] = static_cast<out_t>(returns[t] + add);
    w = keep ? w * c : w;
  }
}

// Incoming gradients of one block (either may be an expanded zero); outputs contiguous. Without
// kValues there is only the returns' gradient (in grad_advantages) and no values gradient.
template <typename grad_t>
struct BackwardSpan {
  const grad_t* grad_advantages;
  int64_t grad_advantages_stride;
  const grad_t* grad_returns;
  int64_t grad_returns_stride;
  const uint8_t* mask;
  int64_t mask_stride;
  grad_t* grad_rewards;
  grad_t* grad_values;
};

template <bool kValues, typename grad_t>
RLENGINE_SIMD_CLONES BackwardScan scan_backward(BackwardSpan<grad_t> s, int64_t n, double carry,
                                                double gamma, double c) {
  double previous = carry;  // G at the previous valid position
  int64_t valid = 0;
  for (int64_t t = 0; t < n; ++t) {
    const bool keep = s.mask[t * s.mask_stride] != 0;
    const double grad_return = kValues ? s.grad_returns[t * s.grad_returns_stride] : 0.0;
    const double incoming = s.grad_advantages[t * s.grad_advantages_stride] + grad_return;
    // As in the forward: a masked position passes the state on unchanged, and its incoming
    // gradients (the gradients of constant zeros) are never mixed in.
    const double g = (keep ? incoming : 0.0) + (keep ? c : 1.0) * previous;
    s.grad_rewards[t] = keep ? static_cast<grad_t>(g) : grad_t(0);
    // V_t enters R_t (+1), delta_t (-1) and the previous valid position's delta (+gamma).
    if constexpr (kValues) {
      s.grad_values[t] = keep ? static_cast<grad_t>(grad_return - g + gamma * previous) : grad_t(0);
    }
    previous = g;
    valid += keep;
  }
  return {valid, previous};
}

// Pass 2 of the backward: the carry y into a block adds y * c^k to G at the block's k-th valid
// position, hence y * c^(k-1) * (gamma - c) to that position's values gradient.
template <bool kValues, typename grad_t>
RLENGINE_SIMD_CLONES void add_backward_carry(const uint8_t* mask, int64_t mask_stride,
                                             grad_t* grad_rewards, grad_t* grad_values, int64_t n,
                                             double y, double gamma, double c) {
  double w = y;
  const double values_factor = gamma - c;
  for (int64_t t = 0; t < n; ++t) {
    const bool keep = mask[t * mask_stride] != 0;
    grad_rewards[t] = static_cast<grad_t>(grad_rewards[t] + (keep ? w * c : 0.0));
    if constexpr (kValues) {
      grad_values[t] = static_cast<grad_t>(grad_values[t] + (keep ? w * values_factor : 0.0));
    }
    w = keep ? w * c : w;
  }
}

// How each row is cut into time blocks: one block unless there are fewer rows than threads and
// the rows are long enough for every block to get kMinBlockSteps.
class TimeBlocks {
 public:
  TimeBlocks(int64_t rows, int64_t steps) : steps_(steps) {
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    if (rows > 0 && rows < threads) {
      const int64_t count = std::min((threads + rows - 1) / rows, steps / kMinBlockSteps);
      if (count >= kMinTimeBlocks) count_ = count;
    }
  }
  int64_t count() const { return count_; }
  int64_t begin(int64_t block) const {
    return block * (steps_ / count_) + std::min(block, steps_ % count_);
  }
  int64_t length(int64_t block) const { return begin(block + 1) - begin(block); }

 private:
  int64_t steps_;
  int64_t count_ = 1;
};

using gae_checks::check_gamma_lam;

const at::Device kCpu(at::kCPU);

template <bool kValues, typename scalar_t, typename out_t>
void forward(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask,
             const std::optional<at::Tensor>& last_values, at::Tensor& advantages,
             at::Tensor& returns, double gamma, double c) {
  const int64_t rows = rewards.size(0);
  const int64_t steps = rewards.size(1);
  const Rows<scalar_t> r(rewards);
  const Rows<scalar_t> v = kValues ? Rows<scalar_t>(values) : Rows<scalar_t>();
  const Rows<uint8_t> m(mask);
  const scalar_t* lv = last_values ? last_values->const_data_ptr<scalar_t>() : nullptr;
  const int64_t lv_stride = last_values ? last_values->stride(0) : 0;
  out_t* adv = advantages.mutable_data_ptr<out_t>();
  out_t* ret = kValues ? returns.mutable_data_ptr<out_t>() : nullptr;

  const TimeBlocks blocks(rows, steps);
  const int64_t per_row = blocks.count();
  const auto span = [&](int64_t row, int64_t t0) {
    const int64_t offset = row * steps + t0;
    return ForwardSpan<scalar_t, out_t>{
        r.ptr(row, t0), r.col_stride,
        kValues ? v.ptr(row, t0) : nullptr, v.col_stride,
        m.ptr(row, t0), m.col_stride,
        adv + offset, kValues ? ret + offset : nullptr};
  };
  const auto bootstrap = [&](int64_t row) {
    return ForwardCarry{lv ? static_cast<double>(lv[row * lv_stride]) : 0.0, 0.0};
  };

  std::vector<ForwardScan> scans(per_row > 1 ? rows * per_row : 0);
  at::parallel_for(0, rows * per_row, per_row > 1 ? 1 : rows_per_task(steps, grain::kScan),
                   [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) {
      const int64_t row = lane / per_row, block = lane % per_row;
      // Only the block that ends the recurrence knows its carry now; the others start from 0.
      const ForwardCarry carry = block == per_row - 1 ? bootstrap(row) : ForwardCarry{0.0, 0.0};
      const ForwardScan scan = scan_forward<kValues>(
          span(row, blocks.begin(block)), blocks.length(block), carry, gamma, c);
      if (per_row > 1) scans[lane] = scan;
    }
  });
  if (per_row == 1) return;

  // x = gamma * V_t' + c * A_t' is what the true carry adds to the block's last valid position.
  std::vector<double> carry_in(rows * per_row, 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    ForwardCarry state = scans[row * per_row + per_row - 1].carry;  // already exact
    for (int64_t block = per_row - 2; block >= 0; --block) {
      const ForwardScan& scan = scans[row * per_row + block];
      const double x = gamma * state.next_value + c * state.next_advantage;
      carry_in[row * per_row + block] = x;
      if (scan.valid > 0) {
        state = {scan.carry.next_value,
                 scan.carry.next_advantage + std::pow(c, double(scan.valid - 1)) * x};
      }
    }
  }
  at::parallel_for(0, rows * (per_row - 1), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / (per_row - 1), block = i % (per_row - 1);
      const auto s = span(row, blocks.begin(block));
      add_forward_carry<kValues>(s.mask, s.mask_stride, s.advantages, s.returns,
                                 blocks.length(block), carry_in[row * per_row + block], c);
    }
  });
}

template <bool kValues>
void dispatch_forward(const at::Tensor& rewards, const at::Tensor& values,
                      const at::Tensor& mask, const std::optional<at::Tensor>& last_values,
                      at::Tensor& advantages, at::Tensor& returns, double gamma, double c) {
  constexpr const char* op = kValues ? "gae" : "discounted_returns";
  if (rewards.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), op, [&] {
    using out_t = compute_t<scalar_t>;
    forward<kValues, scalar_t, out_t>(rewards, values, mask, last_values, advantages, returns,
                                      gamma, c);
  });
}

// grad_advantages doubles as the returns' gradient without kValues; undefined gradients are
// read as an expanded zero. grad_values is unused without kValues.
template <bool kValues, typename grad_t>
void backward(const at::Tensor& grad_advantages, const at::Tensor& grad_returns,
              const at::Tensor& mask, at::Tensor& grad_rewards, at::Tensor& grad_values,
              at::Tensor& grad_last_values, double gamma, double c) {
  const int64_t rows = mask.size(0);
  const int64_t steps = mask.size(1);
  if (steps == 0) {  // no valid position: nothing reaches last_values
    grad_last_values.zero_();
    return;
  }
  const Rows<grad_t> ga(grad_advantages);
  const Rows<grad_t> gr = kValues ? Rows<grad_t>(grad_returns) : Rows<grad_t>();
  const Rows<uint8_t> m(mask);
  grad_t* g_rewards = grad_rewards.mutable_data_ptr<grad_t>();
  grad_t* g_values = kValues ? grad_values.mutable_data_ptr<grad_t>() : nullptr;
  grad_t* g_last = grad_last_values.mutable_data_ptr<grad_t>();

  const TimeBlocks blocks(rows, steps);
  const int64_t per_row = blocks.count();
  const auto span = [&](int64_t row, int64_t t0) {
    const int64_t offset = row * steps + t0;
    return BackwardSpan<grad_t>{
        ga.ptr(row, t0), ga.col_stride,
        kValues ? gr.ptr(row, t0) : nullptr, gr.col_stride,
        m.ptr(row, t0), m.col_stride,
        g_rewards + offset, kValues ? g_values + offset : nullptr};
  };

  std::vector<BackwardScan> scans(rows * per_row);
  at::parallel_for(0, rows * per_row, per_row > 1 ? 1 : rows_per_task(steps, grain::kScan),
                   [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) {
      const int64_t row = lane / per_row, block = lane % per_row;
      scans[lane] = scan_backward<kValues>(span(row, blocks.begin(block)), blocks.length(block),
                                           0.0, gamma, c);
    }
  });

  // The first block's zero carry is exact; the carry into each later block is G at the last
  // valid position before it.
  std::vector<double> carry_in(rows * per_row, 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    double state = 0.0;
    for (int64_t block = 0; block < per_row; ++block) {
      const BackwardScan& scan = scans[row * per_row + block];
      carry_in[row * per_row + block] = state;
      if (scan.valid > 0) state = scan.carry + std::pow(c, double(scan.valid)) * state;
    }
    // last_values is V after the last valid position: it enters that position's delta.
    g_last[row] = static_cast<grad_t>(gamma * state);
  }
  if (per_row == 1) return;
  at::parallel_for(0, rows * (per_row - 1), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / (per_row - 1), block = 1 + i % (per_row - 1);
      const auto s = span(row, blocks.begin(block));
      add_backward_carry<kValues>(s.mask, s.mask_stride, s.grad_rewards, s.grad_values,
                                  blocks.length(block), carry_in[row * per_row + block], gamma,
                                  c);
    }
  });
}

// Incoming gradients in the gradients' dtype (fp64 if any is fp64, else fp32); an absent one
// becomes a zero expanded to [B, T], which costs no memory.
at::Tensor incoming_gradient(const char* op, const char* name,
                             const std::optional<at::Tensor>& grad, const at::Tensor& mask,
                             at::ScalarType dtype) {
  if (!grad) return at::zeros({}, mask.options().dtype(dtype)).expand(mask.sizes());
  check_cpu(op, name, *grad);
  check_floating(op, name, *grad);
  check_shape(op, name, *grad, mask.sizes());
  return grad->to(dtype);
}

at::ScalarType gradient_dtype(std::initializer_list<const std::optional<at::Tensor>*> grads) {
  for (const auto* g : grads) {
    if (*g && (*g)->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask,
                                           const std::optional<at::Tensor>& last_values,
                                           double gamma, double lam) {
  constexpr const char* op = "gae";
  gae_checks::check_forward_inputs(op, rewards, &values, mask, last_values, kCpu);
  check_gamma_lam(op, gamma, lam);
  const auto options = rewards.options().dtype(result_dtype(rewards));
  at::Tensor advantages = at::empty(rewards.sizes(), options);
  at::Tensor returns = at::empty(rewards.sizes(), options);
  dispatch_forward<true>(rewards, values, mask, last_values, advantages, returns, gamma,
                         gamma * lam);
  return {advantages, returns};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gae_backward_cpu(
    const std::optional<at::Tensor>& grad_advantages,
    const std::optional<at::Tensor>& grad_returns, const at::Tensor& mask, double gamma,
    double lam) {
  constexpr const char* op = "gae_backward";
  gae_checks::check_mask(op, mask, kCpu);
  check_gamma_lam(op, gamma, lam);
  const at::ScalarType dtype = gradient_dtype({&grad_advantages, &grad_returns});
  const at::Tensor ga = incoming_gradient(op, "grad_advantages", grad_advantages, mask, dtype);
  const at::Tensor gr = incoming_gradient(op, "grad_returns", grad_returns, mask, dtype);
  const auto options = mask.options().dtype(dtype);
  at::Tensor grad_rewards = at::empty(mask.sizes(), options);
  at::Tensor grad_values = at::empty(mask.sizes(), options);
  at::Tensor grad_last_values = at::empty({mask.size(0)}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    backward<true, scalar_t>(ga, gr, mask, grad_rewards, grad_values, grad_last_values, gamma,
                             gamma * lam);
  });
  return {grad_rewards, grad_values, grad_last_values};
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& last_values, double gamma) {
  constexpr const char* op = "discounted_returns";
  gae_checks::check_forward_inputs(op, rewards, nullptr, mask, last_values, kCpu);
  check_gamma_lam(op, gamma, 1.0);
  at::Tensor returns = at::empty(rewards.sizes(), rewards.options().dtype(result_dtype(rewards)));
  at::Tensor unused;
  dispatch_forward<false>(rewards, at::Tensor(), mask, last_values, returns, unused, gamma,
                          gamma);
  return returns;
}

std::tuple<at::Tensor, at::Tensor> discounted_returns_backward_cpu(const at::Tensor& grad_returns,
                                                                   const at::Tensor& mask,
                                                                   double gamma) {
  constexpr const char* op = "discounted_returns_backward";
  gae_checks::check_mask(op, mask, kCpu);
  check_gamma_lam(op, gamma, 1.0);
  const std::optional<at::Tensor> grad(grad_returns);
  const at::ScalarType dtype = gradient_dtype({&grad});
  const at::Tensor g = incoming_gradient(op, "grad_returns", grad, mask, dtype);
  const auto options = mask.options().dtype(dtype);
  at::Tensor grad_rewards = at::empty(mask.sizes(), options);
  at::Tensor grad_last_values = at::empty({mask.size(0)}, options);
  at::Tensor unused;
  AT_DISPATCH_FLOATING_TYPES(dtype, op, [&] {
    backward<false, scalar_t>(g, at::Tensor(), mask, grad_rewards, unused, grad_last_values,
                              gamma, gamma);
  });
  return {grad_rewards, grad_last_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("gae_backward", &gae_backward_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("discounted_returns_backward", &discounted_returns_backward_cpu);
}

}  // namespace rlengine::cpu
