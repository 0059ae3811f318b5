// The sparse op family (csrc/cpu/sparse.cpp): compressed P = W * M and the kernels that
// multiply with it. Host code only.
#pragma once

#include <cstdint>

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

}  // namespace dst
