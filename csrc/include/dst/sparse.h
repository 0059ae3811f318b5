// The sparse op family (csrc/cpu/sparse.cpp): compressed P = W * M and the kernels that
// multiply with it; the linear family's CPU kernels (csrc/cpu/linear.cpp) call it. Host code only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

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

// The density below which dst_conv2d's CPU kernels take the sparse path (forward and dX) for a
// groups-1 convolution with `batch` images, `in_channels` x `kernel` (KH * KW) weights per
// filter, `out_channels` filters and `out_pixels` (OH * OW) outputs per image (2 threads,
// measured; see the README).
double sparse_conv_crossover(int64_t batch, int64_t in_channels, int64_t out_channels,
                             int64_t kernel, int64_t out_pixels);

namespace sparse {

// Whether the CPU linear kernels take the sparse path for a layer keeping `kept` of its
// in * out weights with `tokens` rows of input (the mode, the crossover, the int32 limit).
bool take(int64_t kept, int64_t tokens, int64_t in, int64_t out);

// The same for a convolution (sparse_conv_crossover in auto mode).
bool take_conv(int64_t kept, int64_t batch, int64_t in_channels, int64_t out_channels,
               int64_t kernel, int64_t out_pixels);

// y = x A^T + bias for A the CSR of P = W * (|W| > t[row]) (with transpose, of P^T: y = x P),
// built from the kept count of every row that the mask pass returned. x and weight share a
// dtype; t is the effective threshold vector (contiguous, weight's dtype).
// The CSR of P = W * (|W| > t[row]) (rows: W's first dimension; columns: the rest flattened,
// in W's contiguous order) from the kept count of every row that the mask pass returned:
// (crow int32 [rows + 1], col int32 [nnz], values [nnz] in W's dtype). W contiguous; the
// caller has checked that nnz fits int32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_from_counts(const at::Tensor& weight,
                                                               const at::Tensor& t,
                                                               const int64_t* counts);

// The entries with |p| > 0 of every row of P (rows: the first dimension, contiguous; NaN not
// counted, as the CSR built from P with zero thresholds leaves it out) into counts; returns
// their total. Reads P only.
int64_t nonzero_counts(const at::Tensor& p, int64_t* counts);

// Checks a CSR triple (int32 indices, contiguous, row pointers from 0 to nnz and
// non-decreasing, every column index in [0, k)); `op` names the caller in the messages.
void check_csr(const char* op, const at::Tensor& crow, const at::Tensor& col,
               const at::Tensor& values, int64_t k);

at::Tensor product_from_counts(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& t,
                               const int64_t* counts, const std::optional<at::Tensor>& bias,
                               bool transpose);

// y = conv2d(x, P) + bias (groups 1) by the direct sparse convolution, from the CSR of P built
// off the mask pass's filter counts. x NCHW with weight's dtype; t the effective thresholds.
at::Tensor conv2d_from_counts(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& t,
                              const int64_t* counts, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation);

// dX = conv_transpose(dY, P) for that convolution (x gives the input's shape), the same way;
// needs padding <= dilation * (kernel - 1).
at::Tensor conv2d_grad_input_from_counts(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& weight, const at::Tensor& t,
                                         const int64_t* counts, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace sparse
}  // namespace dst
