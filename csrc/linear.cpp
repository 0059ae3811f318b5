// dst_kernels::dst_linear for every device: the fused mask op, then ATen's linear
// (MKL / cuBLAS). Registered as CompositeExplicitAutograd; its autograd is in
// csrc/autograd.cpp and never materialises the mask.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace dst {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dst_linear(const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& threshold,
                                                          const std::optional<at::Tensor>& bias,
                                                          std::optional<double> min_density) {
  TORCH_CHECK(weight.dim() == 2, "dst_linear: weight must be 2-D [out, in], got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "dst_linear: x must have ",
              weight.size(1), " features in its last dimension, got ", x.sizes());
  static auto mask_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("dst_kernels::dst_mask", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, std::optional<double>)>();
  auto [masked, t_eff] = mask_op.call(weight, threshold, min_density);
  at::Tensor y = at::linear(x, masked, bias);
  return {y, masked, t_eff};
}

// dX = dY P with P recomputed by the mask op: the dense path of every device (the CPU
// kernel in csrc/cpu/sparse.cpp overrides it with the density switch).
at::Tensor dst_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight,
                                 const at::Tensor& threshold) {
  TORCH_CHECK(weight.dim() == 2, "dst_linear_grad_input: weight must be 2-D [out, in], got ",
              weight.sizes());
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == weight.size(0),
              "dst_linear_grad_input: grad_y must have ", weight.size(0),
              " features in its last dimension, got ", grad_y.sizes());
  static auto mask_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("dst_kernels::dst_mask", "")
                            .typed<std::tuple<at::Tensor, at::Tensor>(
                                const at::Tensor&, const at::Tensor&, std::optional<double>)>();
  return grad_y.matmul(std::get<0>(mask_op.call(weight, threshold, std::nullopt)));
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CompositeExplicitAutograd, m) {
  m.impl("dst_linear", &dst::dst_linear);
  m.impl("dst_linear_grad_input", &dst::dst_linear_grad_input);
}
