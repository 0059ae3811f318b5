// The sparse op family (csrc/cpu/sparse.cpp): compressed P = W * M and the kernels that
// multiply with it; the linear family's CPU kernels (csrc/cpu/linear.cpp) call it. Host code only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace dst {

// When dst_linear's CPU kernels take the sparse path.
enum class SparseMode : int64_t {
  kAuto = 0,    // below the measured density crossover of the shape (sparse_crossover)
  kAlways = 1,  // whenever the compressed form fits int32 indices (tests, measurements)
  kNever = 2,   // never: dense GEMMs only
};

// Sets the mode when mode >= 0 (one of SparseMode); returns the mode in force before.
int64_t sparse_mode(int64_t mode);

// The density below which the sparse kernels beat the dense GEMM for a linear layer with
// `tokens` rows of input, `in` input and `out` output features (2 threads, measured; see
// the README).
double sparse_crossover(int64_t tokens, int64_t in, int64_t out);

namespace sparse {

// Whether the CPU linear kernels take the sparse path for a layer keeping `kept` of its
// in * out weights with `tokens` rows of input (the mode, the crossover, the int32 limit).
bool take(int64_t kept, int64_t tokens, int64_t in, int64_t out);

// y = x A^T + bias for A the CSR of P = W * (|W| > t[row]) (with transpose, of P^T: y = x P),
// built from the kept count of every row that the mask pass returned. x and weight share a
// dtype; t is the effective threshold vector (contiguous, weight's dtype).
at::Tensor product_from_counts(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& t,
                               const int64_t* counts, const std::optional<at::Tensor>& bias,
                               bool transpose);

}  // namespace sparse
}  // namespace dst
