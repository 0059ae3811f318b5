// CPU kernels of the linear op family. They override the device-independent dst_linear /
// dst_linear_grad_input of csrc/linear.cpp (CompositeExplicitAutograd) on CPU tensors with the
// density switch: the mask pass (P, t_eff, and the kept count of every row), then below the
// measured crossover the product with the compressed P from the sparse family
// (csrc/cpu/sparse.cpp), else ATen's GEMM with P.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dst/checks.h"
#include "dst/cpu_kernels.h"
#include "dst/dispatch.h"
#include "dst/sparse.h"

namespace dst {
namespace {

using at::Tensor;

// dst_linear on the CPU: the mask pass (P, t_eff, and the kept count of every row); below
// the crossover the CSR of P from those counts and y = x P^T + b from it, else ATen's GEMM.
std::tuple<Tensor, Tensor, Tensor> dst_linear_cpu(const Tensor& x, const Tensor& weight,
                                                  const Tensor& threshold,
                                                  const std::optional<Tensor>& bias,
                                                  std::optional<double> min_density) {
  check_linear_args("dst_linear", x, weight);
  check_weight_threshold("dst_linear", weight, threshold);
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  Tensor masked = at::empty_like(weight);
  Tensor t_eff = threshold.contiguous().clone();
  std::vector<int64_t> counts(rows);
  const int64_t kept = cpu::mask_into(weight, min_density, masked, t_eff, counts.data());
  const bool has_bias = bias.has_value() && bias->defined();
  const bool plain = x.scalar_type() == weight.scalar_type() &&
                     (!has_bias || (bias->scalar_type() == weight.scalar_type() &&
                                    bias->dim() == 1 && bias->size(0) == rows));
  const int64_t tokens = x.numel() / cols;
  if (!plain || x.numel() == 0 || !sparse::take(kept, tokens, cols, rows)) {
    return {at::linear(x, masked, bias), masked, t_eff};
  }
  Tensor y = sparse::product_from_counts(x, weight, t_eff, counts.data(), bias, false);
  return {y, masked, t_eff};
}

// dX = dY P. The mask pass (P and the kept count of every row, as in the forward), or, given
// the forward's P, a read-only pass counting its nonzeros per row; below the crossover dX
// comes from the CSR of P^T (the CSR of P transposed), else from ATen's GEMM with P.
Tensor dst_linear_grad_input_cpu(const Tensor& grad_y, const Tensor& weight,
                                 const Tensor& threshold, const std::optional<Tensor>& given) {
  check_grad_input_args("dst_linear_grad_input", grad_y, weight);
  check_weight_threshold("dst_linear_grad_input", weight, threshold);
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  const bool has_masked = given.has_value() && given->defined();
  std::vector<int64_t> counts(rows);
  Tensor masked, t;
  int64_t kept = 0;
  if (has_masked) {
    check_masked_arg("dst_linear_grad_input", *given, weight);
    masked = *given;
    // The CSR of P's nonzeros: |P| > 0.
    t = at::zeros({rows}, weight.options());
    kept = sparse::nonzero_counts(masked, counts.data());
  } else {
    masked = at::empty_like(weight);
    t = threshold.contiguous().clone();
    kept = cpu::mask_into(weight, std::nullopt, masked, t, counts.data());
  }
  const int64_t tokens = grad_y.numel() / rows;
  if (grad_y.scalar_type() != weight.scalar_type() || grad_y.numel() == 0 ||
      !sparse::take(kept, tokens, cols, rows)) {
    return grad_y.matmul(masked);
  }
  return sparse::product_from_counts(grad_y, has_masked ? masked : weight, t, counts.data(),
                                     std::nullopt, true);
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CPU, m) {
  m.impl("dst_linear", &dst::dst_linear_cpu);
  m.impl("dst_linear_grad_input", &dst::dst_linear_grad_input_cpu);
}
