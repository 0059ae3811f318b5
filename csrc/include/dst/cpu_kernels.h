// CPU building blocks shared by the op families (host code only).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace dst {

// Reading thresholds costs nothing on the CPU, so every CPU op checks them on every call.
template <typename scalar_t>
inline void check_finite_thresholds(const scalar_t* t, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(t[r])),
                      "threshold contains NaN or inf; thresholds must be finite (a NaN "
                      "threshold would silently mask out its whole row)");
  }
}

namespace cpu {

// dst_mask's pass (csrc/cpu/mask.cpp): out = W * (|W| > t_eff[row]) for a weight whose rows
// are contiguous blocks, with the reset rule when min_density is set (t_eff is zeroed in
// place and the pass repeated). t_eff holds the thresholds on entry (contiguous, checked
// finite here). row_counts, when not null, receives each row's kept count (of the final
// pass). Returns the number of kept weights.
int64_t mask_into(const at::Tensor& weight, std::optional<double> min_density, at::Tensor& out,
                  at::Tensor& t_eff, int64_t* row_counts);

// dst_weight_grad's pass (csrc/cpu/weight_grad.cpp) over rows [begin, end) on the calling
// thread: dW into grad_w (which may be g itself) and dt into grad_t. g, weight, t, grad_w and
// grad_t contiguous, one dtype; no checks.
void weight_grad_rows(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& t,
                      at::Tensor& grad_w, at::Tensor& grad_t, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace dst
