// CUDA kernel of dst_kernels::estimator.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "dst/estimator.h"

namespace dst {
namespace {

template <typename scalar_t>
__global__ void estimator_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ out,
                                 int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = static_cast<scalar_t>(estimator(static_cast<opmath_t>(src[i])));
  }
}

at::Tensor estimator_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_floating_point(), "estimator: x must be a floating-point tensor, got ",
              x.scalar_type());
  const at::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) {
    return out;
  }
  constexpr int threads = 256;
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, max_blocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "estimator_cuda", [&] {
        estimator_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
            xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CUDA, m) { m.impl("estimator", &dst::estimator_cuda); }
