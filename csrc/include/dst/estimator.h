// Per-element DST maths shared by the CPU and CUDA kernels (docs/maths.md section 1).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DST_HOST_DEVICE inline
#endif

namespace dst {

// |x| for the opmath types (float, double): fabs is a single instruction on host and
// device, and unlike a compare-and-negate it lets CPU loops vectorise.
DST_HOST_DEVICE float abs_value(float x) { return fabsf(x); }
DST_HOST_DEVICE double abs_value(double x) { return fabs(x); }

// The long-tailed estimator H of the step function's derivative:
//   2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 otherwise (and for NaN).
// Selects, not branches: with -fno-trapping-math CPU loops over it vectorise. NaN
// fails both comparisons and yields 0, as in the reference.
template <typename T>
DST_HOST_DEVICE T estimator(T x) {
  const T a = abs_value(x);
  return a <= T(0.4) ? T(2) - T(4) * a : (a <= T(1) ? T(0.4) : T(0));
}

// The mask value M = S(|w| - t) as 1 or 0 in T: strict, so ties |w| == t are masked
// out. Returned as a T (1 or 0) so it multiplies straight into P.
template <typename T>
DST_HOST_DEVICE T keep(T w, T t) {
  return static_cast<T>(abs_value(w) > t);
}

// The reset rule's test (docs/maths.md section 1): a layer keeping kept of numel weights
// is reset when kept <= min_density * numel, evaluated in float64.
DST_HOST_DEVICE bool reset_due(long long kept, long long numel, double min_density) {
  return static_cast<double>(kept) <= min_density * static_cast<double>(numel);
}

}  // namespace dst
