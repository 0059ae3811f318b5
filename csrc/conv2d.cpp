// dst_kernels::dst_conv2d and dst_conv2d_grad_input for every device: the fused mask op, then
// ATen's convolution (cuDNN / oneDNN / the CPU kernels); the CPU kernels of
// csrc/cpu/sparse_conv.cpp override both with the density switch. CompositeExplicitAutograd; its
// autograd is in csrc/autograd.cpp and keeps neither the mask nor P.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "dst/dispatch.h"

namespace dst {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dst_conv2d(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& threshold,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::optional<double> min_density) {
  TORCH_CHECK(weight.dim() == 4, "dst_conv2d: weight must be 4-D, got ", weight.sizes());
  TORCH_CHECK(x.dim() == 4, "dst_conv2d: x must be 4-D [N, C, H, W], got ", x.sizes());
  auto [masked, t_eff] = ops::mask_op().call(weight, threshold, min_density);
  const int64_t zeros[2] = {0, 0};
  at::Tensor y = at::convolution(x, masked, bias, stride, padding, dilation, /*transposed=*/false,
                                 at::IntArrayRef(zeros, 2), groups);
  return {y, masked, t_eff};
}

// dX = conv_transpose(dY, P) with P recomputed by the mask op: the dense path of every device
// (the CPU kernel in csrc/cpu/sparse_conv.cpp overrides it with the density switch).
at::Tensor dst_conv2d_grad_input(const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& weight, const at::Tensor& threshold,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  check_conv2d_grad_input_args("dst_conv2d_grad_input", grad_y, x, weight);
  const at::Tensor p = std::get<0>(ops::mask_op().call(weight, threshold, std::nullopt));
  return conv2d_grad_input_dense(grad_y, x, p, stride, padding, dilation, groups);
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CompositeExplicitAutograd, m) {
  m.impl("dst_conv2d", &dst::dst_conv2d);
  m.impl("dst_conv2d_grad_input", &dst::dst_conv2d_grad_input);
}
