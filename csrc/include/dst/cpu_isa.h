// The instruction set the CPU row kernels run with, chosen once per process.
//
// Each vectorised row kernel is compiled three times (AVX-512, AVX2 and the baseline
// x86-64 instruction set, "portable") and called through DST_CPU_MULTIVERSION, which picks
// the variant of dst::cpu::isa(): the best the CPU supports, capped by the environment
// variable DST_KERNELS_CPU_ISA ("auto", "avx512", "avx2" or "portable"; read at the first
// kernel call). The hand-written AVX-512 kernels (csrc/cpu/sparse.cpp) run only at
// kAvx512. The variants differ in their reduction order (vector width), never in what
// they compute; "portable" is what a machine without AVX2 runs, so a test run with it
// checks that path on any x86 machine. No variant uses FMA (-ffp-contract=off): products
// and sums round as in the unfused reference.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DST_CPU_X86_VARIANTS 1
#endif

namespace dst {
namespace cpu {

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_label(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

// The best variant this CPU runs.
inline Isa detected_isa() {
#ifdef DST_CPU_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kPortable;
}

// The cap DST_KERNELS_CPU_ISA asks for (kAvx512 when unset or "auto").
inline Isa requested_isa() {
  const char* env = std::getenv("DST_KERNELS_CPU_ISA");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto" || v == "avx512") {
    return Isa::kAvx512;
  }
  if (v == "avx2") {
    return Isa::kAvx2;
  }
  if (v == "portable") {
    return Isa::kPortable;
  }
  TORCH_CHECK(false, "DST_KERNELS_CPU_ISA must be one of auto, avx512, avx2, portable; got '", v,
              "'");
}

inline Isa isa() {
  static const Isa chosen = [] {
    const Isa want = requested_isa();
    const Isa have = detected_isa();
    return static_cast<int>(want) < static_cast<int>(have) ? want : have;
  }();
  return chosen;
}

inline std::string isa_name() { return isa_label(isa()); }

}  // namespace cpu
}  // namespace dst

// DST_CPU_MULTIVERSION(name, impl): defines `name(args...)`, which calls the always-inline
// function (template) `impl(args...)` compiled for the instruction set of dst::cpu::isa().
// `impl` must be declared `inline __attribute__((always_inline))` so that each variant
// inlines (and vectorises) it with its own target.
#ifdef DST_CPU_X86_VARIANTS
#define DST_CPU_MULTIVERSION(name, impl)                                 \
  template <typename... A>                                               \
  __attribute__((target("avx512f,popcnt"))) auto name##_avx512(A... a) { \
    return impl(a...);                                                   \
  }                                                                      \
  template <typename... A>                                               \
  __attribute__((target("avx2"))) auto name##_avx2(A... a) {             \
    return impl(a...);                                                   \
  }                                                                      \
  template <typename... A>                                               \
  auto name##_portable(A... a) {                                         \
    return impl(a...);                                                   \
  }                                                                      \
  template <typename... A>                                               \
  auto name(A... a) {                                                    \
    switch (::dst::cpu::isa()) {                                         \
      case ::dst::cpu::Isa::kAvx512:                                     \
        return name##_avx512(a...);                                      \
      case ::dst::cpu::Isa::kAvx2:                                       \
        return name##_avx2(a...);                                        \
      default:                                                           \
        return name##_portable(a...);                                    \
    }                                                                    \
  }
#else
#define DST_CPU_MULTIVERSION(name, impl) \
  template <typename... A>               \
  auto name(A... a) {                    \
    return impl(a...);                   \
  }
#endif
