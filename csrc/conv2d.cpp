// dst_kernels::dst_conv2d for every device: the fused mask op, then ATen's convolution
// (cuDNN / oneDNN / the CPU kernels). CompositeExplicitAutograd; its autograd is in
// csrc/autograd.cpp and keeps neither the mask nor P.
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

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CompositeExplicitAutograd, m) {
  m.impl("dst_conv2d", &dst::dst_conv2d);
}
