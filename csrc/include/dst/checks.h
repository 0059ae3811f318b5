// Argument checks shared by the CPU and CUDA implementations (host code only).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace dst {

// Layout the kernels walk: dim 0 outermost and every row one contiguous block
// (plain contiguous, or channels_last for a 4-D conv weight).
inline at::MemoryFormat row_major_format(const at::Tensor& weight) {
  if (weight.dim() == 4 && !weight.is_contiguous() &&
      weight.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline void check_weight_threshold(const char* op, const at::Tensor& weight,
                                   const at::Tensor& threshold) {
  TORCH_CHECK(weight.is_floating_point(), op, ": weight must be a floating-point tensor, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() >= 2, op, ": weight must have at least 2 dimensions [out, ...], got ",
              weight.sizes());
  TORCH_CHECK(weight.numel() > 0, op, ": weight must not be empty, got shape ", weight.sizes());
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == weight.size(0), op,
              ": threshold must have shape [", weight.size(0),
              "] (one per output row of weight), got ", threshold.sizes());
  TORCH_CHECK(threshold.scalar_type() == weight.scalar_type(), op, ": threshold has dtype ",
              threshold.scalar_type(), " but weight has ", weight.scalar_type());
  TORCH_CHECK(threshold.device() == weight.device(), op, ": threshold is on ", threshold.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(weight.is_contiguous(row_major_format(weight)), op,
              ": weight must be contiguous (or channels_last for a 4-D weight); try .contiguous()");
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& weight) {
  TORCH_CHECK(grad.sizes() == weight.sizes(), op, ": grad_masked must have the shape of weight ",
              weight.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), op, ": grad_masked has dtype ",
              grad.scalar_type(), " but weight has ", weight.scalar_type());
  TORCH_CHECK(grad.device() == weight.device(), op, ": grad_masked is on ", grad.device(),
              " but weight is on ", weight.device());
}

// The in-place weight-gradient op overwrites grad_masked element by element: it must
// be laid out like weight and own its memory (no overlap, no broadcast).
inline void check_inplace_grad(const char* op, const at::Tensor& grad, const at::Tensor& weight) {
  TORCH_CHECK(grad.is_contiguous(row_major_format(weight)) && grad.strides() == weight.strides(),
              op, ": grad_masked must have the memory layout of weight (strides ", weight.strides(),
              "), got strides ", grad.strides(), "; use the out-of-place dst_weight_grad");
}

// The two weight-gradient entry points around a device's
// into(g, weight, t, grad_w, grad_t) kernel launcher (CPU and CUDA share them;
// CUDA sets its device guard before calling).
template <typename Into>
std::tuple<at::Tensor, at::Tensor> weight_grad_out_of_place(const at::Tensor& grad_masked,
                                                            const at::Tensor& weight,
                                                            const at::Tensor& threshold,
                                                            Into into) {
  check_weight_threshold("dst_weight_grad", weight, threshold);
  check_grad("dst_weight_grad", grad_masked, weight);
  const at::Tensor g = grad_masked.contiguous(row_major_format(weight));
  const at::Tensor t = threshold.contiguous();
  at::Tensor grad_w = at::empty_like(weight);
  at::Tensor grad_t = at::empty_like(t);
  into(g, weight, t, grad_w, grad_t);
  return {grad_w, grad_t};
}

template <typename Into>
at::Tensor weight_grad_in_place(at::Tensor& grad_masked, const at::Tensor& weight,
                                const at::Tensor& threshold, Into into) {
  check_weight_threshold("dst_weight_grad_", weight, threshold);
  check_grad("dst_weight_grad_", grad_masked, weight);
  check_inplace_grad("dst_weight_grad_", grad_masked, weight);
  const at::Tensor t = threshold.contiguous();
  at::Tensor grad_t = at::empty_like(t);
  into(grad_masked, weight, t, grad_masked, grad_t);
  return grad_t;
}

}  // namespace dst
