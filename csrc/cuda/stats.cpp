// Torch-facing glue of the masked statistics' CUDA kernels (csrc/cuda/stats.cu): the argument
// checks shared with the CPU kernels (csrc/cpu/stats_checks.h, same messages), device checks,
// output and workspace allocation and the launch on torch's current stream.
//
// Layout: x and mask are made contiguous, as the CPU kernels do (a no-op for the usual
// contiguous inputs; a mask broadcast by the Python wrapper, e.g. [B, 1] expanded to [B, T], is
// materialized here at one byte per element). Incoming gradients are read in place where their
// layout is a single stride (an expanded gradient of .sum() or .mean() is never copied).
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu/stats_checks.h"
#include "cuda/glue.h"
#include "cuda/stats.h"

namespace rlengine::cuda {
namespace {

using cpu::stats_checks::check_eps;
using cpu::stats_checks::reduced_shape;
using cpu::stats_checks::wrap_dim;

void check_x_and_mask(const char* op, const at::Tensor& x, const at::Tensor& mask) {
  check_is_cuda(op, "x", x);
  cpu::stats_checks::check_x_and_mask(op, x, mask, x.device());
}

// Arguments for x (or, for masked_mean_backward, the mask) viewed as [outer, len, inner] around
// the reduced dim; dim=None reduces everything (outer = inner = 1).
MaskedStatsArgs args_for(MaskedStatsOp op, const at::Tensor& shape_of, std::optional<int64_t> dim,
                         const at::Tensor& mask) {
  MaskedStatsArgs args{};
  args.op = op;
  args.mask = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  args.outer = 1;
  args.inner = 1;
  if (!dim) {
    args.len = shape_of.numel();
  } else {
    for (int64_t d = 0; d < *dim; ++d) args.outer *= shape_of.size(d);
    args.len = shape_of.size(*dim);
    for (int64_t d = *dim + 1; d < shape_of.dim(); ++d) args.inner *= shape_of.size(d);
  }
  return args;
}

// The incoming gradient as the kernels read it: in place through a single stride where its
// layout allows, else a contiguous copy (kept alive in `holder`).
void set_grad(MaskedStatsArgs& args, const at::Tensor& grad, at::Tensor& holder) {
  holder = grad;
  std::optional<int64_t> stride = linear_stride(holder);
  if (!stride) {
    holder = holder.contiguous();
    stride = 1;
  }
  args.grad = holder.const_data_ptr();
  args.grad_dtype = dtype_of(holder);
  args.grad_stride = *stride;
}

// Allocates the split reductions' workspace (none for most shapes) and launches.
void launch(const char* op, MaskedStatsArgs& args, const at::Tensor& like) {
  const int64_t bytes = masked_stats_workspace_bytes(args);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({bytes}, like.options().dtype(at::kByte));
    args.workspace = workspace.mutable_data_ptr();
  }
  check_launch(op, launch_masked_stats(args, current_stream()));
}

// ---- masked_mean ------------------------------------------------------------------------------

// masked_mean and masked_var: one reduction of x over the mask along dim (all of it when none).
at::Tensor masked_reduction(const char* op, MaskedStatsOp kind, const at::Tensor& x_in,
                            const at::Tensor& mask_in, std::optional<int64_t> dim_in,
                            bool unbiased) {
  check_x_and_mask(op, x_in, mask_in);
  const auto dim = wrap_dim(op, x_in, dim_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor out = at::empty(reduced_shape(x, dim), x.options().dtype(result_dtype(x)));
  MaskedStatsArgs args = args_for(kind, x, dim, mask);
  args.x = x.const_data_ptr();
  args.dtype = dtype_of(x);
  args.unbiased = unbiased;
  args.out = out.mutable_data_ptr();
  launch(op, args, x);
  return out;
}

at::Tensor masked_mean_cuda(const at::Tensor& x_in, const at::Tensor& mask_in,
                            std::optional<int64_t> dim_in) {
  return masked_reduction("masked_mean", MaskedStatsOp::kMean, x_in, mask_in, dim_in, false);
}

at::Tensor masked_mean_backward_cuda(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                     std::optional<int64_t> dim_in, at::ScalarType dtype) {
  constexpr const char* op = "masked_mean_backward";
  check_is_cuda(op, "grad", grad_in);
  check_cuda(op, "mask", mask_in, grad_in.device());
  check_bool(op, "mask", mask_in);
  check_floating(op, "grad", grad_in);
  check_floating(op, "dtype", dtype);
  const auto dim = wrap_dim(op, mask_in, dim_in);
  check_shape(op, "grad", grad_in, reduced_shape(mask_in, dim));
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor dx = at::empty(mask.sizes(), mask.options().dtype(dtype));
  if (dx.numel() == 0) return dx;
  MaskedStatsArgs args = args_for(MaskedStatsOp::kMeanBackward, mask, dim, mask);
  args.dtype = dtype_of(dtype);
  at::Tensor grad;
  set_grad(args, grad_in, grad);
  args.out = dx.mutable_data_ptr();
  launch(op, args, mask);
  return dx;
}

// ---- masked_var -------------------------------------------------------------------------------

at::Tensor masked_var_cuda(const at::Tensor& x_in, const at::Tensor& mask_in,
                           std::optional<int64_t> dim_in, bool unbiased) {
  return masked_reduction("masked_var", MaskedStatsOp::kVar, x_in, mask_in, dim_in, unbiased);
}

at::Tensor masked_var_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                    const at::Tensor& mask_in, std::optional<int64_t> dim_in,
                                    bool unbiased) {
  constexpr const char* op = "masked_var_backward";
  check_x_and_mask(op, x_in, mask_in);
  check_cuda(op, "grad", grad_in, x_in.device());
  check_floating(op, "grad", grad_in);
  const auto dim = wrap_dim(op, x_in, dim_in);
  check_shape(op, "grad", grad_in, reduced_shape(x_in, dim));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (dx.numel() == 0) return dx;
  MaskedStatsArgs args = args_for(MaskedStatsOp::kVarBackward, x, dim, mask);
  args.x = x.const_data_ptr();
  args.dtype = dtype_of(x);
  args.unbiased = unbiased;
  at::Tensor grad;
  set_grad(args, grad_in, grad);
  args.out = dx.mutable_data_ptr();
  launch(op, args, x);
  return dx;
}

// ---- masked_whiten ----------------------------------------------------------------------------

at::Tensor masked_whiten_cuda(const at::Tensor& x_in, const at::Tensor& mask_in, bool shift_mean,
                              bool unbiased, double eps) {
  constexpr const char* op = "masked_whiten";
  check_x_and_mask(op, x_in, mask_in);
  check_eps(op, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(result_dtype(x)));
  if (out.numel() == 0) return out;
  MaskedStatsArgs args = args_for(MaskedStatsOp::kWhiten, x, std::nullopt, mask);
  args.x = x.const_data_ptr();
  args.dtype = dtype_of(x);
  args.unbiased = unbiased;
  args.shift_mean = shift_mean;
  args.eps = eps;
  args.out = out.mutable_data_ptr();
  launch(op, args, x);
  return out;
}

at::Tensor masked_whiten_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                       const at::Tensor& mask_in, bool shift_mean, bool unbiased,
                                       double eps) {
  constexpr const char* op = "masked_whiten_backward";
  check_x_and_mask(op, x_in, mask_in);
  check_cuda(op, "grad", grad_in, x_in.device());
  check_floating(op, "grad", grad_in);
  check_shape(op, "grad", grad_in, x_in.sizes());
  check_eps(op, eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (dx.numel() == 0) return dx;
  MaskedStatsArgs args = args_for(MaskedStatsOp::kWhitenBackward, x, std::nullopt, mask);
  args.x = x.const_data_ptr();
  args.dtype = dtype_of(x);
  args.unbiased = unbiased;
  args.shift_mean = shift_mean;
  args.eps = eps;
  // The kernel reads the gradient in the working type, as the CPU kernel does (one rounding).
  at::Tensor grad;
  set_grad(args, grad_in.to(result_dtype(x)), grad);
  args.out = dx.mutable_data_ptr();
  launch(op, args, x);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlengine, CUDA, m) {
  m.impl("masked_mean", &masked_mean_cuda);
  m.impl("masked_mean_backward", &masked_mean_backward_cuda);
  m.impl("masked_var", &masked_var_cuda);
  m.impl("masked_var_backward", &masked_var_backward_cuda);
  m.impl("masked_whiten", &masked_whiten_cuda);
  m.impl("masked_whiten_backward", &masked_whiten_backward_cuda);
}

}  // namespace rlengine::cuda
