// Typed handles of the dst_kernels ops that C++ calls through the dispatcher (looked up once
// each), and the argument checks that the device-independent and CPU kernels of a family share.
// Host code only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace dst {
namespace ops {

using at::Tensor;

template <typename Sig>
inline c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline const auto& mask_op() {
  static const auto op =
      find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, std::optional<double>)>(
          "dst_kernels::dst_mask");
  return op;
}

inline const auto& weight_grad_op() {
  static const auto op =
      find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>(
          "dst_kernels::dst_weight_grad");
  return op;
}

inline const auto& weight_grad_inplace_op() {
  static const auto op =
      find_op<Tensor(Tensor&, const Tensor&, const Tensor&)>("dst_kernels::dst_weight_grad_");
  return op;
}

inline const auto& linear_op() {
  static const auto op = find_op<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
      std::optional<double>)>("dst_kernels::dst_linear");
  return op;
}

inline const auto& conv2d_op() {
  static const auto op = find_op<std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, at::IntArrayRef,
      at::IntArrayRef, at::IntArrayRef, int64_t, std::optional<double>)>("dst_kernels::dst_conv2d");
  return op;
}

inline const auto& linear_grad_input_op() {
  static const auto op =
      find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&)>(
          "dst_kernels::dst_linear_grad_input");
  return op;
}

inline const auto& linear_weight_grad_op() {
  static const auto op =
      find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&)>("dst_kernels::dst_linear_weight_grad");
  return op;
}

inline const auto& conv2d_grad_input_op() {
  static const auto op =
      find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                     at::IntArrayRef, at::IntArrayRef, int64_t)>(
          "dst_kernels::dst_conv2d_grad_input");
  return op;
}

}  // namespace ops

// dst_linear's arguments: a 2-D weight [out, in] and x with `in` features last.
inline void check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x must have ", weight.size(1),
              " features in its last dimension, got ", x.sizes());
}

// dst_linear_grad_input's arguments: a 2-D weight [out, in] and grad_y with `out` features last.
inline void check_grad_input_args(const char* op, const at::Tensor& grad_y,
                                  const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.sizes());
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == weight.size(0), op, ": grad_y must have ",
              weight.size(0), " features in its last dimension, got ", grad_y.sizes());
}

// dst_linear_weight_grad's arguments: a 2-D weight [out, in], grad_y with `out` and x with `in`
// features last, as many rows as each other, one dtype and device.
inline void check_weight_grad_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& weight) {
  check_linear_args(op, x, weight);
  check_grad_input_args(op, grad_y, weight);
  TORCH_CHECK(grad_y.numel() / weight.size(0) == x.numel() / weight.size(1), op,
              ": grad_y and x must have as many rows, got shapes ", grad_y.sizes(), " and ",
              x.sizes());
  TORCH_CHECK(
      grad_y.scalar_type() == weight.scalar_type() && x.scalar_type() == weight.scalar_type(), op,
      ": grad_y, x and weight must share a dtype, got ", grad_y.scalar_type(), ", ",
      x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(grad_y.device() == weight.device() && x.device() == weight.device(), op,
              ": grad_y, x and weight must be on one device, got ", grad_y.device(), ", ",
              x.device(), " and ", weight.device());
}

// dst_linear_grad_input's `masked` (the forward's P): W's shape, dtype and device, contiguous.
inline void check_masked_arg(const char* op, const at::Tensor& masked, const at::Tensor& weight) {
  TORCH_CHECK(masked.sizes() == weight.sizes() && masked.scalar_type() == weight.scalar_type() &&
                  masked.device() == weight.device(),
              op, ": masked must be the weight's masked form P (", weight.sizes(), ", ",
              weight.scalar_type(), ", ", weight.device(), "), got ", masked.sizes(), ", ",
              masked.scalar_type(), ", ", masked.device());
  TORCH_CHECK(masked.is_contiguous(), op, ": masked must be contiguous");
}

// dst_conv2d_grad_input's arguments: 4-D grad_y [N, out, OH, OW], x [N, in, H, W], weight.
inline void check_conv2d_grad_input_args(const char* op, const at::Tensor& grad_y,
                                         const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D, got ", weight.sizes());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0),
              op, ": grad_y must be 4-D [", x.size(0), ", ", weight.size(0), ", OH, OW], got ",
              grad_y.sizes());
}

// dX of a convolution with weight p by ATen (cuDNN / oneDNN / the CPU kernels).
inline at::Tensor conv2d_grad_input_dense(const at::Tensor& grad_y, const at::Tensor& x,
                                          const at::Tensor& p, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t groups) {
  const int64_t zeros[2] = {0, 0};
  return std::get<0>(at::convolution_backward(grad_y, x, p, std::nullopt, stride, padding, dilation,
                                              /*transposed=*/false, at::IntArrayRef(zeros, 2),
                                              groups, {true, false, false}));
}

}  // namespace dst
