// dst_kernels::dst_linear for every device: the fused mask op, then ATen's linear
// (MKL / cuBLAS). Registered as CompositeExplicitAutograd; its autograd is in
// csrc/autograd.cpp and never materialises the mask.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "dst/dispatch.h"

namespace dst {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dst_linear(const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& threshold,
                                                          const std::optional<at::Tensor>& bias,
                                                          std::optional<double> min_density) {
  check_linear_args("dst_linear", x, weight);
  auto [masked, t_eff] = ops::mask_op().call(weight, threshold, min_density);
  at::Tensor y = at::linear(x, masked, bias);
  return {y, masked, t_eff};
}

// dX = dY P with P recomputed by the mask op, or the forward's P when given: the dense path
// of every device (the CPU kernel in csrc/cpu/linear.cpp overrides it with the density
// switch).
at::Tensor dst_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight,
                                 const at::Tensor& threshold,
                                 const std::optional<at::Tensor>& masked) {
  check_grad_input_args("dst_linear_grad_input", grad_y, weight);
  if (masked.has_value() && masked->defined()) {
    check_masked_arg("dst_linear_grad_input", *masked, weight);
    return grad_y.matmul(*masked);
  }
  return grad_y.matmul(std::get<0>(ops::mask_op().call(weight, threshold, std::nullopt)));
}

// (dW, dt) from G = dY^T X: one GEMM, then the estimator pass over its buffer (the dense path
// of every device; csrc/cpu/linear.cpp overrides it on the CPU).
std::tuple<at::Tensor, at::Tensor> dst_linear_weight_grad(const at::Tensor& grad_y,
                                                          const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& threshold) {
  check_weight_grad_args("dst_linear_weight_grad", grad_y, x, weight);
  at::Tensor g = grad_y.reshape({-1, weight.size(0)}).t().mm(x.reshape({-1, weight.size(1)}));
  at::Tensor grad_t = ops::weight_grad_inplace_op().call(g, weight, threshold);
  return {g, grad_t};
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CompositeExplicitAutograd, m) {
  m.impl("dst_linear", &dst::dst_linear);
  m.impl("dst_linear_grad_input", &dst::dst_linear_grad_input);
  m.impl("dst_linear_weight_grad", &dst::dst_linear_weight_grad);
}
