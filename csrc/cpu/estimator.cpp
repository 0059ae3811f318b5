// CPU kernel of dst_kernels::estimator.
#include "dst/estimator.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace dst {
namespace {

at::Tensor estimator_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.is_floating_point(), "estimator: x must be a floating-point tensor, got ",
              x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "estimator_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* src = xc.const_data_ptr<scalar_t>();
    scalar_t* dst_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst_ptr[i] = static_cast<scalar_t>(estimator(static_cast<opmath_t>(src[i])));
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CPU, m) { m.impl("estimator", &dst::estimator_cpu); }
