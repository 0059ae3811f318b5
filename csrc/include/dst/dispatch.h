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
  static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>(
      "dst_kernels::dst_linear_grad_input");
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

}  // namespace dst
