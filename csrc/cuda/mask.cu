// CUDA kernels of dst_kernels::dst_mask: one grid-stride pass with 16-byte accesses
// writes P = W * (|W| > t[row]) and counts the kept weights (integer atomics, so
// the count is exact); the reset kernel reads that count on the device and, only
// when the rule fires, zeroes t_eff and rewrites P with t = 0. No host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <optional>
#include <tuple>

#include "dst/checks.h"
#include "dst/cuda_utils.cuh"
#include "dst/estimator.h"

namespace dst {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, int VEC>
__global__ void mask_count_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ t,
                                  scalar_t* __restrict__ out, unsigned long long* __restrict__ kept,
                                  int64_t numel, int64_t cols) {
  using opmath_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  unsigned int count = 0;
  const int64_t packs = numel / VEC;  // VEC divides cols, so a pack never spans two rows
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += stride) {
    const int64_t base = p * VEC;
    const opmath_t tr = static_cast<opmath_t>(t[base / cols]);
    const PackT wv = reinterpret_cast<const PackT*>(w)[p];
    PackT ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const opmath_t wf = static_cast<opmath_t>(wv.v[k]);
      const opmath_t m = keep(wf, tr);
      ov.v[k] = static_cast<scalar_t>(wf * m);
      count += static_cast<unsigned int>(m);
    }
    reinterpret_cast<PackT*>(out)[p] = ov;
  }
  using BlockReduce = cub::BlockReduce<unsigned int, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const unsigned int total = BlockReduce(storage).Sum(count);
  if (threadIdx.x == 0 && total > 0) {
    atomicAdd(kept, static_cast<unsigned long long>(total));
  }
}

template <typename scalar_t>
__global__ void reset_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ t_eff,
                             scalar_t* __restrict__ out,
                             const unsigned long long* __restrict__ kept, int64_t numel,
                             int64_t rows, double min_density) {
  if (!reset_due(static_cast<long long>(*kept), numel, min_density)) {
    return;
  }
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const opmath_t wf = static_cast<opmath_t>(w[i]);
    out[i] = static_cast<scalar_t>(wf * keep(wf, opmath_t(0)));
    if (i < rows) {
      t_eff[i] = scalar_t(0);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> dst_mask_cuda(const at::Tensor& weight,
                                                 const at::Tensor& threshold,
                                                 std::optional<double> min_density) {
  check_weight_threshold("dst_mask", weight, threshold);
  TORCH_CHECK(!min_density.has_value() || (*min_density >= 0.0 && *min_density < 1.0),
              "dst_mask: min_density must be in [0, 1) or None, got ", *min_density);
  const at::cuda::CUDAGuard guard(weight.device());
  const at::Tensor t = threshold.contiguous();
  at::Tensor out = at::empty_like(weight);
  at::Tensor t_eff = t.clone();
  at::Tensor kept = at::zeros({1}, weight.options().dtype(at::kLong));
  const int64_t numel = weight.numel();
  const int64_t rows = weight.size(0);
  const int64_t cols = numel / rows;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dst_mask_cuda", [&] {
        const scalar_t* wp = weight.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        auto* kp = reinterpret_cast<unsigned long long*>(kept.mutable_data_ptr<int64_t>());
        constexpr int V = pack_size<scalar_t>();
        if (cols % V == 0 && aligned16(wp) && aligned16(op)) {
          mask_count_kernel<scalar_t, V><<<grid_for(numel / V, kThreads), kThreads, 0, stream>>>(
              wp, t.const_data_ptr<scalar_t>(), op, kp, numel, cols);
        } else {
          mask_count_kernel<scalar_t, 1><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
              wp, t.const_data_ptr<scalar_t>(), op, kp, numel, cols);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (min_density.has_value()) {
          reset_kernel<scalar_t><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
              wp, t_eff.mutable_data_ptr<scalar_t>(), op, kp, numel, rows, *min_density);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {out, t_eff};
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CUDA, m) { m.impl("dst_mask", &dst::dst_mask_cuda); }
