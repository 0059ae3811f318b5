// CPU kernels of the conv2d op family. They override the device-independent dst_conv2d /
// dst_conv2d_grad_input of csrc/conv2d.cpp (CompositeExplicitAutograd) on CPU tensors with the
// density switch: the mask pass (P, t_eff, and the kept count of every filter), then below the
// measured crossover the direct sparse convolution with the compressed P from the sparse
// family (csrc/cpu/sparse.cpp), else ATen's convolution with P. dW stays dense (the estimator
// needs dL/dP everywhere): csrc/autograd.cpp computes it with ATen's convolution backward.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "dst/checks.h"
#include "dst/cpu_kernels.h"
#include "dst/dispatch.h"
#include "dst/recycle.h"
#include "dst/sparse.h"

namespace dst {
namespace {

using at::Tensor;

// Whether the CPU training kernels can run this convolution sparse: groups 1, plain NCHW
// input, a contiguous weight, one dtype, a valid geometry with padding within the dilated
// kernel (which dX's sparse path needs).
bool sparse_eligible(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                     int64_t groups) {
  if (groups != 1 || x.dim() != 4 || weight.dim() != 4 || !x.is_contiguous() ||
      !weight.is_contiguous() || x.scalar_type() != weight.scalar_type() || x.numel() == 0 ||
      x.size(1) != weight.size(1)) {
    return false;
  }
  if (bias.has_value() && bias->defined() &&
      (bias->scalar_type() != weight.scalar_type() || bias->dim() != 1 ||
       bias->size(0) != weight.size(0))) {
    return false;
  }
  if (stride.size() != 2 || padding.size() != 2 || dilation.size() != 2 || stride[0] < 1 ||
      stride[1] < 1 || padding[0] < 0 || padding[1] < 0 || dilation[0] < 1 || dilation[1] < 1) {
    return false;
  }
  const int64_t keh = dilation[0] * (weight.size(2) - 1) + 1;
  const int64_t kew = dilation[1] * (weight.size(3) - 1) + 1;
  return padding[0] <= keh - 1 && padding[1] <= kew - 1 && x.size(2) + 2 * padding[0] >= keh &&
         x.size(3) + 2 * padding[1] >= kew;
}

std::pair<int64_t, int64_t> out_hw(const Tensor& x, const Tensor& weight, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t oh =
      (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t ow =
      (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  return {oh, ow};
}

// dst_conv2d on the CPU: the mask pass (P, t_eff, the kept count of every filter); below the
// crossover y from the CSR of P, else ATen's convolution with P.
std::tuple<Tensor, Tensor, Tensor> dst_conv2d_cpu(const Tensor& x, const Tensor& weight,
                                                  const Tensor& threshold,
                                                  const std::optional<Tensor>& bias,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, int64_t groups,
                                                  std::optional<double> min_density) {
  TORCH_CHECK(weight.dim() == 4, "dst_conv2d: weight must be 4-D, got ", weight.sizes());
  TORCH_CHECK(x.dim() == 4, "dst_conv2d: x must be 4-D [N, C, H, W], got ", x.sizes());
  check_weight_threshold("dst_conv2d", weight, threshold);
  Tensor masked =
      weight.is_contiguous() ? cpu::recycled_empty_like(weight) : at::empty_like(weight);
  Tensor t_eff = threshold.contiguous().clone();
  std::vector<int64_t> counts(weight.size(0));
  const int64_t kept = cpu::mask_into(weight, min_density, masked, t_eff, counts.data());
  const int64_t zeros[2] = {0, 0};
  auto dense = [&] {
    return at::convolution(x, masked, bias, stride, padding, dilation, /*transposed=*/false,
                           at::IntArrayRef(zeros, 2), groups);
  };
  if (!sparse_eligible(x, weight, bias, stride, padding, dilation, groups)) {
    return {dense(), masked, t_eff};
  }
  const auto [oh, ow] = out_hw(x, weight, stride, padding, dilation);
  if (!sparse::take_conv(kept, x.size(0), x.size(1), weight.size(0),
                         weight.size(2) * weight.size(3), oh * ow)) {
    return {dense(), masked, t_eff};
  }
  Tensor y =
      sparse::conv2d_from_counts(x, weight, t_eff, counts.data(), bias, stride, padding, dilation);
  return {y, masked, t_eff};
}

// dX = conv_transpose(dY, P), P recomputed: below the crossover from the CSR of P, else ATen's
// convolution backward with P (dX only).
Tensor dst_conv2d_grad_input_cpu(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                 const Tensor& threshold, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  check_conv2d_grad_input_args("dst_conv2d_grad_input", grad_y, x, weight);
  check_weight_threshold("dst_conv2d_grad_input", weight, threshold);
  Tensor masked =
      weight.is_contiguous() ? cpu::recycled_empty_like(weight) : at::empty_like(weight);
  Tensor t = threshold.contiguous().clone();
  std::vector<int64_t> counts(weight.size(0));
  const int64_t kept = cpu::mask_into(weight, std::nullopt, masked, t, counts.data());
  const bool eligible =
      sparse_eligible(x, weight, std::nullopt, stride, padding, dilation, groups) &&
      grad_y.scalar_type() == weight.scalar_type() && grad_y.numel() > 0;
  if (eligible) {
    const auto [oh, ow] = out_hw(x, weight, stride, padding, dilation);
    if (grad_y.size(2) == oh && grad_y.size(3) == ow &&
        sparse::take_conv(kept, x.size(0), x.size(1), weight.size(0),
                          weight.size(2) * weight.size(3), oh * ow)) {
      return sparse::conv2d_grad_input_from_counts(grad_y, x, weight, t, counts.data(), stride,
                                                   padding, dilation);
    }
  }
  return conv2d_grad_input_dense(grad_y, x, masked, stride, padding, dilation, groups);
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CPU, m) {
  m.impl("dst_conv2d", &dst::dst_conv2d_cpu);
  m.impl("dst_conv2d_grad_input", &dst::dst_conv2d_grad_input_cpu);
}
