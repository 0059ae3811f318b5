// Per-element DST maths shared by the CPU and CUDA kernels (SPEC section 1).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DST_HOST_DEVICE inline
#endif

namespace dst {

// |x| without relying on std::abs overloads that differ between host and device.
template <typename T>
DST_HOST_DEVICE T abs_value(T x) {
  return x < T(0) ? -x : x;
}

// The long-tailed estimator H of the step function's derivative:
//   2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 otherwise (and for NaN).
template <typename T>
DST_HOST_DEVICE T estimator(T x) {
  const T a = abs_value(x);
  if (a <= T(0.4)) {
    return T(2) - T(4) * a;
  }
  return a <= T(1) ? T(0.4) : T(0);
}

// The mask test M = S(|w| - t): strict, so ties |w| == t are masked out.
template <typename T>
DST_HOST_DEVICE bool keep(T w, T t) {
  return abs_value(w) > t;
}

// sign(w) with sign(0) = 0.
template <typename T>
DST_HOST_DEVICE T sign(T w) {
  return T(w > T(0)) - T(w < T(0));
}

// The reset rule's test (SPEC section 1): a layer keeping kept of numel weights
// is reset when kept <= min_density * numel, evaluated in float64.
DST_HOST_DEVICE bool reset_due(long long kept, long long numel, double min_density) {
  return static_cast<double>(kept) <= min_density * static_cast<double>(numel);
}

}  // namespace dst
