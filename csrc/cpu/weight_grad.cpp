// CPU kernel of dst_kernels::dst_weight_grad: one pass over (G, W) per row computing
//   dW = G*M + G*|W|*H(Q)   and   dt[row] = -sum_j G*W*H(Q),   Q = |W| - t[row],
// with a deterministic per-row reduction (each row is reduced by one thread).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "dst/checks.h"
#include "dst/cpu_isa.h"
#include "dst/cpu_kernels.h"
#include "dst/estimator.h"

namespace dst {
namespace {

constexpr int64_t kGrainElements = 16384;

// One row; returns sum_j G*W*H(Q) (accumulated in opmath precision). Branch-free, so
// the compiler vectorises it (OpenMP simd; the reduction order is fixed per build).
// dw may be g itself (the in-place op): element j is read before it is written.
template <typename scalar_t>
inline __attribute__((always_inline)) at::opmath_type<scalar_t> weight_grad_row_impl(
    const scalar_t* g, const scalar_t* __restrict__ w, scalar_t t, scalar_t* dw, int64_t cols) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t tf = static_cast<opmath_t>(t);
  opmath_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < cols; ++j) {
    const opmath_t wf = static_cast<opmath_t>(w[j]);
    const opmath_t gf = static_cast<opmath_t>(g[j]);
    const opmath_t aw = abs_value(wf);
    const opmath_t h = estimator(aw - tf);
    const opmath_t gm = aw > tf ? gf : opmath_t(0);  // G * M
    dw[j] = static_cast<scalar_t>(gm + gf * aw * h);
    acc += gf * wf * h;
  }
  return acc;
}

DST_CPU_MULTIVERSION(weight_grad_row_simd, weight_grad_row_impl)

// float and double rows run the variant of dst::cpu::isa(); half and bfloat16 rows
// (converted element by element) the baseline build.
template <typename scalar_t>
at::opmath_type<scalar_t> weight_grad_row(const scalar_t* g, const scalar_t* w, scalar_t t,
                                          scalar_t* dw, int64_t cols) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return weight_grad_row_simd(g, w, t, dw, cols);
  } else {
    return weight_grad_row_impl(g, w, t, dw, cols);
  }
}

template <typename scalar_t>
void rows_pass(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& t,
               at::Tensor& grad_w, at::Tensor& grad_t, int64_t begin, int64_t end) {
  const int64_t cols = weight.numel() / weight.size(0);
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* tp = t.const_data_ptr<scalar_t>();
  scalar_t* dwp = grad_w.mutable_data_ptr<scalar_t>();
  scalar_t* dtp = grad_t.mutable_data_ptr<scalar_t>();
  for (int64_t r = begin; r < end; ++r) {
    const auto s = weight_grad_row(gp + r * cols, wp + r * cols, tp[r], dwp + r * cols, cols);
    dtp[r] = static_cast<scalar_t>(-s);
  }
}

// dW into grad_w (which may be g itself) and dt into grad_t.
void weight_grad_into(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& t,
                      at::Tensor& grad_w, at::Tensor& grad_t) {
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dst_weight_grad_cpu", [&] {
        const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
        at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
          rows_pass<scalar_t>(g, weight, t, grad_w, grad_t, begin, end);
        });
      });
}

std::tuple<at::Tensor, at::Tensor> dst_weight_grad_cpu(const at::Tensor& grad_masked,
                                                       const at::Tensor& weight,
                                                       const at::Tensor& threshold) {
  return weight_grad_out_of_place(grad_masked, weight, threshold, weight_grad_into);
}

at::Tensor dst_weight_grad_inplace_cpu(at::Tensor& grad_masked, const at::Tensor& weight,
                                       const at::Tensor& threshold) {
  return weight_grad_in_place(grad_masked, weight, threshold, weight_grad_into);
}

}  // namespace

void cpu::weight_grad_rows(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& t,
                           at::Tensor& grad_w, at::Tensor& grad_t, int64_t begin, int64_t end) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dst_weight_grad_rows",
      [&] { rows_pass<scalar_t>(g, weight, t, grad_w, grad_t, begin, end); });
}
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CPU, m) {
  m.impl("dst_weight_grad", &dst::dst_weight_grad_cpu);
  m.impl("dst_weight_grad_", &dst::dst_weight_grad_inplace_cpu);
}
