// CPU kernel of dst_kernels::dst_mask: one pass that tests |W| > t[row], writes
// P = W * M and counts the kept weights; the reset rule (a second pass with t = 0)
// runs only when the count says so.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "dst/checks.h"
#include "dst/cpu_isa.h"
#include "dst/cpu_kernels.h"
#include "dst/estimator.h"

namespace dst {
namespace {

constexpr int64_t kGrainElements = 32768;

// One row: out = w * (|w| > t); returns the number kept. Written branch-free so the
// compiler vectorises it (OpenMP simd) for the instruction set it targets.
template <typename scalar_t>
inline __attribute__((always_inline)) int64_t mask_row_impl(const scalar_t* __restrict__ w,
                                                            scalar_t t, scalar_t* __restrict__ out,
                                                            int64_t cols) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t tf = static_cast<opmath_t>(t);
  int64_t kept = 0;
  // Count in int32 chunks (vectorisable), summed into int64.
  constexpr int64_t kChunk = int64_t(1) << 30;
  for (int64_t begin = 0; begin < cols; begin += kChunk) {
    const int64_t end = std::min(cols, begin + kChunk);
    int32_t count = 0;
#pragma omp simd reduction(+ : count)
    for (int64_t j = begin; j < end; ++j) {
      const opmath_t wf = static_cast<opmath_t>(w[j]);
      const bool k = abs_value(wf) > tf;
      out[j] = static_cast<scalar_t>(wf * (k ? opmath_t(1) : opmath_t(0)));
      count += k ? 1 : 0;
    }
    kept += count;
  }
  return kept;
}

DST_CPU_MULTIVERSION(mask_row_simd, mask_row_impl)

// float and double rows run the variant of dst::cpu::isa(); half and bfloat16 rows the
// baseline build.
template <typename scalar_t>
int64_t mask_row(const scalar_t* w, scalar_t t, scalar_t* out, int64_t cols) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return mask_row_simd(w, t, out, cols);
  } else {
    return mask_row_impl(w, t, out, cols);
  }
}

// Every row; row_counts[r] (when not null) receives row r's kept count.
template <typename scalar_t>
int64_t mask_rows(const scalar_t* w, const scalar_t* t, scalar_t* out, int64_t rows, int64_t cols,
                  int64_t* row_counts) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / cols);
  return at::parallel_reduce(
      0, rows, grain, int64_t(0),
      [&](int64_t begin, int64_t end, int64_t acc) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t kept = mask_row(w + r * cols, t[r], out + r * cols, cols);
          if (row_counts != nullptr) {
            row_counts[r] = kept;
          }
          acc += kept;
        }
        return acc;
      },
      std::plus<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> dst_mask_cpu(const at::Tensor& weight,
                                                const at::Tensor& threshold,
                                                std::optional<double> min_density) {
  check_weight_threshold("dst_mask", weight, threshold);
  at::Tensor out = at::empty_like(weight);
  at::Tensor t_eff = threshold.contiguous().clone();
  cpu::mask_into(weight, min_density, out, t_eff, nullptr);
  return {out, t_eff};
}

}  // namespace

namespace cpu {

int64_t mask_into(const at::Tensor& weight, std::optional<double> min_density, at::Tensor& out,
                  at::Tensor& t_eff, int64_t* row_counts) {
  TORCH_CHECK(!min_density.has_value() || (*min_density >= 0.0 && *min_density < 1.0),
              "dst_mask: min_density must be in [0, 1) or None, got ", *min_density);
  const at::Tensor& w = weight;  // checked by the caller: rows are contiguous blocks
  const int64_t rows = w.size(0);
  const int64_t cols = w.numel() / rows;
  int64_t kept = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dst_mask_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t* tp = t_eff.const_data_ptr<scalar_t>();
    check_finite_thresholds(tp, rows);
    kept = mask_rows(wp, tp, op, rows, cols, row_counts);
    if (min_density.has_value() && reset_due(kept, w.numel(), *min_density)) {
      t_eff.zero_();
      kept = mask_rows(wp, t_eff.const_data_ptr<scalar_t>(), op, rows, cols, row_counts);
    }
  });
  return kept;
}

}  // namespace cpu
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CPU, m) { m.impl("dst_mask", &dst::dst_mask_cpu); }
