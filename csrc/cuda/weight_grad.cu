// CUDA kernel of dst_kernels::dst_weight_grad: one block per row reads (G, W) once
// with 16-byte accesses, writes dW = G*M + G*|W|*H(Q) and reduces
// dt[row] = -sum_j G*W*H(Q) with a block reduction: deterministic, no float atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <tuple>

#include "dst/checks.h"
#include "dst/cuda_utils.cuh"
#include "dst/estimator.h"

namespace dst {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int VEC>
__global__ void weight_grad_kernel(const scalar_t* g, const scalar_t* __restrict__ w,
                                   const scalar_t* __restrict__ t, scalar_t* dw,
                                   scalar_t* __restrict__ dt, int64_t cols) {
  // dw may be g itself (the in-place op): each pack is read before it is written.
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  const int64_t row = blockIdx.x;
  const int64_t offset = row * cols;  // VEC divides cols, so row starts stay aligned
  const opmath_t tr = static_cast<opmath_t>(t[row]);
  const PackT* gp = reinterpret_cast<const PackT*>(g + offset);
  const PackT* wp = reinterpret_cast<const PackT*>(w + offset);
  PackT* dwp = reinterpret_cast<PackT*>(dw + offset);
  opmath_t acc = 0;
  for (int64_t p = threadIdx.x; p < cols / VEC; p += blockDim.x) {
    const PackT gv = gp[p];
    const PackT wv = wp[p];
    PackT out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const opmath_t gf = static_cast<opmath_t>(gv.v[k]);
      const opmath_t wf = static_cast<opmath_t>(wv.v[k]);
      const opmath_t aw = abs_value(wf);
      const opmath_t h = estimator(aw - tr);
      const opmath_t gm = aw > tr ? gf : opmath_t(0);  // G * M
      out.v[k] = static_cast<scalar_t>(gm + gf * aw * h);
      acc += gf * wf * h;
    }
    dwp[p] = out;
  }
  using BlockReduce = cub::BlockReduce<opmath_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const opmath_t total = BlockReduce(storage).Sum(acc);
  if (threadIdx.x == 0) {
    dt[row] = static_cast<scalar_t>(-total);
  }
}

// dW into grad_w (which may be g itself) and dt into grad_t.
void weight_grad_into(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& t,
                      at::Tensor& grad_w, at::Tensor& grad_t) {
  const int64_t rows = weight.size(0);
  const int64_t cols = weight.numel() / rows;
  TORCH_CHECK(rows <= INT32_MAX, "dst_weight_grad: at most 2^31 - 1 rows, got ", rows);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dst_weight_grad_cuda", [&] {
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        const scalar_t* wp = weight.const_data_ptr<scalar_t>();
        scalar_t* dwp = grad_w.mutable_data_ptr<scalar_t>();
        constexpr int V = pack_size<scalar_t>();
        const dim3 grid(static_cast<unsigned int>(rows));
        if (cols % V == 0 && aligned16(gp) && aligned16(wp) && aligned16(dwp)) {
          weight_grad_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
              gp, wp, t.const_data_ptr<scalar_t>(), dwp, grad_t.mutable_data_ptr<scalar_t>(), cols);
        } else {
          weight_grad_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(
              gp, wp, t.const_data_ptr<scalar_t>(), dwp, grad_t.mutable_data_ptr<scalar_t>(), cols);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::tuple<at::Tensor, at::Tensor> dst_weight_grad_cuda(const at::Tensor& grad_masked,
                                                        const at::Tensor& weight,
                                                        const at::Tensor& threshold) {
  const at::cuda::CUDAGuard guard(weight.device());
  return weight_grad_out_of_place(grad_masked, weight, threshold, weight_grad_into);
}

at::Tensor dst_weight_grad_inplace_cuda(at::Tensor& grad_masked, const at::Tensor& weight,
                                        const at::Tensor& threshold) {
  const at::cuda::CUDAGuard guard(weight.device());
  return weight_grad_in_place(grad_masked, weight, threshold, weight_grad_into);
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CUDA, m) {
  m.impl("dst_weight_grad", &dst::dst_weight_grad_cuda);
  m.impl("dst_weight_grad_", &dst::dst_weight_grad_inplace_cuda);
}
