// Autograd of dst_kernels::dst_mask, dst_linear and dst_conv2d, for every device, in C++:
// one dispatcher call per layer and no Python in the training step. Each backward saves
// x, W and the effective thresholds (the linear one on the CPU also P, when x needs a
// gradient, until dX is computed): P is recomputed where it is not saved (and only when dX
// is needed). dW is written over the
// weight gradient's own buffer by dst_weight_grad_ (linear: inside dst_linear_weight_grad).
//
// Each Function returns only its differentiable output (y, or P for dst_mask); P and the
// effective thresholds leave through an Extras struct beside the autograd graph (they are
// made below autograd and never require grad). Marking them non-differentiable instead
// would break compiled autograd, which does not support that for C++ Functions.
#include <ATen/ATen.h>
#include <ATen/SavedTensorHooks.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "dst/dispatch.h"

namespace dst {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (dW, dt) from G = dL/dP: dW over G's buffer when G has W's layout, else a new tensor.
std::pair<Tensor, Tensor> weight_grads(Tensor grad_p, const Tensor& weight, const Tensor& t_eff) {
  if (grad_p.sizes() == weight.sizes() && grad_p.strides() == weight.strides()) {
    Tensor grad_t = ops::weight_grad_inplace_op().call(grad_p, weight, t_eff);
    return {grad_p, grad_t};
  }
  auto [grad_w, grad_t] = ops::weight_grad_op().call(grad_p, weight, t_eff);
  return {grad_w, grad_t};
}

Tensor if_needed(bool needed, Tensor t) { return needed ? std::move(t) : Tensor(); }

// The outputs that carry no gradient.
struct Extras {
  Tensor masked;
  Tensor t_eff;
};

// Backward with create_graph=True would differentiate through dst_weight_grad and a P
// recomputed from the saved (detached) thresholds: wrong second-order gradients. Refuse.
void check_first_order(const char* op, std::initializer_list<const Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) {
    return;
  }
  for (const Tensor* t : tensors) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !(t->defined() && t->requires_grad()), op,
        ": double backward (create_graph=True) is not supported by the native "
        "backend; use backend=\"reference\" for higher-order gradients");
  }
}

struct MaskFunction : public torch::autograd::Function<MaskFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& weight, const Tensor& threshold,
                               std::optional<double> min_density, Extras* extras) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [masked, t_eff] = ops::mask_op().call(weight, threshold, min_density);
    ctx->save_for_backward({weight, t_eff});
    ctx->set_materialize_grads(false);
    extras->t_eff = t_eff;
    return {masked};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);
    const Tensor& grad_p = grads[0];
    if (!grad_p.defined()) {
      return out;
    }
    const auto saved = ctx->get_saved_variables();
    check_first_order("dst_mask", {&grad_p, &saved[0]});
    auto [grad_w, grad_t] = ops::weight_grad_op().call(grad_p, saved[0], saved[1]);
    out[0] = if_needed(ctx->needs_input_grad(0), grad_w);
    out[1] = if_needed(ctx->needs_input_grad(1), grad_t);
    return out;
  }
};

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const Tensor& threshold, const std::optional<Tensor>& bias,
                               std::optional<double> min_density, Extras* extras) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, masked, t_eff] = ops::linear_op().call(x, weight, threshold, bias, min_density);
    // On the CPU P is kept for dX when x needs a gradient (one weight-sized buffer per layer
    // until the backward): the backward then counts its nonzeros instead of redoing the mask
    // pass. Other devices recompute it. It is held beside the saved variables so that the
    // backward can let go of it as soon as dX is computed (below).
    // Under saved-tensor hooks (activation checkpointing, offloading) P is saved as before, for
    // the hooks to pack, and held until the end of the backward.
    const bool keep_p = weight.is_cpu() && x.requires_grad();
    if (keep_p && at::SavedTensorDefaultHooks::get_hooks().has_value()) {
      ctx->save_for_backward({x, weight, t_eff, masked});
    } else {
      ctx->save_for_backward({x, weight, t_eff});
      ctx->saved_data["masked"] = keep_p ? masked : Tensor();
    }
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->set_materialize_grads(false);
    *extras = {masked, t_eff};
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);
    const Tensor& grad_y = grads[0];
    if (!grad_y.defined()) {
      return out;
    }
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &t_eff = saved[2];
    // P is read once (by dX) and then given back: dW's buffer, of the same size, is taken
    // next. Held until the end of the backward, P and dW would both be new every step, and
    // the allocator hands such pairs back to the system when they are freed together (page
    // faults on every write of the next step). A second backward (retain_graph) recomputes P.
    Tensor masked = saved.size() > 3 ? saved[3] : Tensor();
    if (auto it = ctx->saved_data.find("masked"); it != ctx->saved_data.end()) {
      masked = it->second.toTensor();
      ctx->saved_data.erase(it);
    }
    check_first_order("dst_linear", {&grad_y, &x, &weight});
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(1), need_t = ctx->needs_input_grad(2);
    const Tensor grad_2d = grad_y.reshape({-1, grad_y.size(-1)});
    if (need_x) {
      // dY P (P kept on the CPU, else recomputed; on the CPU the sparse kernel below the
      // density crossover).
      out[0] = ops::linear_grad_input_op().call(
          grad_y, weight, t_eff, masked.defined() ? std::optional<Tensor>(masked) : std::nullopt);
    }
    masked.reset();
    if (need_w || need_t) {
      auto [grad_w, grad_t] = ops::linear_weight_grad_op().call(grad_2d, x, weight, t_eff);
      out[1] = if_needed(need_w, grad_w);
      out[2] = if_needed(need_t, grad_t);
    }
    if (has_bias && ctx->needs_input_grad(3)) {
      out[3] = grad_2d.sum(0);
    }
    return out;
  }
};

struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const Tensor& threshold, const std::optional<Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups,
                               std::optional<double> min_density, Extras* extras) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, masked, t_eff] = ops::conv2d_op().call(x, weight, threshold, bias, stride, padding,
                                                    dilation, groups, min_density);
    ctx->save_for_backward({x, weight, t_eff});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->set_materialize_grads(false);
    *extras = {masked, t_eff};
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);
    const Tensor& grad_y = grads[0];
    if (!grad_y.defined()) {
      return out;
    }
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &t_eff = saved[2];
    check_first_order("dst_conv2d", {&grad_y, &x, &weight});
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const std::array<bool, 3> output_mask = {ctx->needs_input_grad(0),
                                             ctx->needs_input_grad(1) || ctx->needs_input_grad(2),
                                             has_bias && ctx->needs_input_grad(3)};
    if (output_mask[0]) {
      // dX = conv_transpose(dY, P), P recomputed (on the CPU the direct sparse convolution
      // below the density crossover).
      out[0] = ops::conv2d_grad_input_op().call(grad_y, x, weight, t_eff, stride, padding, dilation,
                                                groups);
    }
    Tensor grad_b;
    if (output_mask[1] || output_mask[2]) {
      // The weight and bias gradients read W's shape and layout alone.
      const std::vector<int64_t> bias_sizes = {weight.size(0)};
      const std::vector<int64_t> output_padding = {0, 0};
      auto grads = at::convolution_backward(
          grad_y, x, weight, has_bias ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt, stride,
          padding, dilation, /*transposed=*/false, output_padding, groups,
          {false, output_mask[1], output_mask[2]});
      if (output_mask[1]) {
        auto [grad_w, grad_t] = weight_grads(std::get<1>(grads), weight, t_eff);
        out[1] = if_needed(ctx->needs_input_grad(1), grad_w);
        out[2] = if_needed(ctx->needs_input_grad(2), grad_t);
      }
      grad_b = std::get<2>(grads);
    }
    out[3] = if_needed(output_mask[2], grad_b);
    return out;
  }
};

std::tuple<Tensor, Tensor> dst_mask_autograd(const Tensor& weight, const Tensor& threshold,
                                             std::optional<double> min_density) {
  Extras extras;
  auto out = MaskFunction::apply(weight, threshold, min_density, &extras);
  return {out[0], extras.t_eff};
}

std::tuple<Tensor, Tensor, Tensor> dst_linear_autograd(const Tensor& x, const Tensor& weight,
                                                       const Tensor& threshold,
                                                       const std::optional<Tensor>& bias,
                                                       std::optional<double> min_density) {
  Extras extras;
  auto out = LinearFunction::apply(x, weight, threshold, bias, min_density, &extras);
  return {out[0], extras.masked, extras.t_eff};
}

std::tuple<Tensor, Tensor, Tensor> dst_conv2d_autograd(
    const Tensor& x, const Tensor& weight, const Tensor& threshold,
    const std::optional<Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, std::optional<double> min_density) {
  Extras extras;
  auto out = Conv2dFunction::apply(x, weight, threshold, bias, stride, padding, dilation, groups,
                                   min_density, &extras);
  return {out[0], extras.masked, extras.t_eff};
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, Autograd, m) {
  m.impl("dst_mask", &dst::dst_mask_autograd);
  m.impl("dst_linear", &dst::dst_linear_autograd);
  m.impl("dst_conv2d", &dst::dst_conv2d_autograd);
}
