// CPU kernels of the linear op family. They override the device-independent dst_linear /
// dst_linear_grad_input of csrc/linear.cpp (CompositeExplicitAutograd) on CPU tensors with the
// density switch: the mask pass (P, t_eff, and the kept count of every row), then below the
// measured crossover the product with the compressed P from the sparse family
// (csrc/cpu/sparse.cpp), else ATen's GEMM with P. P and dW come from the recycled buffers of
// dst/recycle.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dst/checks.h"
#include "dst/cpu_kernels.h"
#include "dst/dispatch.h"
#include "dst/recycle.h"
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
  Tensor masked = cpu::recycled_empty_like(weight);
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
    masked = cpu::recycled_empty_like(weight);
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

// (dW, dt) from G = dY^T X with the estimator pass fused behind the GEMM: the rows of G are
// cut into blocks, each thread computes a block with one single-threaded GEMM call (MKL runs
// sequentially inside the parallel region) and runs the pass over those rows right after, while
// they are in its cache. One multi-threaded GEMM followed by the pass made each thread read
// rows that the other thread's GEMM had written (at 64x784x300 the pass took 60 us after the
// GEMM against 27 us on its own). Taken where one block per thread fits in L2 and the layer is
// not tiny; elsewhere (and with one thread) the GEMM and then the pass: smaller blocks repack
// X for every GEMM call, which made 1024x4096x1024 1.5x slower (in one run).
constexpr int64_t kFusedMinElements = 32768;
constexpr int64_t kFusedMaxBlockBytes = int64_t(1) << 20;

std::tuple<Tensor, Tensor> dst_linear_weight_grad_cpu(const Tensor& grad_y, const Tensor& x,
                                                      const Tensor& weight,
                                                      const Tensor& threshold) {
  constexpr const char* op = "dst_linear_weight_grad";
  check_weight_grad_args(op, grad_y, x, weight);
  check_weight_threshold(op, weight, threshold);
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.size(1);
  const Tensor dy = grad_y.reshape({-1, rows});
  const Tensor x2 = x.reshape({-1, cols});
  const auto dtype = weight.scalar_type();
  Tensor grad_w = cpu::recycled_empty_like(weight);
  const Tensor t = threshold.contiguous();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (rows + threads - 1) / threads;
  const int64_t block_bytes = per_thread * cols * weight.element_size();
  if ((dtype != at::kFloat && dtype != at::kDouble) || dy.size(0) == 0 || threads == 1 ||
      rows * cols < kFusedMinElements || block_bytes > kFusedMaxBlockBytes) {
    at::mm_out(grad_w, dy.t(), x2);
    return {grad_w, ops::weight_grad_inplace_op().call(grad_w, weight, t)};
  }
  Tensor grad_t = at::empty_like(t);
  const Tensor dyt = dy.contiguous().t();
  const Tensor xc = x2.contiguous();
  const int64_t block = per_thread;
  const int64_t blocks = (rows + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    // Below autograd on every thread (dispatch keys are thread-local; a worker starts above).
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t i = b; i < e; ++i) {
      const int64_t r0 = i * block;
      const int64_t n = std::min(rows, r0 + block) - r0;
      Tensor out = grad_w.narrow(0, r0, n);
      at::mm_out(out, dyt.narrow(0, r0, n), xc);
      cpu::weight_grad_rows(grad_w, weight, t, grad_w, grad_t, r0, r0 + n);
    }
  });
  return {grad_w, grad_t};
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CPU, m) {
  m.impl("dst_linear", &dst::dst_linear_cpu);
  m.impl("dst_linear_grad_input", &dst::dst_linear_grad_input_cpu);
  m.impl("dst_linear_weight_grad", &dst::dst_linear_weight_grad_cpu);
}
