// CPU kernels of the sparse op family: P = W * M in compressed form and the products
// with it.
//
//   dst_sparse_mask(W, t, transpose)   CSR of P (or of P^T), int32 indices
//   dst_sparse_mm(x, crow, col, val, b) y = x A^T + b for a CSR matrix A (relu: relu(y))
//   sparse::product_from_counts        y = x P^T (or x P) from the CSR built off the mask
//                                      pass's row counts: the sparse path of the CPU
//                                      dst_linear kernels (csrc/cpu/linear.cpp)
//   dst_sparse_conv2d and the sparse path of the CPU dst_conv2d kernels: the direct sparse
//                                      convolution (the section "convolutions" below)
//   dst_sparse_rnn, dst_sparse_rnn_train, dst_sparse_rnn_backward: one LSTM / GRU layer over
//                                      the compressed gate matrices (the section "recurrent
//                                      layers" below)
//
// The product tiles the rows of x (tokens) by NB: a tile of x is packed transposed
// (K x NB, opmath type) into a per-thread buffer that stays in L2, and every output
// feature accumulates NB lanes in registers over its nonzeros (vectorised over the
// tokens). Each output element is one thread's sum over its row's nonzeros in column
// order: results are deterministic and independent of the thread count (a single-row x
// uses a faster order of its own, the same for every thread count).
#include "dst/sparse.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#else
namespace {
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
}  // namespace
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "dst/cpu_isa.h"
#include "dst/recycle.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "dst/checks.h"
#include "dst/cpu_kernels.h"
#include "dst/estimator.h"

namespace dst {

namespace {
std::atomic<int64_t> g_sparse_mode{static_cast<int64_t>(SparseMode::kAuto)};
}  // namespace

int64_t sparse_mode(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 2,
              "sparse_mode: mode must be 0 (auto), 1 (always), 2 (never) or -1 (query), got ",
              mode);
  if (mode < 0) {
    return g_sparse_mode.load();
  }
  return g_sparse_mode.exchange(mode);
}

// Measured with `python -m benchmarks.bench_sparse` (a DSTLinear training step, sparse path
// against dense path, densities 0.01 .. 0.4) on a 2-core x86-64 (AVX-512) machine; the
// values sit at or below the crossovers seen (README, "Sparse execution"). The token count is
// what moves it: with few rows of input the dense GEMM is a pass over W, as cheap as the
// compression passes the sparse path adds; with many rows the GEMMs dominate.
double sparse_crossover(int64_t tokens, int64_t in, int64_t out) {
  (void)in;
  (void)out;
  if (tokens < 8) {
    return 0.02;
  }
  if (tokens < 32) {
    return 0.1;
  }
  if (tokens < 256) {
    return 0.2;
  }
  if (tokens < 1024) {
    return 0.25;
  }
  return 0.3;
}

// Measured with `python -m benchmarks.bench_sparse --shapes N,C,H,W,out,k ...` (a DSTConv2d
// training step, sparse path against dense path, densities 0.05 .. 0.4, single sweeps) on the
// same 2-core machine; the values sit at or below the crossovers seen (README, "Sparse
// convolution"). What moves it is how many outputs a kept tap feeds: with few output
// positions (batch x pixels: the 4 x 4 and 2 x 2 layers at small batches) the per-tap cost
// is paid by few outputs, and the dense GEMM wins at lower densities or always.
double sparse_conv_crossover(int64_t batch, int64_t in_channels, int64_t out_channels,
                             int64_t kernel, int64_t out_pixels) {
  (void)in_channels;
  (void)out_channels;
  const int64_t positions = batch * out_pixels;
  if (positions < 64) {
    return 0.0;
  }
  if (positions < 1024) {
    return kernel >= 25 ? 0.2 : positions < 256 ? 0.05 : 0.1;
  }
  if (kernel >= 25 || out_pixels >= 1024) {
    return 0.25;
  }
  return 0.15;
}

namespace {

using at::Tensor;

constexpr int64_t kGrainElements = 32768;
// Multiply-adds below which a product runs on one thread.
constexpr int64_t kGrainWork = 65536;
constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();
// How many kept weights ahead the tile product prefetches its packed x rows (random rows of
// an L2-resident tile: the loads' latency, not the adds, bounds that loop).
constexpr int64_t kPrefetchAhead = 8;

template <typename scalar_t>
using opmath = at::opmath_type<scalar_t>;

// ----------------------------------------------------------------------------- row passes

// Kept count of one row (vectorised: compare and count, no writes).
template <typename scalar_t>
inline __attribute__((always_inline)) int64_t count_row_impl(const scalar_t* __restrict__ w,
                                                             scalar_t t, int64_t cols) {
  const opmath<scalar_t> tf = static_cast<opmath<scalar_t>>(t);
  int64_t kept = 0;
  constexpr int64_t kChunk = int64_t(1) << 30;
  for (int64_t begin = 0; begin < cols; begin += kChunk) {
    const int64_t end = std::min(cols, begin + kChunk);
    int32_t count = 0;
#pragma omp simd reduction(+ : count)
    for (int64_t j = begin; j < end; ++j) {
      count += abs_value(static_cast<opmath<scalar_t>>(w[j])) > tf ? 1 : 0;
    }
    kept += count;
  }
  return kept;
}

// The kept entries of one row, in column order: their columns and values. Chunks of 16
// with nothing kept (most of them at low density) are skipped after a vectorised test.
template <typename scalar_t>
inline __attribute__((always_inline)) void compress_row_impl(const scalar_t* __restrict__ w,
                                                             scalar_t t, int64_t cols,
                                                             int32_t* __restrict__ col,
                                                             scalar_t* __restrict__ val) {
  const opmath<scalar_t> tf = static_cast<opmath<scalar_t>>(t);
  int64_t p = 0;
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    const int64_t j1 = std::min(cols, j0 + 16);
    int32_t any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = j0; j < j1; ++j) {
      any |= abs_value(static_cast<opmath<scalar_t>>(w[j])) > tf ? 1 : 0;
    }
    if (any == 0) {
      continue;
    }
    for (int64_t j = j0; j < j1; ++j) {
      if (abs_value(static_cast<opmath<scalar_t>>(w[j])) > tf) {
        col[p] = static_cast<int32_t>(j);
        val[p] = w[j];
        ++p;
      }
    }
  }
}

DST_CPU_MULTIVERSION(count_row, count_row_impl)
DST_CPU_MULTIVERSION(compress_row_generic, compress_row_impl)

#ifdef DST_CPU_X86_VARIANTS
#define DST_AVX512_COMPRESS 1
// float rows with AVX-512: per 16 weights one compare into a mask, the kept lanes compressed
// in registers and written with a masked store (branch-free; nothing past the row's end).
__attribute__((target("avx512f,popcnt"))) void compress_row_avx512(const float* w, float t,
                                                                   int64_t cols, int32_t* col,
                                                                   float* val) {
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t p = 0;
  for (int64_t j = 0; j < cols; j += 16) {
    const int64_t left = cols - j;
    const __mmask16 in = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(in, w + j);
    const __m512 a = _mm512_abs_ps(v);
    const __mmask16 k = _mm512_mask_cmp_ps_mask(in, a, tv, _CMP_GT_OQ);
    const unsigned n = static_cast<unsigned>(__builtin_popcount(static_cast<unsigned>(k)));
    const __mmask16 out = __mmask16((1u << n) - 1u);
    const __m512i idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(j)));
    _mm512_mask_storeu_ps(val + p, out, _mm512_maskz_compress_ps(k, v));
    _mm512_mask_storeu_epi32(col + p, out, _mm512_maskz_compress_epi32(k, idx));
    p += n;
  }
}

// The hand-written AVX-512 kernels run where the row kernels run their AVX-512 variant.
bool has_avx512() { return cpu::isa() == cpu::Isa::kAvx512; }
#endif

template <typename scalar_t>
void compress_row(const scalar_t* w, scalar_t t, int64_t cols, int32_t* col, scalar_t* val) {
#ifdef DST_AVX512_COMPRESS
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx512()) {
      return compress_row_avx512(w, t, cols, col, val);
    }
  }
#endif
  compress_row_generic(w, t, cols, col, val);
}

// ----------------------------------------------------------------------------- the product

// Token tile width: NB lanes of opmath accumulators per output feature, and a packed
// tile of K x NB that should sit in half of a 1 MiB L2.
int tile_width(int64_t k, int64_t acc_bytes) {
  int nb = 64;
  while (nb > 8 && k * nb * acc_bytes > (int64_t(512) << 10)) {
    nb /= 2;
  }
  return nb;
}

int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) {
    p *= 2;
  }
  return p;
}

#ifdef DST_AVX512_COMPRESS
// 16 x 16 floats: rows r[0..15] become columns (unpack, shuffle within 128-bit lanes, then
// across lanes).
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// pack_tile for float with nbw >= 16: whole 16 x 16 blocks transposed in registers, the
// edges element by element.
__attribute__((target("avx512f"))) void pack_tile_avx512(const float* x, int64_t ldx, int64_t k,
                                                         int64_t nb, int nbw, float* xt) {
  const int64_t nb16 = nb / 16 * 16;
  const int64_t k16 = k / 16 * 16;
  __m512 r[16];
  for (int64_t c0 = 0; c0 < k16; c0 += 16) {
    for (int64_t i0 = 0; i0 < nb16; i0 += 16) {
      for (int i = 0; i < 16; ++i) {
        r[i] = _mm512_loadu_ps(x + (i0 + i) * ldx + c0);
      }
      transpose16(r);
      for (int c = 0; c < 16; ++c) {
        _mm512_storeu_ps(xt + (c0 + c) * nbw + i0, r[c]);
      }
    }
  }
  for (int64_t c = 0; c < k; ++c) {
    float* o = xt + c * nbw;
    const int64_t i_begin = c < k16 ? nb16 : 0;
    for (int64_t i = i_begin; i < nb; ++i) {
      o[i] = x[i * ldx + c];
    }
    for (int64_t i = nb; i < nbw; ++i) {
      o[i] = 0.0f;
    }
  }
}
#endif

// xt[k * nbw + i] = x[i, k] for i < nb, 0 for nb <= i < nbw.
template <typename scalar_t>
void pack_tile(const scalar_t* x, int64_t ldx, int64_t k, int64_t nb, int nbw,
               opmath<scalar_t>* xt) {
  using opmath_t = opmath<scalar_t>;
#ifdef DST_AVX512_COMPRESS
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (nbw >= 16 && has_avx512()) {
      return pack_tile_avx512(x, ldx, k, nb, nbw, xt);
    }
  }
#endif
  if (nbw == 1) {
    for (int64_t c = 0; c < k; ++c) {
      xt[c] = static_cast<opmath_t>(x[c]);
    }
    return;
  }
  constexpr int64_t kStep = 16;
  for (int64_t c0 = 0; c0 < k; c0 += kStep) {
    const int64_t c1 = std::min(k, c0 + kStep);
    for (int64_t i = 0; i < nb; ++i) {
      const scalar_t* xr = x + i * ldx;
      for (int64_t c = c0; c < c1; ++c) {
        xt[c * nbw + i] = static_cast<opmath_t>(xr[c]);
      }
    }
    for (int64_t i = nb; i < nbw; ++i) {
      for (int64_t c = c0; c < c1; ++c) {
        xt[c * nbw + i] = opmath_t(0);
      }
    }
  }
}

// The product's optional ReLU epilogue, as torch.relu: negatives to zero, NaN kept.
template <typename T>
inline __attribute__((always_inline)) T relu_if(T v, bool relu) {
  return relu && v < T(0) ? T(0) : v;
}

#ifdef DST_AVX512_COMPRESS
// The store of one block of a float tile: out[f * ldo + i] (features f < cnt <= 16 of the
// block, tokens i < nb) plus bias b[f] to y[i * ldy + f], 16 x 16 at a time transposed in
// registers and stored as one masked vector per token row; the same sums and roundings as
// the scalar store (one add, then the ReLU).
__attribute__((target("avx512f"))) void store_block_avx512(const float* out, int64_t ldo,
                                                           const float* b, int64_t cnt, float* y,
                                                           int64_t ldy, int64_t nb, bool relu) {
  const __mmask16 keep = static_cast<__mmask16>((1u << cnt) - 1u);
  const __m512 bias = _mm512_maskz_loadu_ps(keep, b);
  const __m512 zero = _mm512_setzero_ps();
  const int64_t nb16 = nb / 16 * 16;
  __m512 r[16];
  for (int64_t i0 = 0; i0 < nb16; i0 += 16) {
    for (int f = 0; f < 16; ++f) {
      r[f] = f < cnt ? _mm512_loadu_ps(out + f * ldo + i0) : zero;
    }
    transpose16(r);
    for (int i = 0; i < 16; ++i) {
      __m512 v = _mm512_add_ps(r[i], bias);
      if (relu) {
        v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero);
      }
      _mm512_mask_storeu_ps(y + (i0 + i) * ldy, keep, v);
    }
  }
  for (int64_t i = nb16; i < nb; ++i) {
    for (int64_t f = 0; f < cnt; ++f) {
      y[i * ldy + f] = relu_if(out[f * ldo + i] + b[f], relu);
    }
  }
}
#endif

template <typename scalar_t>
struct Csr {
  const int32_t* crow;
  const int32_t* col;
  const scalar_t* val;
};

// 64-byte vectors of the accumulation type (GCC vector extensions: one zmm register in the
// AVX-512 clone, two ymm in the AVX2 one, four xmm in the baseline), loadable unaligned.
typedef float vec_f32 __attribute__((vector_size(64), aligned(4)));
typedef double vec_f64 __attribute__((vector_size(64), aligned(8)));
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = vec_f32;
};
template <>
struct Vec<double> {
  using type = vec_f64;
};

// Output features [m0, m1) of one token tile: y[i, m] = bias[m] + sum_p val[p] * xt[col[p], i],
// NB accumulators per feature kept in registers.
template <typename scalar_t, int NB>
inline __attribute__((always_inline)) void tile_rows(const opmath<scalar_t>* __restrict__ xt,
                                                     Csr<scalar_t> a, const scalar_t* bias,
                                                     scalar_t* y, int64_t ldy, int64_t nb,
                                                     int64_t m0, int64_t m1, bool relu) {
  using opmath_t = opmath<scalar_t>;
  using V = typename Vec<opmath_t>::type;
  constexpr int kLanes = sizeof(V) / sizeof(opmath_t);
  // Features in blocks of kBlock: their sums gather in `out` (kBlock x NB, in L1) and leave
  // as kBlock contiguous values per token row (one cache line), not one strided store each.
  constexpr int64_t kBlock = 16;
  alignas(64) opmath_t out[kBlock][NB];
  const int64_t p_end = a.crow[m1];
  for (int64_t mb = m0; mb < m1; mb += kBlock) {
    const int64_t me = std::min(m1, mb + kBlock);
    for (int64_t m = mb; m < me; ++m) {
      opmath_t* o = out[m - mb];
      const int64_t e = a.crow[m + 1];
      if constexpr (NB >= kLanes) {
        constexpr int kVecs = NB / kLanes;
        V acc[kVecs];
        for (int j = 0; j < kVecs; ++j) {
          acc[j] = V{};
        }
        for (int64_t p = a.crow[m]; p < e; ++p) {
          if (p + kPrefetchAhead < p_end) {
            const char* ahead = reinterpret_cast<const char*>(
                xt + static_cast<int64_t>(a.col[p + kPrefetchAhead]) * NB);
            for (int64_t line = 0; line < int64_t(NB * sizeof(opmath_t)); line += 64) {
              __builtin_prefetch(ahead + line, 0, 3);
            }
          }
          const opmath_t v = static_cast<opmath_t>(a.val[p]);
          const V* xr = reinterpret_cast<const V*>(xt + static_cast<int64_t>(a.col[p]) * NB);
          for (int j = 0; j < kVecs; ++j) {
            acc[j] += v * xr[j];
          }
        }
        std::memcpy(o, acc, sizeof(acc));
      } else if constexpr (NB == 1) {
        // One token row: four partial sums (summed in a fixed order) break the add chain.
        opmath_t part[4] = {0, 0, 0, 0};
        int64_t p = a.crow[m];
        for (; p + 4 <= e; p += 4) {
          for (int q = 0; q < 4; ++q) {
            part[q] += static_cast<opmath_t>(a.val[p + q]) * xt[a.col[p + q]];
          }
        }
        for (; p < e; ++p) {
          part[0] += static_cast<opmath_t>(a.val[p]) * xt[a.col[p]];
        }
        o[0] = (part[0] + part[1]) + (part[2] + part[3]);
      } else {
        for (int i = 0; i < NB; ++i) {
          o[i] = opmath_t(0);
        }
        for (int64_t p = a.crow[m]; p < e; ++p) {
          const opmath_t v = static_cast<opmath_t>(a.val[p]);
          const opmath_t* xr = xt + static_cast<int64_t>(a.col[p]) * NB;
          for (int i = 0; i < NB; ++i) {
            o[i] += v * xr[i];
          }
        }
      }
    }
    opmath_t b[kBlock];
    for (int64_t m = mb; m < me; ++m) {
      b[m - mb] = bias != nullptr ? static_cast<opmath_t>(bias[m]) : opmath_t(0);
    }
#ifdef DST_AVX512_COMPRESS
    if constexpr (std::is_same_v<scalar_t, float> && NB >= 16) {
      if (has_avx512()) {
        store_block_avx512(&out[0][0], NB, b, me - mb, y + mb, ldy, nb, relu);
        continue;
      }
    }
#endif
    // Two copies of the store loop: a test inside it costs more than the ReLU.
    if (relu) {
      for (int64_t i = 0; i < nb; ++i) {
        scalar_t* yr = y + i * ldy;
        for (int64_t m = mb; m < me; ++m) {
          yr[m] = static_cast<scalar_t>(relu_if(out[m - mb][i] + b[m - mb], true));
        }
      }
    } else {
      for (int64_t i = 0; i < nb; ++i) {
        scalar_t* yr = y + i * ldy;
        for (int64_t m = mb; m < me; ++m) {
          yr[m] = static_cast<scalar_t>(out[m - mb][i] + b[m - mb]);
        }
      }
    }
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void tile_rows_any_impl(const opmath<scalar_t>* xt,
                                                              Csr<scalar_t> a, const scalar_t* bias,
                                                              scalar_t* y, int64_t ldy, int64_t nb,
                                                              int nbw, int64_t m0, int64_t m1,
                                                              bool relu) {
  switch (nbw) {
    case 1:
      return tile_rows<scalar_t, 1>(xt, a, bias, y, ldy, nb, m0, m1, relu);
    case 2:
      return tile_rows<scalar_t, 2>(xt, a, bias, y, ldy, nb, m0, m1, relu);
    case 4:
      return tile_rows<scalar_t, 4>(xt, a, bias, y, ldy, nb, m0, m1, relu);
    case 8:
      return tile_rows<scalar_t, 8>(xt, a, bias, y, ldy, nb, m0, m1, relu);
    case 16:
      return tile_rows<scalar_t, 16>(xt, a, bias, y, ldy, nb, m0, m1, relu);
    case 32:
      return tile_rows<scalar_t, 32>(xt, a, bias, y, ldy, nb, m0, m1, relu);
    default:
      return tile_rows<scalar_t, 64>(xt, a, bias, y, ldy, nb, m0, m1, relu);
  }
}

DST_CPU_MULTIVERSION(tile_rows_any, tile_rows_any_impl)

#ifdef DST_AVX512_COMPRESS
// One token row of float x (contiguous, no packing): per output feature, 16 kept weights
// at a time with gathered x values, then a fixed-order horizontal sum.
__attribute__((target("avx512f"))) void spmv_rows_avx512(const float* x, Csr<float> a,
                                                         const float* bias, float* y, int64_t m0,
                                                         int64_t m1, bool relu) {
  for (int64_t m = m0; m < m1; ++m) {
    __m512 acc = _mm512_setzero_ps();
    int64_t p = a.crow[m];
    const int64_t e = a.crow[m + 1];
    for (; p + 16 <= e; p += 16) {
      const __m512i idx = _mm512_loadu_si512(a.col + p);
      const __m512 g = _mm512_i32gather_ps(idx, x, 4);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a.val + p), g));
    }
    if (p < e) {
      const __mmask16 k = __mmask16((1u << (e - p)) - 1u);
      const __m512i idx = _mm512_maskz_loadu_epi32(k, a.col + p);
      const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, x, 4);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, a.val + p), g));
    }
    y[m] = relu_if(_mm512_reduce_add_ps(acc) + (bias != nullptr ? bias[m] : 0.0f), relu);
  }
}
#endif

// y[n, m] = bias[m] + sum_k x[n, k] A[m, k]: x is [n_rows, k] row-major, A is [m_rows, k]
// in CSR, y is [n_rows, m_rows] row-major. Parallel over (token tile, output feature)
// pairs, tile-major, so a thread packs each of its tiles once.
template <typename scalar_t>
void spmm(const scalar_t* x, int64_t n_rows, int64_t k, Csr<scalar_t> a, int64_t m_rows,
          int64_t nnz, const scalar_t* bias, scalar_t* y, bool relu) {
  using opmath_t = opmath<scalar_t>;
  if (n_rows == 0 || m_rows == 0) {
    return;
  }
  int nb_full = tile_width(k, sizeof(opmath_t));
  // Narrower tiles when there are fewer tiles than threads (each thread packs its own).
  const int64_t threads = at::get_num_threads();
  while (nb_full > 16 && (n_rows + nb_full - 1) / nb_full < threads && n_rows > nb_full / 2) {
    nb_full /= 2;
  }
  const int64_t tiles = (n_rows + nb_full - 1) / nb_full;
  const int64_t items = tiles * m_rows;
  // Work of one (tile, feature) item in multiply-adds, packing included.
  const int64_t lanes = std::min<int64_t>(nb_full, pow2_at_least(n_rows));
  const int64_t per_item = std::max<int64_t>(1, (nnz / m_rows + 1) * lanes + (k * lanes) / m_rows);
  const int64_t grain = std::max<int64_t>(1, kGrainWork / per_item);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    const int64_t buffer = k * std::min<int64_t>(nb_full, pow2_at_least(n_rows));
    std::unique_ptr<opmath_t[]> xt(new opmath_t[std::max<int64_t>(buffer, 1)]);
    for (int64_t it = begin; it < end;) {
      const int64_t tile = it / m_rows;
      const int64_t m0 = it % m_rows;
      const int64_t m1 = std::min(m_rows, m0 + (end - it));
      const int64_t n0 = tile * nb_full;
      const int64_t nb = std::min<int64_t>(nb_full, n_rows - n0);
      // A one-row tile of a larger x (a tail left by the tile width, which depends on the
      // thread count) sums in the per-lane order of the wider tiles: a row's result must not
      // depend on how many threads tiled it. Only a single-row x takes the one-row paths.
      const int nbw = nb == nb_full ? nb_full : std::max(n_rows > 1 ? 2 : 1, pow2_at_least(nb));
#ifdef DST_AVX512_COMPRESS
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (nbw == 1 && has_avx512()) {
          spmv_rows_avx512(x + n0 * k, a, bias, y + n0 * m_rows, m0, m1, relu);
          it += m1 - m0;
          continue;
        }
      }
#endif
      pack_tile(x + n0 * k, k, k, nb, nbw, xt.get());
      tile_rows_any(static_cast<const opmath_t*>(xt.get()), a, bias, y + n0 * m_rows, m_rows, nb,
                    nbw, m0, m1, relu);
      it += m1 - m0;
    }
  });
}

// ----------------------------------------------------------------------------- compressed P

struct Compressed {
  Tensor crow;  // int32 [rows + 1]
  Tensor col;   // int32 [nnz]
  Tensor val;   // weight dtype [nnz]
};

// CSR of P from the kept count of every row (the mask pass's counts).
template <typename scalar_t>
Compressed csr_from_counts(const Tensor& w, const scalar_t* t, const int64_t* counts) {
  const int64_t rows = w.size(0);
  const int64_t cols = w.numel() / rows;
  Tensor crow = at::empty({rows + 1}, w.options().dtype(at::kInt));
  int32_t* cp = crow.mutable_data_ptr<int32_t>();
  int64_t total = 0;
  cp[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    total += counts[r];
    cp[r + 1] = static_cast<int32_t>(total);
  }
  Tensor col = at::empty({total}, w.options().dtype(at::kInt));
  Tensor val = at::empty({total}, w.options());
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  int32_t* colp = col.mutable_data_ptr<int32_t>();
  scalar_t* valp = val.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      compress_row(wp + r * cols, t[r], cols, colp + cp[r], valp + cp[r]);
    }
  });
  return {crow, col, val};
}

template <typename scalar_t>
Compressed csr_rows(const Tensor& w, const scalar_t* t) {
  const int64_t rows = w.size(0);
  const int64_t cols = w.numel() / rows;
  std::vector<int64_t> counts(rows);
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      counts[r] = count_row(wp + r * cols, t[r], cols);
    }
  });
  int64_t total = 0;
  for (int64_t c : counts) {
    total += c;
  }
  TORCH_CHECK(total <= kMaxIndex, "dst_sparse_mask: ", total,
              " kept weights do not fit the int32 indices of the compressed form");
  return csr_from_counts(w, t, counts.data());
}

// The CSR of A^T ([cols, rows]) from the CSR of A ([rows, cols]): a counting sort over the
// nonzeros (rows visited in order, so every row of A^T lists its columns ascending).
template <typename scalar_t>
Compressed transposed(const Compressed& a, int64_t rows, int64_t cols) {
  const int64_t nnz = a.col.numel();
  Tensor crow = at::zeros({cols + 1}, a.crow.options());
  Tensor idx = at::empty({nnz}, a.col.options());
  Tensor val = at::empty({nnz}, a.val.options());
  const int32_t* ap = a.crow.const_data_ptr<int32_t>();
  const int32_t* aj = a.col.const_data_ptr<int32_t>();
  const scalar_t* av = a.val.const_data_ptr<scalar_t>();
  int32_t* cp = crow.mutable_data_ptr<int32_t>();
  int32_t* ip = idx.mutable_data_ptr<int32_t>();
  scalar_t* vp = val.mutable_data_ptr<scalar_t>();
  for (int64_t p = 0; p < nnz; ++p) {
    ++cp[aj[p] + 1];
  }
  for (int64_t j = 0; j < cols; ++j) {
    cp[j + 1] += cp[j];
  }
  std::vector<int32_t> pos(cp, cp + cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p = ap[r]; p < ap[r + 1]; ++p) {
      const int32_t q = pos[aj[p]]++;
      ip[q] = static_cast<int32_t>(r);
      vp[q] = av[p];
    }
  }
  return {crow, idx, val};
}

// Whether a layer keeping `kept` of its rows x cols weights takes the sparse path: the mode,
// and in auto mode the crossover density; never past the int32 indices.
bool take_at(int64_t kept, int64_t rows, int64_t cols, double crossover) {
  if (kept > kMaxIndex || rows > kMaxIndex || cols > kMaxIndex) {
    return false;
  }
  switch (static_cast<SparseMode>(g_sparse_mode.load(std::memory_order_relaxed))) {
    case SparseMode::kAlways:
      return true;
    case SparseMode::kNever:
      return false;
    default:
      return static_cast<double>(kept) < crossover * static_cast<double>(rows * cols);
  }
}

bool take_sparse(int64_t kept, int64_t tokens, int64_t in, int64_t out) {
  return take_at(kept, out, in, sparse_crossover(tokens, in, out));
}

// ----------------------------------------------------------------------------- ops

std::tuple<Tensor, Tensor, Tensor> dst_sparse_mask_cpu(const Tensor& weight,
                                                       const Tensor& threshold, bool transpose) {
  check_weight_threshold("dst_sparse_mask", weight, threshold);
  const Tensor w = weight.contiguous();
  const Tensor t = threshold.contiguous();
  const int64_t rows = w.size(0);
  const int64_t cols = w.numel() / rows;
  TORCH_CHECK(rows < kMaxIndex && cols < kMaxIndex, "dst_sparse_mask: weight of shape ",
              weight.sizes(), " is too large for the int32 indices of the compressed form");
  Compressed c;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dst_sparse_mask",
                                  [&] {
                                    const scalar_t* tp = t.const_data_ptr<scalar_t>();
                                    check_finite_thresholds(tp, rows);
                                    c = csr_rows(w, tp);
                                    if (transpose) {
                                      c = transposed<scalar_t>(c, rows, cols);
                                    }
                                  });
  return {c.crow, c.col, c.val};
}

// Whether every index lies in [0, k): one unsigned compare each, vectorised.
inline __attribute__((always_inline)) bool indices_below_impl(const int32_t* __restrict__ ip,
                                                              int64_t n, int64_t k) {
  const uint32_t bound = static_cast<uint32_t>(std::min<int64_t>(k, kMaxIndex));
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t p = 0; p < n; ++p) {
    bad |= static_cast<uint32_t>(ip[p]) >= bound ? 1u : 0u;
  }
  return bad == 0;
}
DST_CPU_MULTIVERSION(indices_below, indices_below_impl)

void check_csr(const char* op, const Tensor& crow, const Tensor& col, const Tensor& values,
               int64_t k) {
  TORCH_CHECK(crow.scalar_type() == at::kInt && col.scalar_type() == at::kInt, op,
              ": crow_indices and col_indices must be int32, got ", crow.scalar_type(), " and ",
              col.scalar_type());
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, op,
              ": crow_indices must be 1-D with rows + 1 entries, got shape ", crow.sizes());
  TORCH_CHECK(col.dim() == 1 && values.dim() == 1 && col.numel() == values.numel(), op,
              ": col_indices and values must be 1-D of the same length, got ", col.sizes(), " and ",
              values.sizes());
  TORCH_CHECK(crow.is_contiguous() && col.is_contiguous() && values.is_contiguous(), op,
              ": the compressed tensors must be contiguous; try .contiguous()");
  const int32_t* cp = crow.const_data_ptr<int32_t>();
  const int64_t rows = crow.numel() - 1;
  TORCH_CHECK(cp[0] == 0 && cp[rows] == col.numel(), op,
              ": crow_indices must start at 0 and end at nnz = ", col.numel(), ", got ", cp[0],
              " and ", cp[rows]);
  bool ordered = true;
  for (int64_t r = 0; r < rows; ++r) {
    ordered &= cp[r] <= cp[r + 1];
  }
  TORCH_CHECK(ordered, op, ": crow_indices must be non-decreasing");
  const int32_t* ip = col.const_data_ptr<int32_t>();
  TORCH_CHECK(indices_below(ip, col.numel(), k), op, ": col_indices must lie in [0, ", k,
              ") (the features of x's last dimension)");
}

Tensor dst_sparse_mm_cpu(const Tensor& x, const Tensor& crow, const Tensor& col,
                         const Tensor& values, const std::optional<Tensor>& bias, bool relu) {
  const char* op = "dst_sparse_mm";
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a scalar");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values have dtype ",
              values.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(
      crow.device() == x.device() && col.device() == x.device() && values.device() == x.device(),
      op, ": x and the compressed tensors must be on one device");
  const int64_t k = x.size(-1);
  check_csr(op, crow, col, values, k);
  const int64_t m = crow.numel() - 1;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == m, op, ": bias must have shape [", m,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must have x's dtype and device");
  }
  const Tensor x2 = x.reshape({-1, k}).contiguous();
  const int64_t n = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(m);
  Tensor y = at::empty(out_shape, x.options());
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dst_sparse_mm", [&] {
    spmm<scalar_t>(x2.const_data_ptr<scalar_t>(), n, k,
                   {crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
                    values.const_data_ptr<scalar_t>()},
                   m, col.numel(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                   y.mutable_data_ptr<scalar_t>(), relu);
  });
  return y;
}

}  // namespace

// ============================================================================= convolutions
//
// A direct sparse convolution over the kept filter taps of P = W * M:
//
//   dst_sparse_conv2d(x, crow, col, val, b, ...)   y = conv2d(x, A) + b for A in CSR over
//                                                  [out_channels, in_channels * KH * KW]
//   sparse::conv2d_from_counts                     y = conv2d(x, P) + b from the CSR built off
//                                                  the mask pass's filter counts
//   sparse::conv2d_grad_input_from_counts          dX = conv_transpose(dY, P), the same way
//
// (the last two are the sparse path of the CPU dst_conv2d kernels, csrc/cpu/conv2d.cpp).
// Both directions are one correlation over a prepared input `in`:
//
//   out[r, i, j] = b[r] + sum_e val[e] * in[off[e] + i * ld + j]
//
// For the forward, `in` is x zero-padded and, for stride s, split into its s x s phases (a
// stride-s convolution of x is a stride-1 correlation of its phases); for dX it is dY spread
// onto the stride grid and padded by K_eff - 1 - padding, and the taps are flipped. Every kept
// tap is then one offset, and the inner loop is one contiguous vector load and one FMA per
// output row of a block, with the accumulators in registers. Images whose output rows are
// narrower than a vector are laid out in groups, batch-innermost, so that a vector spans the
// same row of several images. With enough image groups each thread prepares a group into its
// own buffer (in cache) and correlates it whole.
//
// Each output element is one thread's sum over its filter's kept taps in a fixed order
// (opmath accumulation): results are deterministic and independent of the thread count.
// The correlation is compared with the dense convolution within tolerance, never bit for bit:
// its multiply-adds may fuse (one rounding each, half the instructions).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

namespace {

// Vectors of the accumulation type for the correlation.
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
typedef float vf8 __attribute__((vector_size(32), aligned(4)));
typedef double vd8 __attribute__((vector_size(64), aligned(8)));
typedef double vd4 __attribute__((vector_size(32), aligned(8)));
template <typename T, int W>
struct VecOf;
template <>
struct VecOf<float, 16> {
  using type = vf16;
};
template <>
struct VecOf<float, 8> {
  using type = vf8;
};
template <>
struct VecOf<double, 8> {
  using type = vd8;
};
template <>
struct VecOf<double, 4> {
  using type = vd4;
};

// The shape of one convolution (groups 1).
struct ConvShape {
  int64_t n, c, h, w;  // input
  int64_t oc, kh, kw;  // filters
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t oh, ow;  // output
  int64_t keh() const { return dh * (kh - 1) + 1; }
  int64_t kew() const { return dw * (kw - 1) + 1; }
};

// A correlation: out has `rows` planes of oh x ow (ow counts the images too when batch-inner).
struct Corr {
  int64_t images;  // images (groups of images) looped over
  int64_t rows, oh, ow;
  int64_t ld, image;  // row and image strides of `in`
};

template <typename T>
constexpr int full_lanes() {
  return static_cast<int>(64 / sizeof(T));
}

// The vector width the correlation uses: 64 bytes where the AVX-512 clones run, else 32.
template <typename T>
int lanes_here() {
  return cpu::isa() == cpu::Isa::kAvx512 ? full_lanes<T>() : full_lanes<T>() / 2;
}

// Output rows [i0, i0 + RB) of filters [r0, r1) of one image: per column chunk of JW * NT
// lanes, RB x NT vector accumulators over the filter's taps.
template <typename T, typename out_t, int JW, int NT, int RB>
inline __attribute__((always_inline)) void corr_rows(const T* __restrict__ in,
                                                     const int32_t* __restrict__ crow,
                                                     const int32_t* __restrict__ off,
                                                     const T* __restrict__ val, const out_t* bias,
                                                     out_t* __restrict__ y, const Corr& g,
                                                     int64_t i0, int64_t r0, int64_t r1) {
  using V = typename VecOf<T, JW>::type;
  constexpr int64_t kChunk = int64_t(JW) * NT;
  const int64_t rows_here = std::min<int64_t>(RB, g.oh - i0);
  const int64_t ld = g.ld;
  for (int64_t r = r0; r < r1; ++r) {
    const T b = bias != nullptr ? static_cast<T>(bias[r]) : T(0);
    out_t* yr = y + r * g.oh * g.ow;
    const int64_t e0 = crow[r];
    const int64_t e1 = crow[r + 1];
    for (int64_t j0 = 0; j0 < g.ow; j0 += kChunk) {
      V acc[RB][NT];
      for (int rr = 0; rr < RB; ++rr) {
        for (int t = 0; t < NT; ++t) {
          acc[rr][t] = V{};
        }
      }
      const T* base = in + i0 * ld + j0;
      for (int64_t e = e0; e < e1; ++e) {
        const T v = val[e];
        const T* p = base + off[e];
        for (int rr = 0; rr < RB; ++rr) {
          for (int t = 0; t < NT; ++t) {
            acc[rr][t] += v * *reinterpret_cast<const V*>(p + rr * ld + t * JW);
          }
        }
      }
      const int64_t cols = std::min<int64_t>(kChunk, g.ow - j0);
      for (int64_t rr = 0; rr < rows_here; ++rr) {
        alignas(64) T lanes[kChunk];
        std::memcpy(lanes, acc[rr], sizeof(acc[rr]));
        out_t* o = yr + (i0 + rr) * g.ow + j0;
        for (int64_t c = 0; c < cols; ++c) {
          o[c] = static_cast<out_t>(lanes[c] + b);
        }
      }
    }
  }
}

template <typename T, typename out_t, int JW>
inline __attribute__((always_inline)) void corr_rows_nt(int nt, int rb, const T* in,
                                                        const int32_t* crow, const int32_t* off,
                                                        const T* val, const out_t* bias, out_t* y,
                                                        const Corr& g, int64_t i0, int64_t r0,
                                                        int64_t r1) {
  // (column vectors, rows) per block: 8 accumulators, fewer where the output has fewer rows.
  switch (nt * 16 + rb) {
    case 16 + 8:
      return corr_rows<T, out_t, JW, 1, 8>(in, crow, off, val, bias, y, g, i0, r0, r1);
    case 16 + 4:
      return corr_rows<T, out_t, JW, 1, 4>(in, crow, off, val, bias, y, g, i0, r0, r1);
    case 16 + 2:
      return corr_rows<T, out_t, JW, 1, 2>(in, crow, off, val, bias, y, g, i0, r0, r1);
    case 16 + 1:
      return corr_rows<T, out_t, JW, 1, 1>(in, crow, off, val, bias, y, g, i0, r0, r1);
    case 32 + 4:
      return corr_rows<T, out_t, JW, 2, 4>(in, crow, off, val, bias, y, g, i0, r0, r1);
    case 32 + 2:
      return corr_rows<T, out_t, JW, 2, 2>(in, crow, off, val, bias, y, g, i0, r0, r1);
    case 32 + 1:
      return corr_rows<T, out_t, JW, 2, 1>(in, crow, off, val, bias, y, g, i0, r0, r1);
    case 64 + 2:
      return corr_rows<T, out_t, JW, 4, 2>(in, crow, off, val, bias, y, g, i0, r0, r1);
    default:
      return corr_rows<T, out_t, JW, 4, 1>(in, crow, off, val, bias, y, g, i0, r0, r1);
  }
}

template <typename T, typename out_t>
inline __attribute__((always_inline)) void corr_rows_any_impl(
    int jw, int nt, int rb, const T* in, const int32_t* crow, const int32_t* off, const T* val,
    const out_t* bias, out_t* y, const Corr* g, int64_t i0, int64_t r0, int64_t r1) {
  constexpr int kFull = full_lanes<T>();
  if (jw == kFull) {
    corr_rows_nt<T, out_t, kFull>(nt, rb, in, crow, off, val, bias, y, *g, i0, r0, r1);
  } else {
    corr_rows_nt<T, out_t, kFull / 2>(nt, rb, in, crow, off, val, bias, y, *g, i0, r0, r1);
  }
}

DST_CPU_MULTIVERSION(corr_rows_any, corr_rows_any_impl)

// The block sizes the correlation of an output width uses.
struct Blocking {
  int jw, nt, rb;
};

// Up to 4 vectors across a row and 8 accumulators, the rows per block cut to the output's.
template <typename T>
Blocking blocking(int64_t ow, int64_t oh) {
  const int jw = lanes_here<T>();
  const int nt = ow <= jw ? 1 : (ow <= 2 * jw ? 2 : 4);
  int rb = 8 / nt;
  while (rb > 1 && rb / 2 >= oh) {
    rb /= 2;
  }
  return {jw, nt, rb};
}

// Elements a correlation may read past the end of its input (the last block's rows past oh
// and its lanes past ow).
int64_t slack(int64_t ld) { return 9 * ld + 4 * 64 + 64; }

// One image group's correlation on the calling thread: every row block of every filter.
template <typename T, typename out_t>
void correlate_serial(const T* in, const int32_t* crow, const int32_t* off, const T* val,
                      const out_t* bias, out_t* y, const Corr& g) {
  const Blocking bk = blocking<T>(g.ow, g.oh);
  for (int64_t i0 = 0; i0 < g.oh; i0 += bk.rb) {
    corr_rows_any(bk.jw, bk.nt, bk.rb, in, crow, off, val, bias, y, &g, i0, int64_t(0), g.rows);
  }
}

// out = the correlation of `in` with the entries (crow, off, val): parallel over (image, row
// block, filter chunk) items, image-major, so a thread's items share their input window.
template <typename T, typename out_t>
void correlate(const T* in, const int32_t* crow, const int32_t* off, const T* val, int64_t nnz,
               const out_t* bias, out_t* y, const Corr& g) {
  if (g.images == 0 || g.rows == 0 || g.oh == 0 || g.ow == 0) {
    return;
  }
  const Blocking bk = blocking<T>(g.ow, g.oh);
  const int64_t row_blocks = (g.oh + bk.rb - 1) / bk.rb;
  constexpr int64_t kFilterChunk = 16;
  const int64_t chunks = (g.rows + kFilterChunk - 1) / kFilterChunk;
  const int64_t items = g.images * row_blocks * chunks;
  const int64_t chunk_lanes = int64_t(bk.jw) * bk.nt;
  const int64_t per_item =
      std::max<int64_t>(1, (nnz / g.rows + 1) * std::min(kFilterChunk, g.rows) * bk.rb *
                               ((g.ow + chunk_lanes - 1) / chunk_lanes) * chunk_lanes);
  const int64_t grain = std::max<int64_t>(1, kGrainWork / per_item);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t image = it / (row_blocks * chunks);
      const int64_t rest = it % (row_blocks * chunks);
      const int64_t i0 = (rest / chunks) * bk.rb;
      const int64_t r0 = (rest % chunks) * kFilterChunk;
      const int64_t r1 = std::min(g.rows, r0 + kFilterChunk);
      corr_rows_any(bk.jw, bk.nt, bk.rb, in + image * g.image, crow, off, val, bias,
                    y + image * g.rows * g.oh * g.ow, &g, i0, r0, r1);
    }
  });
}

// Images per group of the layout: a group of G images lies batch-innermost, so that a vector
// spans the same output row of G images, when a row of one image would fill less than a vector.
// With fewer than 8 output rows a group's row spans up to 4 vectors (8 accumulators still).
template <typename T>
int64_t group_for(int64_t images, int64_t ow, int64_t oh) {
  const int64_t jw = lanes_here<T>();
  if (ow >= jw) {
    return 1;
  }
  const int64_t lanes = jw * (oh >= 8 ? 1 : (oh >= 4 ? 2 : 4));
  return std::max<int64_t>(1, std::min(images, lanes / ow));
}

// Element (image n, plane, row i, column j) of a prepared input lies at
// (n / group) * image + n % group + plane * plane_stride + i * ld + j * col.
struct Layout {
  int64_t group, groups;
  int64_t image, plane, ld, col;  // strides (image: of a group)
  int64_t total;                  // elements, the slack for over-reads excluded
};

Layout layout_for(int64_t group, int64_t images, int64_t planes, int64_t rows, int64_t cols) {
  Layout l{};
  l.group = group;
  l.groups = (images + group - 1) / group;
  l.col = group;
  l.ld = cols * group;
  l.plane = rows * l.ld;
  l.image = planes * l.plane;
  l.total = l.groups * l.image;
  return l;
}

inline int64_t base_of(const Layout& l, int64_t n) { return (n / l.group) * l.image + n % l.group; }

// The forward's input for channel c of image group g (at `dst`, the group's start): xpad = x
// zero-padded, phase (a, b) holding xpad[a + s_h * i, b + s_w * j] as plane
// c * s_h * s_w + a * s_w + b of hq x wq. Empty slots of a last group stay zero.
template <typename scalar_t, typename T>
void prepare_forward(const Tensor& x, const ConvShape& s, int64_t hq, int64_t wq, const Layout& l,
                     int64_t g, int64_t c, T* dst) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t xn = x.stride(0), xc = x.stride(1), xh = x.stride(2), xw = x.stride(3);
  for (int64_t a = 0; a < s.sh; ++a) {
    for (int64_t b = 0; b < s.sw; ++b) {
      T* plane = dst + (c * s.sh * s.sw + a * s.sw + b) * l.plane;
      std::fill(plane, plane + l.plane, T(0));
      // Rows i and columns j of the phase that fall inside x.
      const int64_t i0 = std::max<int64_t>(0, (s.ph - a + s.sh - 1) / s.sh);
      const int64_t i1 = std::min<int64_t>(hq, (s.h + s.ph - a + s.sh - 1) / s.sh);
      const int64_t j0 = std::max<int64_t>(0, (s.pw - b + s.sw - 1) / s.sw);
      const int64_t j1 = std::min<int64_t>(wq, (s.w + s.pw - b + s.sw - 1) / s.sw);
      for (int64_t k = 0; k < l.group; ++k) {
        const int64_t n = g * l.group + k;
        if (n >= s.n) {
          break;
        }
        const scalar_t* src = xp + n * xn + c * xc + (b + s.sw * j0 - s.pw) * xw;
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t* srow = src + (a + s.sh * i - s.ph) * xh;
          T* row = plane + k + i * l.ld + j0 * l.col;
          const int64_t step = s.sw * xw;
          if (l.col == 1 && step == 1) {
            for (int64_t j = 0; j < j1 - j0; ++j) {
              row[j] = static_cast<T>(srow[j]);
            }
          } else {
            for (int64_t j = 0; j < j1 - j0; ++j) {
              row[j * l.col] = static_cast<T>(srow[j * step]);
            }
          }
        }
      }
    }
  }
}

// dX's input for plane o of image group g: dY spread onto the stride grid and padded,
// dY[n, o, i, j] at (q_h + s_h * i, q_w + s_w * j) of h + keh - 1 x w + kew - 1, zeros
// elsewhere.
template <typename scalar_t, typename T>
void prepare_grad_input(const Tensor& dy, const ConvShape& s, const Layout& l, int64_t g, int64_t o,
                        T* dst) {
  const scalar_t* gp = dy.const_data_ptr<scalar_t>();
  const int64_t gn = dy.stride(0), gc = dy.stride(1), gh = dy.stride(2), gw = dy.stride(3);
  const int64_t qh = s.keh() - 1 - s.ph;
  const int64_t qw = s.kew() - 1 - s.pw;
  T* plane = dst + o * l.plane;
  std::fill(plane, plane + l.plane, T(0));
  const int64_t step = s.sw * l.col;
  for (int64_t k = 0; k < l.group; ++k) {
    const int64_t n = g * l.group + k;
    if (n >= s.n) {
      break;
    }
    const scalar_t* src = gp + n * gn + o * gc;
    for (int64_t i = 0; i < s.oh; ++i) {
      T* row = plane + k + (qh + s.sh * i) * l.ld + qw * l.col;
      const scalar_t* srow = src + i * gh;
      if (step == 1 && gw == 1) {
        for (int64_t j = 0; j < s.ow; ++j) {
          row[j] = static_cast<T>(srow[j]);
        }
      } else {
        for (int64_t j = 0; j < s.ow; ++j) {
          row[j * step] = static_cast<T>(srow[j * gw]);
        }
      }
    }
  }
}

// The forward's entries: filter o's kept tap (c, kh, kw) reads plane c * s_h * s_w + phase at
// (kh * d_h / s_h, kw * d_w / s_w).
template <typename scalar_t, typename T>
void forward_entries(const int32_t* col, const scalar_t* val, int64_t nnz, const ConvShape& s,
                     const Layout& l, int32_t* off, T* v) {
  // The offset of every column c * kh * kw + tap, then one lookup per entry (no division).
  std::vector<int32_t> at_col(s.c * s.kh * s.kw);
  const int64_t phases = s.sh * s.sw;
  for (int64_t u = 0; u < s.kh; ++u) {
    for (int64_t w = 0; w < s.kw; ++w) {
      const int64_t a = u * s.dh, b = w * s.dw;
      const int64_t phase = (a % s.sh) * s.sw + (b % s.sw);
      const int64_t within = (a / s.sh) * l.ld + (b / s.sw) * l.col;
      for (int64_t c = 0; c < s.c; ++c) {
        at_col[(c * s.kh + u) * s.kw + w] =
            static_cast<int32_t>((c * phases + phase) * l.plane + within);
      }
    }
  }
  at::parallel_for(0, nnz, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      off[e] = at_col[col[e]];
      v[e] = static_cast<T>(val[e]);
    }
  });
}

// dX's entries: input channel c gathers every kept (o, kh, kw) of P, flipped, in (o, tap)
// order: plane o at (keh - 1 - kh * d_h, kew - 1 - kw * d_w). Returns the row pointers.
template <typename scalar_t, typename T>
std::vector<int32_t> grad_input_entries(const int32_t* crow, const int32_t* col,
                                        const scalar_t* val, const ConvShape& s, const Layout& l,
                                        int32_t* off, T* v) {
  const int64_t kk = s.kh * s.kw;
  const int64_t nnz = crow[s.oc];
  // The channel and the in-plane offset of every column c * kh * kw + tap (no division).
  std::vector<int32_t> channel(s.c * kk), within(s.c * kk);
  for (int64_t c = 0; c < s.c; ++c) {
    for (int64_t u = 0; u < s.kh; ++u) {
      for (int64_t w = 0; w < s.kw; ++w) {
        const int64_t q = (c * s.kh + u) * s.kw + w;
        channel[q] = static_cast<int32_t>(c);
        within[q] = static_cast<int32_t>((s.keh() - 1 - u * s.dh) * l.ld +
                                         (s.kew() - 1 - w * s.dw) * l.col);
      }
    }
  }
  std::vector<int32_t> rows(s.c + 1, 0);
  for (int64_t e = 0; e < nnz; ++e) {
    ++rows[channel[col[e]] + 1];
  }
  for (int64_t c = 0; c < s.c; ++c) {
    rows[c + 1] += rows[c];
  }
  std::vector<int32_t> pos(rows.begin(), rows.end() - 1);
  for (int64_t o = 0; o < s.oc; ++o) {
    for (int64_t e = crow[o]; e < crow[o + 1]; ++e) {
      const int32_t q = pos[channel[col[e]]]++;
      off[q] = static_cast<int32_t>(o * l.plane + within[col[e]]);
      v[q] = static_cast<T>(val[e]);
    }
  }
  return rows;
}

// out [n, rows, hw] from a grouped result [groups, rows, hw * group] (image n % group
// innermost).
template <typename out_t>
void from_groups(const out_t* src, int64_t n, int64_t group, int64_t rows, int64_t hw, out_t* dst) {
  at::parallel_for(0, n * rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / rows;
      const int64_t r = item % rows;
      const out_t* s = src + ((i / group) * rows + r) * hw * group + i % group;
      out_t* d = dst + (i * rows + r) * hw;
      for (int64_t p = 0; p < hw; ++p) {
        d[p] = s[p * group];
      }
    }
  });
}

// out [n, rows, oh, ow] = the correlation of the input that prepare(g, p, group_buffer)
// writes, plane p of image group g at a time, with the entries. With at least as many groups
// as threads, each thread prepares a group into its own buffer (in cache) and correlates it
// whole; else the groups are prepared in parallel first and the correlation is split over
// row blocks and filters too.
template <typename T, typename out_t, typename Prepare>
void correlate_layout(const Layout& l, int64_t planes, const Prepare& prepare, const int32_t* crow,
                      const int32_t* off, const T* v, int64_t nnz, const out_t* bias, int64_t n,
                      int64_t rows, int64_t oh, int64_t ow, out_t* out) {
  const int64_t extra = slack(l.ld);
  const Corr g{l.groups, rows, oh, ow * l.group, l.ld, l.image};
  // The buffers come from the recycled ones (dst/recycle.h): several MB each, every step.
  constexpr auto kOut = c10::CppTypeToScalarType<out_t>::value;
  constexpr auto kT = c10::CppTypeToScalarType<T>::value;
  Tensor tmp;
  out_t* dst = out;
  if (l.group > 1) {
    tmp = cpu::recycled_empty({l.groups * rows * oh * ow * l.group}, kOut);
    dst = tmp.mutable_data_ptr<out_t>();
  }
  const int64_t threads = at::get_num_threads();
  if (l.groups >= threads && l.groups > 1) {
    const Corr one{1, rows, oh, ow * l.group, l.ld, l.image};
    at::parallel_for(0, l.groups, 1, [&](int64_t begin, int64_t end) {
      Tensor held = cpu::recycled_empty({l.image + extra}, kT);
      T* buf = held.mutable_data_ptr<T>();
      std::fill(buf + l.image, buf + l.image + extra, T(0));
      for (int64_t grp = begin; grp < end; ++grp) {
        for (int64_t p = 0; p < planes; ++p) {
          prepare(grp, p, buf);
        }
        correlate_serial<T, out_t>(buf, crow, off, v, bias, dst + grp * rows * oh * ow * l.group,
                                   one);
      }
    });
  } else {
    Tensor held = cpu::recycled_empty({l.total + extra}, kT);
    T* buf = held.mutable_data_ptr<T>();
    std::fill(buf + l.total, buf + l.total + extra, T(0));
    at::parallel_for(0, l.groups * planes, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t grp = item / planes;
        prepare(grp, item % planes, buf + grp * l.image);
      }
    });
    correlate<T, out_t>(buf, crow, off, v, nnz, bias, dst, g);
  }
  if (l.group > 1) {
    from_groups(dst, n, l.group, rows, oh * ow, out);
  }
}

// y = conv2d(x, A) + bias for A in CSR over [oc, c * kh * kw] (x: scalar_t, any strides).
template <typename scalar_t>
Tensor forward_from_csr(const Tensor& x, const int32_t* crow, const int32_t* col,
                        const scalar_t* val, const scalar_t* bias, const ConvShape& s) {
  using T = opmath<scalar_t>;
  Tensor y = cpu::recycled_empty({s.n, s.oc, s.oh, s.ow}, x.scalar_type());
  if (y.numel() == 0) {
    return y;
  }
  const int64_t nnz = crow[s.oc];
  const int64_t hq = (s.h + 2 * s.ph + s.sh - 1) / s.sh;
  const int64_t wq = (s.w + 2 * s.pw + s.sw - 1) / s.sw;
  const Layout l = layout_for(group_for<T>(s.n, s.ow, s.oh), s.n, s.c * s.sh * s.sw, hq, wq);
  TORCH_CHECK(l.image + slack(l.ld) < kMaxIndex, "dst_sparse_conv2d: an input ", "image of ",
              l.image, " padded elements is too large for the int32 offsets");
  std::vector<int32_t> off(std::max<int64_t>(nnz, 1));
  std::vector<T> v(std::max<int64_t>(nnz, 1));
  forward_entries<scalar_t, T>(col, val, nnz, s, l, off.data(), v.data());
  auto prepare = [&](int64_t g, int64_t c, T* dst) {
    prepare_forward<scalar_t, T>(x, s, hq, wq, l, g, c, dst);
  };
  correlate_layout<T, scalar_t>(l, s.c, prepare, crow, off.data(), v.data(), nnz, bias, s.n, s.oc,
                                s.oh, s.ow, y.mutable_data_ptr<scalar_t>());
  return y;
}

// dX = conv_transpose(dY, A) for A in CSR over [oc, c * kh * kw]; needs padding <= K_eff - 1.
template <typename scalar_t>
Tensor grad_input_from_csr(const Tensor& dy, const int32_t* crow, const int32_t* col,
                           const scalar_t* val, const ConvShape& s) {
  using T = opmath<scalar_t>;
  Tensor dx = cpu::recycled_empty({s.n, s.c, s.h, s.w}, dy.scalar_type());
  if (dx.numel() == 0) {
    return dx;
  }
  const int64_t nnz = crow[s.oc];
  const int64_t hb = s.h + s.keh() - 1;
  const int64_t wb = s.w + s.kew() - 1;
  const Layout l = layout_for(group_for<T>(s.n, s.w, s.h), s.n, s.oc, hb, wb);
  TORCH_CHECK(l.image + slack(l.ld) < kMaxIndex, "dst_conv2d_grad_input: an ", "output image of ",
              l.image, " padded elements is too large for the int32 offsets");
  std::vector<int32_t> off(std::max<int64_t>(nnz, 1));
  std::vector<T> v(std::max<int64_t>(nnz, 1));
  const std::vector<int32_t> rows =
      grad_input_entries<scalar_t, T>(crow, col, val, s, l, off.data(), v.data());
  auto prepare = [&](int64_t g, int64_t o, T* dst) {
    prepare_grad_input<scalar_t, T>(dy, s, l, g, o, dst);
  };
  correlate_layout<T, scalar_t>(l, s.oc, prepare, rows.data(), off.data(), v.data(), nnz,
                                static_cast<const scalar_t*>(nullptr), s.n, s.c, s.h, s.w,
                                dx.mutable_data_ptr<scalar_t>());
  return dx;
}

// ----------------------------------------------------------------------------- arguments

int64_t out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

void check_geometry(const char* op, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 entries each, got ", stride, ", ",
              padding, " and ", dilation);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ",
              padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be positive, got ",
              dilation);
}

ConvShape shape_of(const char* op, at::IntArrayRef x, int64_t oc, int64_t kh, int64_t kw,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  ConvShape s{x[0],      x[1],       x[2],       x[3],        oc,          kh, kw, stride[0],
              stride[1], padding[0], padding[1], dilation[0], dilation[1], 0,  0};
  s.oh = out_size(s.h, kh, s.sh, s.ph, s.dh);
  s.ow = out_size(s.w, kw, s.sw, s.pw, s.dw);
  TORCH_CHECK(s.h + 2 * s.ph >= s.keh() && s.w + 2 * s.pw >= s.kew(), op, ": input of size ", x,
              " (padded by ", padding, ") is smaller than the dilated kernel (", s.keh(), ", ",
              s.kew(), ")");
  return s;
}

// The fused epilogue of dst_sparse_conv2d: max_pool2d (window kh x kw, stride sh x sw, no
// padding, floor) of the ReLU of y [planes, oh, ow] into out [planes, ph, pw]. The maximum
// propagates NaN as max_pool2d does; the ReLU keeps NaN as torch.relu does, and since both are
// monotone the ReLU is applied once, to each window's maximum.
#ifdef DST_AVX512_COMPRESS
// A float 2 x 2 window, stride 2, on AVX-512: per plane, the larger of each pair of rows into
// `pair` ([ph, 2 pw], contiguous), then of each even / odd pair of its columns, 16 outputs at
// a time (masked past the ends). The larger of two lanes is NaN when either is.
__attribute__((target("avx512f"))) void relu_max_pool_2x2_avx512(const float* src, int64_t oh,
                                                                 int64_t ow, bool relu, float* pair,
                                                                 float* dst) {
  const int64_t ph = oh / 2, pw = ow / 2, wide = 2 * pw;
  auto nan_max = [](__m512 a, __m512 b) {
    return _mm512_mask_mov_ps(_mm512_max_ps(a, b), _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a);
  };
  auto upto = [](int64_t m) {
    return m >= 16 ? __mmask16(0xFFFF) : m <= 0 ? __mmask16(0) : __mmask16((1u << m) - 1);
  };
  for (int64_t i = 0; i < ph; ++i) {
    const float* row = src + 2 * i * ow;
    for (int64_t k = 0; k < wide; k += 16) {
      const __mmask16 m = upto(wide - k);
      const __m512 a = _mm512_maskz_loadu_ps(m, row + k);
      const __m512 c = _mm512_maskz_loadu_ps(m, row + ow + k);
      _mm512_mask_storeu_ps(pair + i * wide + k, m, nan_max(a, c));
    }
  }
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512 zero = _mm512_setzero_ps();
  const int64_t outs = ph * pw;
  for (int64_t q = 0; q < outs; q += 16) {
    const int64_t left = outs - q;
    const __m512 lo = _mm512_maskz_loadu_ps(upto(2 * left), pair + 2 * q);
    const __m512 hi = _mm512_maskz_loadu_ps(upto(2 * left - 16), pair + 2 * q + 16);
    __m512 v = nan_max(_mm512_permutex2var_ps(lo, even, hi), _mm512_permutex2var_ps(lo, odd, hi));
    if (relu) {
      // Negatives to zero; NaN (unordered) kept.
      v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero);
    }
    _mm512_mask_storeu_ps(dst + q, upto(left), v);
  }
}
#endif

// The fused epilogue of dst_sparse_conv2d: max_pool2d (window kh x kw, stride sh x sw, no
// padding, floor) of the ReLU of y [planes, oh, ow] into out [planes, ph, pw]. The maximum
// propagates NaN as max_pool2d does; the ReLU keeps NaN as torch.relu does, and since both are
// monotone the ReLU is applied once, to each window's maximum.
// m <= 16 floats from p into a vector (the rest zero), and back.
inline __attribute__((always_inline)) vf16 load_upto16(const float* p, int64_t m) {
  vf16 v = {};
  std::memcpy(&v, p, sizeof(float) * std::clamp<int64_t>(m, 0, 16));
  return v;
}
inline __attribute__((always_inline)) void store_upto16(float* p, vf16 v, int64_t m) {
  std::memcpy(p, &v, sizeof(float) * std::clamp<int64_t>(m, 0, 16));
}
// The larger lane of a and b, NaN if either is NaN (as max_pool2d propagates it).
inline __attribute__((always_inline)) vf16 nan_max16(vf16 a, vf16 b) {
  return (b > a) | (b != b) ? b : a;
}

// A float 2 x 2 window, stride 2: per plane, the larger of each pair of rows into `pair`
// ([ph, 2 pw], contiguous), then of each even / odd pair of its columns, 16 outputs at a time.
void relu_max_pool_2x2(const float* src, int64_t oh, int64_t ow, bool relu, float* pair,
                       float* dst) {
  const int64_t ph = oh / 2, pw = ow / 2, wide = 2 * pw;
  for (int64_t i = 0; i < ph; ++i) {
    const float* row = src + 2 * i * ow;
    for (int64_t k = 0; k < wide; k += 16) {
      const int64_t m = std::min<int64_t>(16, wide - k);
      store_upto16(pair + i * wide + k,
                   nan_max16(load_upto16(row + k, m), load_upto16(row + ow + k, m)), m);
    }
  }
  const vf16 zero = {};
  const int64_t outs = ph * pw;
  for (int64_t q = 0; q < outs; q += 16) {
    const int64_t m = std::min<int64_t>(16, outs - q);
    const vf16 lo = load_upto16(pair + 2 * q, 2 * m);
    const vf16 hi = load_upto16(pair + 2 * q + 16, 2 * m - 16);
    const vf16 even =
        __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const vf16 odd =
        __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    vf16 v = nan_max16(even, odd);
    if (relu) {
      v = v < zero ? zero : v;
    }
    store_upto16(dst + q, v, m);
  }
}

// The fused epilogue of dst_sparse_conv2d: max_pool2d (window kh x kw, stride sh x sw, no
// padding, floor) of the ReLU of y [planes, oh, ow] into out [planes, ph, pw]. The maximum
// propagates NaN as max_pool2d does; the ReLU keeps NaN as torch.relu does, and since both are
// monotone the ReLU is applied once, to each window's maximum.
template <typename scalar_t>
void relu_max_pool(const scalar_t* y, int64_t planes, int64_t oh, int64_t ow, int64_t kh,
                   int64_t kw, int64_t sh, int64_t sw, bool relu, scalar_t* out) {
  using T = opmath<scalar_t>;
  const int64_t ph = (oh - kh) / sh + 1;
  const int64_t pw = (ow - kw) / sw + 1;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, oh * ow));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
#ifdef DST_AVX512_COMPRESS
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (kh == 2 && kw == 2 && sh == 2 && sw == 2 && has_avx512()) {
        std::unique_ptr<float[]> pair(new float[ph * 2 * pw]);
        for (int64_t p = begin; p < end; ++p) {
          relu_max_pool_2x2_avx512(y + p * oh * ow, oh, ow, relu, pair.get(), out + p * ph * pw);
        }
        return;
      }
    }
#endif
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* src = y + p * oh * ow;
      scalar_t* dst = out + p * ph * pw;
      for (int64_t i = 0; i < ph; ++i) {
        const scalar_t* row = src + i * sh * ow;
        for (int64_t j = 0; j < pw; ++j) {
          T m = T(row[j * sw]);
          for (int64_t u = 0; u < kh; ++u) {
            for (int64_t v = 0; v < kw; ++v) {
              const T e = T(row[u * ow + j * sw + v]);
              m = e > m || e != e ? e : m;
            }
          }
          dst[i * pw + j] = scalar_t(relu_if(m, relu));
        }
      }
    }
  });
}

Tensor dst_sparse_conv2d_cpu(const Tensor& x, const Tensor& crow, const Tensor& col,
                             const Tensor& values, const std::optional<Tensor>& bias,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu,
                             at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride) {
  const char* op = "dst_sparse_conv2d";
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values have dtype ",
              values.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(
      crow.device() == x.device() && col.device() == x.device() && values.device() == x.device(),
      op, ": x and the compressed tensors must be on one device");
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": kernel_size must be 2 positive sizes, got ", kernel_size);
  check_geometry(op, stride, padding, dilation);
  check_csr(op, crow, col, values, x.size(1) * kernel_size[0] * kernel_size[1]);
  const int64_t oc = crow.numel() - 1;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == oc, op, ": bias must have shape [", oc,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must have x's dtype and device");
  }
  TORCH_CHECK(pool_kernel.size() == 2 && pool_kernel[0] >= 1 && pool_kernel[1] >= 1, op,
              ": pool_kernel must be 2 positive sizes, got ", pool_kernel);
  TORCH_CHECK(pool_stride.size() == 2 && pool_stride[0] >= 1 && pool_stride[1] >= 1, op,
              ": pool_stride must be 2 positive sizes, got ", pool_stride);
  const ConvShape s =
      shape_of(op, x.sizes(), oc, kernel_size[0], kernel_size[1], stride, padding, dilation);
  const bool pooled =
      pool_kernel[0] > 1 || pool_kernel[1] > 1 || pool_stride[0] > 1 || pool_stride[1] > 1;
  TORCH_CHECK(!pooled || (s.oh >= pool_kernel[0] && s.ow >= pool_kernel[1]), op,
              ": the convolution's output of ", s.oh, " x ", s.ow,
              " is smaller than the pool window ", pool_kernel);
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "dst_sparse_conv2d", [&] {
        y = forward_from_csr<scalar_t>(x, crow.const_data_ptr<int32_t>(),
                                       col.const_data_ptr<int32_t>(),
                                       values.const_data_ptr<scalar_t>(),
                                       has_bias ? b.const_data_ptr<scalar_t>() : nullptr, s);
        if ((pooled || relu) && y.numel() > 0) {
          const int64_t ph = (s.oh - pool_kernel[0]) / pool_stride[0] + 1;
          const int64_t pw = (s.ow - pool_kernel[1]) / pool_stride[1] + 1;
          Tensor out = pooled ? at::empty({s.n, s.oc, ph, pw}, y.options()) : y;
          relu_max_pool<scalar_t>(y.const_data_ptr<scalar_t>(), s.n * s.oc, s.oh, s.ow,
                                  pool_kernel[0], pool_kernel[1], pool_stride[0], pool_stride[1],
                                  relu, out.mutable_data_ptr<scalar_t>());
          y = out;
        } else if (pooled) {
          y = at::empty({s.n, s.oc, (s.oh - pool_kernel[0]) / pool_stride[0] + 1,
                         (s.ow - pool_kernel[1]) / pool_stride[1] + 1},
                        y.options());
        }
      });
  return y;
}

}  // namespace

#pragma GCC pop_options

// ============================================================================= recurrent layers
//
// One layer and direction of an LSTM or GRU (PyTorch's gate order and equations) on the
// masked gate matrices P_ih [G * H, I] and P_hh [G * H, H] (G = 4 for the LSTM, 3 for the GRU):
//
//   dst_sparse_rnn(x, h0, c0, CSR of P_ih, CSR of P_hh, b_ih, b_hh)   inference: (y, h_n, c_n)
//   dst_sparse_rnn_train(x, h0, c0, P_ih, P_hh, b_ih, b_hh)           (y, h_n, c_n, saved)
//   dst_sparse_rnn_backward(dy, dh_n, dc_n, ..., y, saved)            (dx, dh0, dc0, dP_ih,
//                                                                     dP_hh, db_ih, db_hh)
//
// Inside, every activation is feature-major: x^T [I, T * B], the gate pre-activations of all
// steps [G * H, T * B], the hidden states h^T [H, T * B], a step's gates [S, B]. A product
// with a CSR matrix is then one axpy of a contiguous row of B (or T * B) values per kept
// weight, vectorised over the batch (csr_rows_product), with no packing; the pointwise gates
// run over contiguous [H, B] blocks. The input projection of all the steps is one product
// with P_ih; each step adds the recurrent product of h^T with P_hh and runs the gates. The
// training ops take the dense masked matrices and multiply each through its CSR below the
// density crossover of its product's shape (sparse_crossover), through ATen's GEMM above it.
// The backward walks the steps in reverse: a step's gate gradients, then dh of the step
// before through the CSR of P_hh^T (built once per call); after the walk dX is one product
// with P_ih^T, and dP_ih, dP_hh are one GEMM each over all the steps (dense, as the estimator
// needs them), the bias gradients one sum each.
//
// `saved` (1-D) holds the gates of every step, [T, S, B] with S = 6H for the LSTM (i f g o
// activated, c, tanh c) and 4H for the GRU (r z n activated, W_hn h + b_hn), then h^T [H, T * B].
// Each output element is one thread's sum in a fixed order: deterministic for any thread
// count on the sparse path.
namespace {

enum class Cell { kLstm, kGru };

Cell cell_of(const char* op, c10::string_view mode) {
  if (mode == "lstm") {
    return Cell::kLstm;
  }
  TORCH_CHECK(mode == "gru", op, ": mode must be 'lstm' or 'gru', got '", std::string(mode), "'");
  return Cell::kGru;
}

int64_t gates_of(Cell cell) { return cell == Cell::kLstm ? 4 : 3; }
int64_t saved_of(Cell cell) { return cell == Cell::kLstm ? 6 : 4; }

constexpr int64_t kRowBlock = 256;

// One source of a row product: the kept weights p0 .. p1 (columns col, values val) of a row
// over the rows of x (row stride ldx).
template <typename scalar_t>
struct RowSource {
  const scalar_t* x = nullptr;
  int64_t ldx = 0;
  const int32_t* col = nullptr;
  const scalar_t* val = nullptr;
  int64_t p0 = 0, p1 = 0;
};

// The start of every output of a row product: init's value (plus b where b is not 0: an added
// zero would turn a -0 into +0), or b without init.
template <typename scalar_t>
inline __attribute__((always_inline)) scalar_t row_start(const scalar_t* init, int64_t j,
                                                         scalar_t b) {
  return init == nullptr ? b : (b != scalar_t(0) ? init[j] + b : init[j]);
}

// N vectors of outputs at offsets off[0 .. N - 1] of one row through the kept weights of a,
// then those of c, all N accumulating together (N independent chains per weight); every
// accumulator reads init before any is stored, so offsets may overlap and init may be y.
template <int N, typename scalar_t>
inline __attribute__((always_inline)) void csr_vectors(RowSource<scalar_t> a, RowSource<scalar_t> c,
                                                       const scalar_t* init, scalar_t b,
                                                       const int64_t* off, scalar_t* y) {
  // (V from VecOf here, not a template argument: that would drop its 4-byte alignment.)
  using V = typename VecOf<scalar_t, full_lanes<scalar_t>()>::type;
  V acc[N];
  for (int q = 0; q < N; ++q) {
    if (init == nullptr) {
      acc[q] = V{} + b;
    } else {
      acc[q] = *reinterpret_cast<const V*>(init + off[q]);
      if (b != scalar_t(0)) {
        acc[q] += b;
      }
    }
  }
  for (const RowSource<scalar_t>& s : {a, c}) {
    const scalar_t* __restrict__ x = s.x;
    const int32_t* __restrict__ col = s.col;
    const scalar_t* __restrict__ val = s.val;
    for (int64_t p = s.p0; p < s.p1; ++p) {
      const scalar_t v = val[p];
      const scalar_t* xr = x + static_cast<int64_t>(col[p]) * s.ldx;
      for (int q = 0; q < N; ++q) {
        acc[q] += v * *reinterpret_cast<const V*>(xr + off[q]);
      }
    }
  }
  for (int q = 0; q < N; ++q) {
    *reinterpret_cast<V*>(y + off[q]) = acc[q];
  }
}

// y[j0 : j0 + m] of one output row = init's values (plus b, see row_start; b alone without
// init) + sum over the kept (k, v) of a's row of v * a.x[k, j0 : j0 + m], then the same over
// c's row: up to 8 vectors of accumulators at a time over both rows' kept weights; a ragged
// end of a row longer than a vector is one more whole vector, its last L outputs (the overlap
// gets the same values, in the same group as the vector it overlaps), and a row shorter than
// a vector is scalar. Every element sums in the rows' order with separate multiplies and
// adds: the same in every variant and for any grouping, and the same as a's product stored
// and then read back as c's init.
template <typename scalar_t>
inline __attribute__((always_inline)) void csr_row_pair_impl(RowSource<scalar_t> a,
                                                             RowSource<scalar_t> c,
                                                             const scalar_t* init, scalar_t b,
                                                             int64_t m, scalar_t* y) {
  constexpr int L = full_lanes<scalar_t>();
  constexpr int kGroup = 8;
  if (m < L) {
    for (int64_t j = 0; j < m; ++j) {
      scalar_t a0 = row_start(init, j, b);
      for (const RowSource<scalar_t>& s : {a, c}) {
        for (int64_t p = s.p0; p < s.p1; ++p) {
          a0 += s.val[p] * s.x[static_cast<int64_t>(s.col[p]) * s.ldx + j];
        }
      }
      y[j] = a0;
    }
    return;
  }
  const int64_t whole = m / L;
  const int64_t vectors = whole + (whole * L != m ? 1 : 0);
  // Groups from the end: the last holds the ragged vector and the one it overlaps.
  int64_t end = vectors;
  while (end > 0) {
    const int64_t begin = std::max<int64_t>(0, end - kGroup);
    int64_t off[kGroup];
    for (int64_t v = begin; v < end; ++v) {
      off[v - begin] = v < whole ? v * L : m - L;
    }
    switch (end - begin) {
#define DST_CSR_GROUP(n)                             \
  case n:                                            \
    csr_vectors<n, scalar_t>(a, c, init, b, off, y); \
    break;
      DST_CSR_GROUP(1)
      DST_CSR_GROUP(2)
      DST_CSR_GROUP(3)
      DST_CSR_GROUP(4)
      DST_CSR_GROUP(5)
      DST_CSR_GROUP(6)
      DST_CSR_GROUP(7)
      DST_CSR_GROUP(8)
#undef DST_CSR_GROUP
      default:
        break;
    }
    end = begin;
  }
}
DST_CPU_MULTIVERSION(csr_row_pair, csr_row_pair_impl)

// One source: y[r, j0 : j0 + m] = bias[r] (or, with add, y's own values) + sum over the kept
// (c, v) of row r of v * x[c, j0 : j0 + m] (see csr_row_pair).
template <typename scalar_t>
inline void csr_row_block(const scalar_t* x, int64_t ldx, const int32_t* col, const scalar_t* val,
                          int64_t p0, int64_t p1, scalar_t b, bool add, int64_t m, scalar_t* y) {
  csr_row_pair(RowSource<scalar_t>{x, ldx, col, val, p0, p1}, RowSource<scalar_t>{},
               add ? static_cast<const scalar_t*>(y) : nullptr, add ? scalar_t(0) : b, m, y);
}

// Prefetches the first m values of the rows of x (row stride ldx) that the kept weights
// p0 .. p1 read.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* x, int64_t ldx, const int32_t* col, int64_t p0,
                          int64_t p1, int64_t m) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t p = p0; p < p1; ++p) {
    const scalar_t* xr = x + static_cast<int64_t>(col[p]) * ldx;
    for (int64_t o = 0; o < m; o += kLine) {
      __builtin_prefetch(xr + o, 0, 3);
    }
  }
}

// y = A x (+ bias) for A [rows, k] in CSR and x [k, n] (row stride ldx), y [rows, n] (ldy):
// parallel over (row, block of kRowBlock columns).
template <typename scalar_t>
void csr_rows_product(const Compressed& a, int64_t rows, const scalar_t* x, int64_t ldx, int64_t n,
                      const scalar_t* bias, bool add, scalar_t* y, int64_t ldy) {
  if (rows == 0 || n == 0) {
    return;
  }
  const int32_t* crow = a.crow.const_data_ptr<int32_t>();
  const int32_t* col = a.col.const_data_ptr<int32_t>();
  const scalar_t* val = a.val.const_data_ptr<scalar_t>();
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t per_item =
      (a.col.numel() / rows + 1) * std::min<int64_t>(n, kRowBlock) + std::min<int64_t>(n, 64);
  at::parallel_for(0, rows * blocks, std::max<int64_t>(1, kGrainWork / per_item),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t it = begin; it < end; ++it) {
                       const int64_t r = it / blocks;
                       const int64_t j0 = (it % blocks) * kRowBlock;
                       csr_row_block(x + j0, ldx, col, val, static_cast<int64_t>(crow[r]),
                                     static_cast<int64_t>(crow[r + 1]),
                                     bias != nullptr ? bias[r] : scalar_t(0), add,
                                     std::min<int64_t>(kRowBlock, n - j0), y + r * ldy + j0);
                     }
                   });
}

// y = A x (+ bias) over n columns of x ([in, n], row stride ldx) into y ([out, n], row
// stride ldy): the CSR of A, or A dense through ATen's GEMM.
template <typename scalar_t>
struct Product {
  Compressed c;
  Tensor dense;  // A itself (possibly a transposed view), defined on the dense path
  int64_t out = 0;
  int64_t in = 0;

  // With add, y += A x (bias must be null).
  void operator()(const scalar_t* x, int64_t ldx, int64_t n, const scalar_t* bias, scalar_t* y,
                  int64_t ldy, const at::TensorOptions& opt, bool add = false) const {
    if (out == 0 || n == 0) {
      return;
    }
    if (add && dense.defined()) {
      if (in > 0) {
        const Tensor xt = at::from_blob(const_cast<scalar_t*>(x), {in, n}, {ldx, 1}, opt);
        Tensor yt = at::from_blob(y, {out, n}, {ldy, 1}, opt);
        yt.addmm_(dense, xt);
      }
      return;
    }
    if (dense.defined() && in > 0) {
      const Tensor xt = at::from_blob(const_cast<scalar_t*>(x), {in, n}, {ldx, 1}, opt);
      Tensor yt = at::from_blob(y, {out, n}, {ldy, 1}, opt);
      if (bias != nullptr) {
        const Tensor b = at::from_blob(const_cast<scalar_t*>(bias), {out, 1}, opt);
        yt.copy_(at::addmm(b, dense, xt));
      } else if (ldy == n) {
        at::mm_out(yt, dense, xt);
      } else {
        yt.copy_(at::mm(dense, xt));
      }
      return;
    }
    if (dense.defined()) {  // no input features: the bias alone
      Tensor yt = at::from_blob(y, {out, n}, {ldy, 1}, opt);
      if (bias != nullptr) {
        yt.copy_(at::from_blob(const_cast<scalar_t*>(bias), {out, 1}, opt).expand({out, n}));
      } else {
        yt.zero_();
      }
      return;
    }
    if (add && c.col.numel() == 0) {
      return;
    }
    csr_rows_product<scalar_t>(c, out, x, ldx, n, bias, add, y, ldy);
  }
};

// The entries with |p| > 0 of every row of P into counts; returns their total.
template <typename scalar_t>
int64_t nonzeros_of(const Tensor& p, int64_t* counts) {
  const int64_t rows = p.size(0);
  const int64_t cols = p.numel() / std::max<int64_t>(rows, 1);
  const scalar_t* pp = p.const_data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t r = b; r < e; ++r) {
                       counts[r] = count_row(pp + r * cols, scalar_t(0), cols);
                     }
                   });
  int64_t kept = 0;
  for (int64_t r = 0; r < rows; ++r) {
    kept += counts[r];
  }
  return kept;
}

// The product with P ([rows, cols], contiguous) or, with transpose, with P^T, over `tokens`
// columns of input: the CSR of P's nonzeros below the crossover, else P dense.
template <typename scalar_t>
Product<scalar_t> product_of(const Tensor& p, int64_t tokens, bool transpose) {
  const int64_t rows = p.size(0);
  const int64_t cols = p.size(1);
  Product<scalar_t> prod;
  prod.out = transpose ? cols : rows;
  prod.in = transpose ? rows : cols;
  std::vector<int64_t> counts(rows);
  const int64_t kept = nonzeros_of<scalar_t>(p, counts.data());
  if (!take_sparse(kept, tokens, prod.in, prod.out)) {
    prod.dense = transpose ? p.t() : p;
    return prod;
  }
  std::vector<scalar_t> zero(rows, scalar_t(0));
  prod.c = csr_from_counts<scalar_t>(p, zero.data(), counts.data());
  if (transpose) {
    prod.c = transposed<scalar_t>(prod.c, rows, cols);
  }
  return prod;
}

template <typename scalar_t>
Product<scalar_t> product_of_csr(const Tensor& crow, const Tensor& col, const Tensor& val,
                                 int64_t in) {
  Product<scalar_t> prod;
  prod.c = {crow, col, val};
  prod.out = crow.numel() - 1;
  prod.in = in;
  return prod;
}

struct RnnShape {
  Cell cell;
  int64_t steps, batch, in, hidden;
  int64_t gates() const { return gates_of(cell) * hidden; }
  int64_t saved_rows() const { return saved_of(cell) * hidden; }
  int64_t saved_numel() const { return steps * batch * (saved_rows() + hidden); }
};

#ifdef DST_AVX512_COMPRESS
// Rows [r0, r1) of a CSR matrix as sliced ELL: slices of 16 consecutive rows, entry (k, lane)
// of a slice the k-th kept weight of its row (padding entries are never read: masked).
struct Sell16 {
  int64_t rows = 0;
  std::vector<int32_t> len;    // [slices * 16] the rows' kept counts (0 past r1)
  std::vector<int32_t> depth;  // [slices] the slice's longest row
  std::vector<int64_t> off;    // [slices] the slice's first entry
  std::vector<int32_t> col;    // [entries]
  std::vector<float> val;      // [entries]
};

Sell16 sell16_of(const int32_t* crow, const int32_t* col, const float* val, int64_t r0,
                 int64_t r1) {
  Sell16 a;
  a.rows = r1 - r0;
  const int64_t slices = (a.rows + 15) / 16;
  a.len.assign(slices * 16, 0);
  a.depth.assign(slices, 0);
  a.off.assign(slices, 0);
  int64_t entries = 0;
  for (int64_t sl = 0; sl < slices; ++sl) {
    int32_t d = 0;
    for (int64_t i = 0; i < 16 && sl * 16 + i < a.rows; ++i) {
      const int64_t r = r0 + sl * 16 + i;
      a.len[sl * 16 + i] = crow[r + 1] - crow[r];
      d = std::max(d, a.len[sl * 16 + i]);
    }
    a.depth[sl] = d;
    a.off[sl] = entries;
    entries += int64_t(d) * 16;
  }
  a.col.assign(entries, 0);
  a.val.assign(entries, 0.0f);
  for (int64_t sl = 0; sl < slices; ++sl) {
    for (int64_t i = 0; i < 16 && sl * 16 + i < a.rows; ++i) {
      const int64_t r = r0 + sl * 16 + i;
      for (int32_t k = 0; k < crow[r + 1] - crow[r]; ++k) {
        a.col[a.off[sl] + k * 16 + i] = col[crow[r] + k];
        a.val[a.off[sl] + k * 16 + i] = val[crow[r] + k];
      }
    }
  }
  return a;
}

// y[i] = (add ? y[i] : init[i], or 0 without init) + sum over the slice rows' i-th row's kept
// weights of val * h[col], in the row's order with a separate multiply and add: the same sums
// as the scalar dot product, 16 rows at a time (gathered h values, masked past each row's end).
__attribute__((target("avx512f"))) void sell16_product(const Sell16& a, const float* h,
                                                       const float* init, bool add, float* y) {
  const int64_t slices = static_cast<int64_t>(a.depth.size());
  for (int64_t sl = 0; sl < slices; ++sl) {
    const int64_t i0 = sl * 16;
    const int64_t lanes = std::min<int64_t>(16, a.rows - i0);
    const __mmask16 live = static_cast<__mmask16>((1u << lanes) - 1u);
    const float* start = add ? y : init;
    __m512 acc = start != nullptr ? _mm512_maskz_loadu_ps(live, start + i0) : _mm512_setzero_ps();
    const __m512i len = _mm512_loadu_si512(a.len.data() + i0);
    const int32_t* cp = a.col.data() + a.off[sl];
    const float* vp = a.val.data() + a.off[sl];
    for (int32_t k = 0; k < a.depth[sl]; ++k) {
      const __mmask16 m = _mm512_cmpgt_epi32_mask(len, _mm512_set1_epi32(k));
      const __m512i c = _mm512_maskz_loadu_epi32(m, cp + k * 16);
      const __m512 hv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, h, 4);
      const __m512 prod = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, vp + k * 16), hv);
      acc = _mm512_mask_add_ps(acc, m, acc, prod);
    }
    _mm512_mask_storeu_ps(y + i0, live, acc);
  }
}
#endif

// The threads of a walk over the steps (one parallel region, a barrier per step): one when a
// step is only a few thousand multiply-adds (batch 1), where the barrier costs more than the
// split saves; `kept` is the kept weights a step multiplies, the cells count 16 per gate row.
// The results do not depend on it (every output is one thread's sum in a fixed order).
constexpr int64_t kWalkParallelWork = 65536;
int walk_threads(const RnnShape& s, int64_t kept) {
  const int64_t work = (kept + 16 * s.gates()) * s.batch;
  if (work < kWalkParallelWork) {
    return 1;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s.hidden)));
}

// The input checks shared by the three ops; returns the shape.
RnnShape check_rnn(const char* op, Cell cell, const Tensor& x, const Tensor& h0,
                   const std::optional<Tensor>& c0, int64_t ih_rows, int64_t ih_cols,
                   int64_t hh_rows, int64_t hh_cols, at::ScalarType dtype,
                   const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be [steps, batch, input_size], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  const int64_t g = gates_of(cell);
  TORCH_CHECK(hh_rows % g == 0 && hh_rows / g == hh_cols, op, ": the recurrent weight must be [", g,
              " * hidden_size, hidden_size], got [", hh_rows, ", ", hh_cols, "]");
  const RnnShape s{cell, x.size(0), x.size(1), x.size(2), hh_cols};
  TORCH_CHECK(ih_rows == s.gates() && ih_cols == s.in, op, ": the input weight must be [",
              s.gates(), ", ", s.in, "] for x of shape ", x.sizes(), " and hidden_size ", s.hidden,
              ", got [", ih_rows, ", ", ih_cols, "]");
  TORCH_CHECK(dtype == x.scalar_type(), op, ": the weights have dtype ", dtype, " but x has ",
              x.scalar_type());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == s.batch && h0.size(1) == s.hidden, op,
              ": h0 must be [", s.batch, ", ", s.hidden, "], got shape ", h0.sizes());
  TORCH_CHECK(h0.scalar_type() == x.scalar_type() && h0.device().is_cpu(), op,
              ": h0 must have x's dtype and device");
  if (cell == Cell::kLstm) {
    TORCH_CHECK(c0.has_value() && c0->defined(), op, ": the LSTM needs c0");
    TORCH_CHECK(
        c0->sizes() == h0.sizes() && c0->scalar_type() == x.scalar_type() && c0->device().is_cpu(),
        op, ": c0 must be [", s.batch, ", ", s.hidden, "] with x's dtype and device, got ",
        c0->sizes(), " ", c0->scalar_type());
  }
  for (const auto* b : {&b_ih, &b_hh}) {
    if (b->has_value() && (*b)->defined()) {
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == s.gates() &&
                      (*b)->scalar_type() == x.scalar_type() && (*b)->device().is_cpu(),
                  op, ": the biases must be [", s.gates(), "] with x's dtype and device, got ",
                  (*b)->sizes(), " ", (*b)->scalar_type());
    }
  }
  return s;
}

void check_weight(const char* op, const char* name, const Tensor& w) {
  TORCH_CHECK(w.dim() == 2, op, ": ", name, " must be 2-D, got shape ", w.sizes());
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", w.device());
}

std::optional<Tensor> contiguous_or_none(const std::optional<Tensor>& t) {
  if (t.has_value() && t->defined()) {
    return t->contiguous();
  }
  return std::nullopt;
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

// ----------------------------------------------------------------------------- the cells

// The cells contract a * b + c into fused multiply-adds where the variant has them (AVX2,
// AVX-512): the exp polynomial is most of a cell's work.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
// exp over 16 floats (Cephes' expf: 2^n times a degree-7 polynomial of the remainder, about 1
// ulp); NaN stays NaN. Inputs are clamped to [-80, 80], where the gates saturate anyway.
inline __attribute__((always_inline)) vf16 exp16(vf16 x) {
  typedef int32_t vi16 __attribute__((vector_size(64)));
  const vf16 lo = vf16{} - 80.0f, hi = vf16{} + 80.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf16 magic = vf16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf16 n = (x * 1.44269504088896341f + magic) - magic;
  const vf16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vf16 p = vf16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  vf16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Loads / stores of m <= 16 floats (a whole vector when m is 16).
inline __attribute__((always_inline)) vf16 load16(const float* p, int64_t m) {
  if (m == 16) {
    return *reinterpret_cast<const vf16*>(p);
  }
  vf16 v = {};
  for (int64_t k = 0; k < m; ++k) {
    v[k] = p[k];
  }
  return v;
}
inline __attribute__((always_inline)) void store16(float* p, vf16 v, int64_t m) {
  if (m == 16) {
    *reinterpret_cast<vf16*>(p) = v;
    return;
  }
  for (int64_t k = 0; k < m; ++k) {
    p[k] = v[k];
  }
}

// Runs a cell kernel over B images in vectors of 16: `compute(b, m)` reads images b .. b + m - 1
// and returns N vectors, `store(b, out, m)` writes them. A ragged end is one more whole vector,
// the last 16 images (overlapping the one before, with the same values), computed before any
// vector is stored, since the kernels update their inputs in place; partial vectors (a
// load through the stack that stalls store forwarding) only when B < 16.
template <int N, typename Compute, typename Store>
inline __attribute__((always_inline)) void over_vectors16(int64_t B, const Compute& compute,
                                                          const Store& store) {
  if (B < 16) {
    if (B > 0) {
      const std::array<vf16, N> out = compute(int64_t{0}, B);
      store(int64_t{0}, out, B);
    }
    return;
  }
  const int64_t whole = B / 16 * 16;
  std::array<vf16, N> last{};
  if (whole != B) {
    last = compute(B - 16, int64_t{16});
  }
  for (int64_t b = 0; b < whole; b += 16) {
    const std::array<vf16, N> out = compute(b, int64_t{16});
    store(b, out, int64_t{16});
  }
  if (whole != B) {
    store(B - 16, last, int64_t{16});
  }
}

inline __attribute__((always_inline)) vf16 sigmoid16(vf16 x) { return 1.0f / (1.0f + exp16(-x)); }
inline __attribute__((always_inline)) vf16 tanh16(vf16 x) {
  return 2.0f / (1.0f + exp16(-2.0f * x)) - 1.0f;
}

// A cell's inputs for images b .. b + m - 1: its four gate rows of `o` (rows 0, hb, 2 hb, 3 hb)
// into v[0..3] and its state row into v[4].
inline __attribute__((always_inline)) void load_unit16(const float* o, int64_t hb,
                                                       const float* state, int64_t b, int64_t m,
                                                       vf16* v) {
  for (int q = 0; q < 4; ++q) {
    v[q] = load16(o + q * hb + b, m);
  }
  v[4] = load16(state + b, m);
}

template <typename scalar_t>
inline scalar_t sigmoid1(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-x));
}

// One unit of the LSTM for B images: `o` holds its pre-activations at rows 0, hb, 2 hb, 3 hb
// (i f g o), overwritten with the activations, c at 4 hb and tanh c at 5 hb; h gets o tanh c.
template <typename scalar_t>
inline __attribute__((always_inline)) void lstm_unit_impl(scalar_t* __restrict__ o, int64_t hb,
                                                          const scalar_t* __restrict__ cp,
                                                          scalar_t* __restrict__ h, int64_t B) {
  int64_t b = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    over_vectors16<7>(
        B,
        [&](int64_t b, int64_t m) __attribute__((always_inline)) {
          vf16 v[5];
          load_unit16(o, hb, cp, b, m, v);
          const vf16 i = sigmoid16(v[0]), f = sigmoid16(v[1]), g = tanh16(v[2]);
          const vf16 og = sigmoid16(v[3]);
          const vf16 c = f * v[4] + i * g;
          const vf16 tc = tanh16(c);
          return std::array<vf16, 7>{i, f, g, og, c, tc, og * tc};
        },
        [&](int64_t b, const std::array<vf16, 7>& out, int64_t m) __attribute__((always_inline)) {
          for (int q = 0; q < 6; ++q) {
            store16(o + q * hb + b, out[q], m);
          }
          store16(h + b, out[6], m);
        });
    return;
  }
  for (; b < B; ++b) {
    const scalar_t i = sigmoid1(o[b]), f = sigmoid1(o[hb + b]), g = std::tanh(o[2 * hb + b]);
    const scalar_t og = sigmoid1(o[3 * hb + b]);
    const scalar_t c = f * cp[b] + i * g;
    const scalar_t tc = std::tanh(c);
    o[b] = i;
    o[hb + b] = f;
    o[2 * hb + b] = g;
    o[3 * hb + b] = og;
    o[4 * hb + b] = c;
    o[5 * hb + b] = tc;
    h[b] = og * tc;
  }
}
DST_CPU_MULTIVERSION(lstm_unit, lstm_unit_impl)

// One unit of the GRU: `o` holds r, z pre-activations (rows 0, hb), the input part of n (2 hb)
// and W_hn h + b_hn (3 hb); r, z, n are overwritten with their activations; h gets
// n + z (h_prev - n).
template <typename scalar_t>
inline __attribute__((always_inline)) void gru_unit_impl(scalar_t* __restrict__ o, int64_t hb,
                                                         const scalar_t* __restrict__ hp,
                                                         scalar_t* __restrict__ h, int64_t B) {
  int64_t b = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    over_vectors16<4>(
        B,
        [&](int64_t b, int64_t m) __attribute__((always_inline)) {
          vf16 v[5];
          load_unit16(o, hb, hp, b, m, v);
          const vf16 r = sigmoid16(v[0]), z = sigmoid16(v[1]);
          const vf16 n = tanh16(v[2] + r * v[3]);
          return std::array<vf16, 4>{r, z, n, n + z * (v[4] - n)};
        },
        [&](int64_t b, const std::array<vf16, 4>& out, int64_t m) __attribute__((always_inline)) {
          for (int q = 0; q < 3; ++q) {
            store16(o + q * hb + b, out[q], m);
          }
          store16(h + b, out[3], m);
        });
    return;
  }
  for (; b < B; ++b) {
    const scalar_t r = sigmoid1(o[b]), z = sigmoid1(o[hb + b]);
    const scalar_t n = std::tanh(o[2 * hb + b] + r * o[3 * hb + b]);
    o[b] = r;
    o[hb + b] = z;
    o[2 * hb + b] = n;
    h[b] = n + z * (hp[b] - n);
  }
}
DST_CPU_MULTIVERSION(gru_unit, gru_unit_impl)

// The LSTM's gate gradients of one unit for image b (d: rows 0, ldd, 2 ldd, 3 ldd), dc carried
// to the step before in place.
template <typename scalar_t>
inline __attribute__((always_inline)) void lstm_grad_one(const scalar_t* __restrict__ o, int64_t hb,
                                                         const scalar_t* __restrict__ cp,
                                                         scalar_t dhj, scalar_t* __restrict__ dc,
                                                         scalar_t* __restrict__ d, int64_t ldd,
                                                         int64_t b) {
  const scalar_t i = o[b], f = o[hb + b], g = o[2 * hb + b], og = o[3 * hb + b];
  const scalar_t tc = o[5 * hb + b];
  const scalar_t dcj = dc[b] + dhj * og * (scalar_t(1) - tc * tc);
  d[b] = dcj * g * i * (scalar_t(1) - i);
  d[ldd + b] = dcj * cp[b] * f * (scalar_t(1) - f);
  d[2 * ldd + b] = dcj * i * (scalar_t(1) - g * g);
  d[3 * ldd + b] = dhj * tc * og * (scalar_t(1) - og);
  dc[b] = dcj * f;
}

// The same for B images: two loops, with and without dy, so that each vectorises (no
// conditional load).
template <typename scalar_t>
inline __attribute__((always_inline)) void lstm_unit_grad_impl(
    const scalar_t* __restrict__ o, int64_t hb, const scalar_t* __restrict__ cp,
    const scalar_t* __restrict__ dh, const scalar_t* __restrict__ gy, scalar_t* __restrict__ dc,
    scalar_t* __restrict__ d, int64_t ldd, int64_t B) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    over_vectors16<5>(
        B,
        [&](int64_t b, int64_t m) __attribute__((always_inline)) {
          const vf16 dhj = load16(dh + b, m) + (gy != nullptr ? load16(gy + b, m) : vf16{});
          const vf16 i = load16(o + b, m), f = load16(o + hb + b, m);
          const vf16 g = load16(o + 2 * hb + b, m), og = load16(o + 3 * hb + b, m);
          const vf16 tc = load16(o + 5 * hb + b, m);
          const vf16 dcj = load16(dc + b, m) + dhj * og * (1.0f - tc * tc);
          return std::array<vf16, 5>{
              dcj * g * i * (1.0f - i), dcj * load16(cp + b, m) * f * (1.0f - f),
              dcj * i * (1.0f - g * g), dhj * tc * og * (1.0f - og), dcj * f};
        },
        [&](int64_t b, const std::array<vf16, 5>& out, int64_t m) __attribute__((always_inline)) {
          for (int q = 0; q < 4; ++q) {
            store16(d + q * ldd + b, out[q], m);
          }
          store16(dc + b, out[4], m);
        });
    return;
  }
  if (gy != nullptr) {
    for (int64_t b = 0; b < B; ++b) {
      lstm_grad_one(o, hb, cp, dh[b] + gy[b], dc, d, ldd, b);
    }
  } else {
    for (int64_t b = 0; b < B; ++b) {
      lstm_grad_one(o, hb, cp, dh[b], dc, d, ldd, b);
    }
  }
}
DST_CPU_MULTIVERSION(lstm_unit_grad, lstm_unit_grad_impl)

template <typename scalar_t>
inline __attribute__((always_inline)) void gru_grad_one(const scalar_t* __restrict__ o, int64_t hb,
                                                        const scalar_t* __restrict__ hp,
                                                        scalar_t dhj, scalar_t* __restrict__ di,
                                                        scalar_t* __restrict__ dr, int64_t ldd,
                                                        scalar_t* __restrict__ dd, int64_t b) {
  const scalar_t r = o[b], z = o[hb + b], n = o[2 * hb + b], hn = o[3 * hb + b];
  const scalar_t dnp = dhj * (scalar_t(1) - z) * (scalar_t(1) - n * n);
  const scalar_t drp = dnp * hn * r * (scalar_t(1) - r);
  const scalar_t dzp = dhj * (hp[b] - n) * z * (scalar_t(1) - z);
  di[b] = drp;
  di[ldd + b] = dzp;
  di[2 * ldd + b] = dnp;
  dr[b] = drp;
  dr[ldd + b] = dzp;
  dr[2 * ldd + b] = dnp * r;
  dd[b] = dhj * z;
}

// The GRU's: the input-side gate gradients di, the recurrent-side dr (r z n rows at ldd), and
// dh's direct part z dh into dd.
template <typename scalar_t>
inline __attribute__((always_inline)) void gru_unit_grad_impl(
    const scalar_t* __restrict__ o, int64_t hb, const scalar_t* __restrict__ hp,
    const scalar_t* __restrict__ dh, const scalar_t* __restrict__ gy, scalar_t* __restrict__ di,
    scalar_t* __restrict__ dr, int64_t ldd, scalar_t* __restrict__ dd, int64_t B) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    over_vectors16<5>(
        B,
        [&](int64_t b, int64_t m) __attribute__((always_inline)) {
          const vf16 dhj = load16(dh + b, m) + (gy != nullptr ? load16(gy + b, m) : vf16{});
          const vf16 r = load16(o + b, m), z = load16(o + hb + b, m);
          const vf16 n = load16(o + 2 * hb + b, m), hn = load16(o + 3 * hb + b, m);
          const vf16 dnp = dhj * (1.0f - z) * (1.0f - n * n);
          const vf16 drp = dnp * hn * r * (1.0f - r);
          const vf16 dzp = dhj * (load16(hp + b, m) - n) * z * (1.0f - z);
          return std::array<vf16, 5>{drp, dzp, dnp, dnp * r, dhj * z};
        },
        [&](int64_t b, const std::array<vf16, 5>& out, int64_t m) __attribute__((always_inline)) {
          for (int q = 0; q < 3; ++q) {
            store16(di + q * ldd + b, out[q], m);
          }
          store16(dr + b, out[0], m);
          store16(dr + ldd + b, out[1], m);
          store16(dr + 2 * ldd + b, out[3], m);
          store16(dd + b, out[4], m);
        });
    return;
  }
  if (gy != nullptr) {
    for (int64_t b = 0; b < B; ++b) {
      gru_grad_one(o, hb, hp, dh[b] + gy[b], di, dr, ldd, dd, b);
    }
  } else {
    for (int64_t b = 0; b < B; ++b) {
      gru_grad_one(o, hb, hp, dh[b], di, dr, ldd, dd, b);
    }
  }
}
DST_CPU_MULTIVERSION(gru_unit_grad, gru_unit_grad_impl)
#pragma GCC pop_options

// f(j) for every unit j of a [units, B] block, in parallel over units.
template <typename F>
void over_units(int64_t units, int64_t batch, const F& f) {
  at::parallel_for(0, units, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(batch, 1)),
                   [&](int64_t j0, int64_t j1) {
                     for (int64_t j = j0; j < j1; ++j) {
                       f(j);
                     }
                   });
}

// One 32 x 32 tile (or the part of it inside the matrix) of a [rows, cols] -> [cols, rows]
// transpose, element by element.
template <typename T>
void transpose_tile(const T* src, T* dst, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                    int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    T* d = dst + c * rows;
    for (int64_t r = r0; r < r1; ++r) {
      d[r] = src[r * cols + c];
    }
  }
}

#ifdef DST_AVX512_COMPRESS
// The same for 4-byte elements, whole 16 x 16 blocks through registers.
__attribute__((target("avx512f"))) void transpose_tile_avx512(const float* src, float* dst,
                                                              int64_t rows, int64_t cols,
                                                              int64_t r0, int64_t r1, int64_t c0,
                                                              int64_t c1) {
  const int64_t r16 = r0 + (r1 - r0) / 16 * 16, c16 = c0 + (c1 - c0) / 16 * 16;
  __m512 v[16];
  for (int64_t rb = r0; rb < r16; rb += 16) {
    for (int64_t cb = c0; cb < c16; cb += 16) {
      for (int i = 0; i < 16; ++i) {
        v[i] = _mm512_loadu_ps(src + (rb + i) * cols + cb);
      }
      transpose16(v);
      for (int i = 0; i < 16; ++i) {
        _mm512_storeu_ps(dst + (cb + i) * rows + rb, v[i]);
      }
    }
  }
  transpose_tile(src, dst, rows, cols, r16, r1, c0, c1);
  transpose_tile(src, dst, rows, cols, r0, r16, c16, c1);
}
#endif

// [rows, cols] row-major -> [cols, rows] row-major in 32 x 32 tiles, in parallel over the
// output's tile rows (ATen copies a transposed matrix on one thread: 1.4 ms for 256 x 2800).
template <typename T>
void transpose_tiles(const T* src, T* dst, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  const int64_t tiles = (cols + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (kTile * std::max<int64_t>(rows, 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kTile, c1 = std::min(cols, c0 + kTile);
      for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
        const int64_t r1 = std::min(rows, r0 + kTile);
#ifdef DST_AVX512_COMPRESS
        if constexpr (sizeof(T) == 4) {
          if (has_avx512()) {
            transpose_tile_avx512(reinterpret_cast<const float*>(src),
                                  reinterpret_cast<float*>(dst), rows, cols, r0, r1, c0, c1);
            continue;
          }
        }
#endif
        transpose_tile(src, dst, rows, cols, r0, r1, c0, c1);
      }
    }
  });
}

Tensor transposed_copy(const Tensor& a) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2);
  const Tensor src = a.contiguous();
  Tensor out = at::empty({a.size(1), a.size(0)}, a.options());
  const int64_t rows = a.size(0), cols = a.size(1);
  switch (a.element_size()) {
    case 2:
      transpose_tiles(static_cast<const uint16_t*>(src.const_data_ptr()),
                      static_cast<uint16_t*>(out.mutable_data_ptr()), rows, cols);
      break;
    case 4:
      transpose_tiles(static_cast<const uint32_t*>(src.const_data_ptr()),
                      static_cast<uint32_t*>(out.mutable_data_ptr()), rows, cols);
      break;
    case 8:
      transpose_tiles(static_cast<const uint64_t*>(src.const_data_ptr()),
                      static_cast<uint64_t*>(out.mutable_data_ptr()), rows, cols);
      break;
    default:
      out.copy_(src.t());
  }
  return out;
}

// The forward of one layer and direction. xt is x^T [I, T * B] contiguous; writes h^T [H, T * B]
// and, with `gates` non-null, every step's gates ([T, S, B]; else two step buffers).
// Returns (h_n, c_n) as [B, H].
template <typename scalar_t>
std::pair<Tensor, Tensor> rnn_forward(const RnnShape& s, const Tensor& xt, const Tensor& h0,
                                      const Tensor& c0, const Product<scalar_t>& ih,
                                      const Product<scalar_t>& hh, const scalar_t* b_ih,
                                      const scalar_t* b_hh, bool reverse, scalar_t* ht,
                                      scalar_t* gates) {
  const int64_t T = s.steps, B = s.batch, H = s.hidden, G = s.gates(), S = s.saved_rows();
  const int64_t TB = T * B;
  const auto opt = xt.options();
  const bool lstm = s.cell == Cell::kLstm;
  if (T == 0) {
    return {h0.clone(), lstm ? c0.clone() : at::empty({0}, opt)};
  }
  // The input projection of every step, with the biases that add outside the cell.
  Tensor bias;
  if (lstm && b_ih != nullptr && b_hh != nullptr) {
    bias = at::from_blob(const_cast<scalar_t*>(b_ih), {G}, opt) +
           at::from_blob(const_cast<scalar_t*>(b_hh), {G}, opt);
  } else if (b_ih != nullptr || (lstm && b_hh != nullptr)) {
    bias = at::from_blob(const_cast<scalar_t*>(b_ih != nullptr ? b_ih : b_hh), {G}, opt).clone();
  }
  const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  // Through the CSR each step multiplies its own x_t straight into its gates; dense, the input
  // projection of all the steps is one GEMM, step-major ([T, G, B]) so that a step reads a block.
  Tensor gx;
  if (ih.dense.defined()) {
    gx = at::empty({T, G, B}, opt);
    gx.copy_(at::matmul(ih.dense, xt.view({s.in, T, B}).transpose(0, 1)));
    if (bp != nullptr) {
      gx.add_(bias.view({1, G, 1}));
    }
  }
  Tensor gh = lstm ? Tensor() : at::empty({G, B}, opt);
  Tensor bufs;
  if (gates == nullptr) {
    bufs = at::empty({2, S, B}, opt);
  }
  const Tensor h0t = transposed_copy(h0);
  const Tensor c0t = lstm ? transposed_copy(c0) : Tensor();
  const scalar_t* h_prev = h0t.const_data_ptr<scalar_t>();
  int64_t ld_h = B;
  const scalar_t* c_prev = lstm ? c0t.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* sv = nullptr;
  if (!hh.dense.defined()) {
    // The recurrent product through the CSR: the whole walk in one parallel region, each thread
    // owning a range of units (their gate rows and their h, c), one barrier per step.
    const int32_t* hcrow = hh.c.crow.template const_data_ptr<int32_t>();
    const int32_t* hcol = hh.c.col.template const_data_ptr<int32_t>();
    const scalar_t* hval = hh.c.val.template const_data_ptr<scalar_t>();
    const bool ih_csr = !gx.defined();
    const int32_t* icrow = ih_csr ? ih.c.crow.template const_data_ptr<int32_t>() : nullptr;
    const int32_t* icol = ih_csr ? ih.c.col.template const_data_ptr<int32_t>() : nullptr;
    const scalar_t* ival = ih_csr ? ih.c.val.template const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xtp = xt.const_data_ptr<scalar_t>();
    const scalar_t* gxp = gx.defined() ? gx.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* bufp = bufs.defined() ? bufs.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t g = gates_of(s.cell);
    const int threads = walk_threads(s, hh.c.col.numel() + (ih_csr ? ih.c.col.numel() : 0));
    // One image: h in two contiguous buffers (a step reads one, its cells write the other),
    // and the input part of every step's gates (bias first, then the row's kept weights in
    // order, as the walk would add them) computed before the walk, vectorised over the steps.
    std::vector<scalar_t> h1(B == 1 ? 2 * H : 0);
    // (The steps padded to whole vectors: no scalar tail in the product.)
    const int64_t Tp = (T + 15) / 16 * 16;
    // (Computed [G, Tp], read step-major: [Tp, G], a step's input parts contiguous.)
    Tensor gx1t;
    const scalar_t* gx1p = nullptr;
    if (B == 1 && ih_csr) {
      Tensor gx1 = at::empty({G, Tp}, opt);
      scalar_t* gx1w = gx1.mutable_data_ptr<scalar_t>();
      Tensor xpad = at::zeros({s.in, Tp}, opt);
      xpad.narrow(1, 0, T).copy_(xt);
      const scalar_t* xpp = xpad.const_data_ptr<scalar_t>();
      // (On the walk's threads: waking a second one costs more than a small product.)
      const int64_t grain =
          threads == 1 ? G : std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, T * 4));
      at::parallel_for(0, G, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t extra = !lstm && r < 2 * H && b_hh != nullptr ? b_hh[r] : scalar_t(0);
          csr_row_block(xpp, Tp, icol, ival, static_cast<int64_t>(icrow[r]),
                        static_cast<int64_t>(icrow[r + 1]),
                        (bp != nullptr ? bp[r] : scalar_t(0)) + extra, false, Tp, gx1w + r * Tp);
        }
      });
      gx1t = transposed_copy(gx1);
      gx1p = gx1t.const_data_ptr<scalar_t>();
    }
    const auto block_of = [&](int64_t k, int64_t t) {
      return gates != nullptr ? gates + t * S * B : bufp + (k % 2) * S * B;
    };
#pragma omp parallel num_threads(threads)
    {
      const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t j0 = H * id / n, j1 = H * (id + 1) / n;
      const scalar_t* hp = h_prev;
      int64_t ldh = B;
      const scalar_t* cpv = c_prev;
#ifdef DST_AVX512_COMPRESS
      // One image, float: the recurrent products of the thread's rows of every gate as sliced
      // ELL, 16 rows a vector (no branch on a row's length).
      std::vector<Sell16> sells;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (B == 1 && has_avx512()) {
          for (int64_t q = 0; q < g; ++q) {
            sells.push_back(sell16_of(hcrow, hcol, hval, q * H + j0, q * H + j1));
          }
        }
      }
#endif
      for (int64_t k = 0; k < T; ++k) {
        const int64_t t = reverse ? T - 1 - k : k;
        scalar_t* blk = block_of(k, t);
        if (B == 1) {
          // One image: every row's input part, then the recurrent products (the GRU's W_hn h
          // + b_hn into its own row).
          for (int64_t q = 0; q < g; ++q) {
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t r = q * H + j;
              const scalar_t extra = !lstm && q < 2 && b_hh != nullptr ? b_hh[r] : scalar_t(0);
              blk[r] = ih_csr ? gx1p[t * G + r] : gxp[t * G + r] + extra;
            }
          }
          for (int64_t q = 0; q < g; ++q) {
            const bool to_row = lstm || q < 2;
#ifdef DST_AVX512_COMPRESS
            if constexpr (std::is_same_v<scalar_t, float>) {
              if (!sells.empty()) {
                sell16_product(sells[q], hp, b_hh != nullptr ? b_hh + q * H + j0 : nullptr, to_row,
                               blk + (to_row ? q : 3) * H + j0);
                continue;
              }
            }
#endif
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t r = q * H + j;
              scalar_t a = to_row ? blk[r] : (b_hh != nullptr ? b_hh[r] : scalar_t(0));
              for (int32_t p = hcrow[r]; p < hcrow[r + 1]; ++p) {
                a += hval[p] * hp[hcol[p]];
              }
              blk[to_row ? r : 3 * H + j] = a;
            }
          }
        } else {
          for (int64_t q = 0; q < g; ++q) {
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t r = q * H + j;
              // GRU: b_hr, b_hz add with the input part; W_hn h + b_hn goes to its own row.
              const scalar_t extra = !lstm && q < 2 && b_hh != nullptr ? b_hh[r] : scalar_t(0);
              scalar_t* row = blk + r * B;
              const bool to_row = lstm || q < 2;
              // (The x and h rows of a row two ahead on their way into the cache: the h rows
              // were written by every thread a step ago, the x rows long before.)
              if (j + 2 < j1) {
                if (ih_csr) {
                  prefetch_rows(xtp + t * B, TB, icol, icrow[r + 2], icrow[r + 3], B);
                }
                prefetch_rows(hp, ldh, hcol, hcrow[r + 2], hcrow[r + 3], B);
              }
              // The input part (through the CSR, or the projection's row) and, into the same
              // accumulators, the recurrent part: one pass over the row.
              using Src = RowSource<scalar_t>;
              const Src inp =
                  ih_csr ? Src{xtp + t * B, TB, icol, ival, icrow[r], icrow[r + 1]} : Src{};
              const Src rec{hp, ldh, hcol, hval, hcrow[r], hcrow[r + 1]};
              const scalar_t* init = ih_csr ? nullptr : gxp + (t * G + r) * B;
              const scalar_t start = (ih_csr && bp != nullptr ? bp[r] : scalar_t(0)) + extra;
              if (to_row) {
                csr_row_pair(inp, rec, init, start, B, row);
              } else {
                csr_row_pair(inp, Src{}, init, start, B, row);
                csr_row_pair(rec, Src{}, static_cast<const scalar_t*>(nullptr),
                             b_hh != nullptr ? b_hh[r] : scalar_t(0), B, blk + (3 * H + j) * B);
              }
            }
          }
        }
        scalar_t* hcur = ht + t * B;
        if (B == 1) {
          // One image: a step's block is [S] with the units contiguous, so the cells run
          // vectorised over the thread's units, into the h buffer the step does not read.
          scalar_t* hb1 = h1.data() + (k % 2) * H + j0;
          if (lstm) {
            lstm_unit(blk + j0, H, cpv + j0, hb1, j1 - j0);
          } else {
            gru_unit(blk + j0, H, hp + j0, hb1, j1 - j0);
          }
          for (int64_t j = j0; j < j1; ++j) {
            hcur[j * TB] = hb1[j - j0];
          }
        } else {
          for (int64_t j = j0; j < j1; ++j) {
            if (lstm) {
              lstm_unit(blk + j * B, H * B, cpv + j * B, hcur + j * TB, B);
            } else {
              gru_unit(blk + j * B, H * B, hp + j * ldh, hcur + j * TB, B);
            }
          }
        }
#pragma omp barrier
        hp = B == 1 ? h1.data() + (k % 2) * H : hcur;
        ldh = B == 1 ? 1 : TB;
        cpv = blk + 4 * H * B;
      }
    }
    sv = block_of(T - 1, reverse ? 0 : T - 1);
  } else {
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? T - 1 - k : k;
      sv = gates != nullptr ? gates + t * S * B
                            : bufs.mutable_data_ptr<scalar_t>() + (k % 2) * S * B;
      // The input part of the gates (rows [0, G) of the step's block).
      if (gx.defined()) {
        std::memcpy(sv, gx.const_data_ptr<scalar_t>() + t * G * B, sizeof(scalar_t) * G * B);
      } else {
        ih(xt.const_data_ptr<scalar_t>() + t * B, TB, B, bp, sv, B, opt);
      }
      scalar_t* hcur = ht + t * B;  // [H, B] with row stride T * B
      if (lstm) {
        hh(h_prev, ld_h, B, nullptr, sv, B, opt, true);
        over_units(H, B, [&](int64_t j) {
          lstm_unit(sv + j * B, H * B, c_prev + j * B, hcur + j * TB, B);
        });
        c_prev = sv + 4 * H * B;
      } else {
        scalar_t* ghp = gh.mutable_data_ptr<scalar_t>();
        hh(h_prev, ld_h, B, b_hh, ghp, B, opt);
        over_units(H, B, [&](int64_t j) {
          const int64_t hb = H * B;
          for (int64_t q = 0; q < 2; ++q) {
            const scalar_t* g = ghp + (q * H + j) * B;
            scalar_t* o = sv + q * hb + j * B;
            for (int64_t b = 0; b < B; ++b) {
              o[b] += g[b];
            }
          }
          const scalar_t* g = ghp + (2 * H + j) * B;
          scalar_t* o = sv + 3 * hb + j * B;
          for (int64_t b = 0; b < B; ++b) {
            o[b] = g[b];
          }
        });
        over_units(H, B, [&](int64_t j) {
          gru_unit(sv + j * B, H * B, h_prev + j * ld_h, hcur + j * TB, B);
        });
      }
      h_prev = hcur;
      ld_h = TB;
    }
  }
  const int64_t last = reverse ? 0 : T - 1;
  // (Copies, always: ht and the step buffers are not owned by these views, and contiguous()
  // would return the view itself where H or B is 1.)
  const Tensor htv = at::from_blob(ht, {H, T, B}, opt);
  Tensor h_n = htv.select(1, last).t().clone(at::MemoryFormat::Contiguous);
  Tensor c_n =
      lstm ? at::from_blob(sv + 4 * H * B, {H, B}, opt).t().clone(at::MemoryFormat::Contiguous)
           : at::empty({0}, opt);
  return {h_n, c_n};
}

// y [T, B, H] from h^T [H, T * B].
Tensor outputs_of(const Tensor& ht, const RnnShape& s) {
  return transposed_copy(ht.view({s.hidden, s.steps * s.batch})).view({s.steps, s.batch, s.hidden});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dst_sparse_rnn_train_cpu(
    const Tensor& x_in, const Tensor& h0_in, const std::optional<Tensor>& c0_in,
    const Tensor& weight_ih, const Tensor& weight_hh, const std::optional<Tensor>& bias_ih,
    const std::optional<Tensor>& bias_hh, c10::string_view mode, bool reverse) {
  const char* op = "dst_sparse_rnn_train";
  const Cell cell = cell_of(op, mode);
  check_weight(op, "weight_ih", weight_ih);
  check_weight(op, "weight_hh", weight_hh);
  TORCH_CHECK(weight_hh.scalar_type() == weight_ih.scalar_type(), op,
              ": weight_ih and weight_hh must share a dtype");
  const RnnShape s =
      check_rnn(op, cell, x_in, h0_in, c0_in, weight_ih.size(0), weight_ih.size(1),
                weight_hh.size(0), weight_hh.size(1), weight_ih.scalar_type(), bias_ih, bias_hh);
  const Tensor x = x_in.contiguous();
  const Tensor xt = transposed_copy(x.view({s.steps * s.batch, s.in}));  // [I, T * B]
  const Tensor h0 = h0_in.contiguous();
  const Tensor c0 = cell == Cell::kLstm ? c0_in->contiguous() : Tensor();
  const Tensor pih = weight_ih.contiguous();
  const Tensor phh = weight_hh.contiguous();
  const auto bi = contiguous_or_none(bias_ih);
  const auto bh = contiguous_or_none(bias_hh);
  const int64_t TB = s.steps * s.batch;
  Tensor saved = at::empty({s.saved_numel()}, x.options());
  const Tensor ht = saved.narrow(0, TB * s.saved_rows(), TB * s.hidden).view({s.hidden, TB});
  std::pair<Tensor, Tensor> last;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dst_sparse_rnn", [&] {
    const auto ih = product_of<scalar_t>(pih, TB, false);
    const auto hh = product_of<scalar_t>(phh, s.batch, false);
    last = rnn_forward<scalar_t>(
        s, xt, h0, c0, ih, hh, data_or_null<scalar_t>(bi), data_or_null<scalar_t>(bh), reverse,
        ht.mutable_data_ptr<scalar_t>(), saved.mutable_data_ptr<scalar_t>());
  });
  return {outputs_of(ht, s), last.first, last.second, saved};
}

std::tuple<Tensor, Tensor, Tensor> dst_sparse_rnn_cpu(
    const Tensor& x_in, const Tensor& h0_in, const std::optional<Tensor>& c0_in,
    const Tensor& ih_crow, const Tensor& ih_col, const Tensor& ih_val, const Tensor& hh_crow,
    const Tensor& hh_col, const Tensor& hh_val, const std::optional<Tensor>& bias_ih,
    const std::optional<Tensor>& bias_hh, c10::string_view mode, bool reverse, bool feature_major) {
  const char* op = "dst_sparse_rnn";
  const Cell cell = cell_of(op, mode);
  TORCH_CHECK(x_in.dim() == 3, op, ": x must be [steps, batch, input_size], got shape ",
              x_in.sizes());
  TORCH_CHECK(h0_in.dim() == 2, op, ": h0 must be [batch, hidden_size], got shape ", h0_in.sizes());
  const int64_t hidden = h0_in.size(1);
  check_csr(op, ih_crow, ih_col, ih_val, x_in.size(2));
  check_csr(op, hh_crow, hh_col, hh_val, hidden);
  TORCH_CHECK(hh_val.scalar_type() == ih_val.scalar_type(), op,
              ": the two compressed matrices must share a dtype");
  const RnnShape s = check_rnn(op, cell, x_in, h0_in, c0_in, ih_crow.numel() - 1, x_in.size(2),
                               hh_crow.numel() - 1, hidden, ih_val.scalar_type(), bias_ih, bias_hh);
  // x^T [I, T * B]: a view when x is laid out feature-major (a previous layer's y with
  // feature_major), else a transposed copy.
  const Tensor x_fm = x_in.permute({2, 0, 1});
  const Tensor xt = x_fm.is_contiguous()
                        ? x_fm.view({s.in, s.steps * s.batch})
                        : transposed_copy(x_in.contiguous().view({s.steps * s.batch, s.in}));
  const Tensor h0 = h0_in.contiguous();
  const Tensor c0 = cell == Cell::kLstm ? c0_in->contiguous() : Tensor();
  const auto bi = contiguous_or_none(bias_ih);
  const auto bh = contiguous_or_none(bias_hh);
  Tensor ht = at::empty({s.hidden, s.steps * s.batch}, x_in.options());
  std::pair<Tensor, Tensor> last;
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "dst_sparse_rnn", [&] {
    const auto ih = product_of_csr<scalar_t>(ih_crow, ih_col, ih_val, s.in);
    const auto hh = product_of_csr<scalar_t>(hh_crow, hh_col, hh_val, s.hidden);
    last = rnn_forward<scalar_t>(s, xt, h0, c0, ih, hh, data_or_null<scalar_t>(bi),
                                 data_or_null<scalar_t>(bh), reverse,
                                 ht.mutable_data_ptr<scalar_t>(), nullptr);
  });
  if (feature_major) {
    // y as a view of h^T: [T, B, H] with strides [B, 1, T * B].
    return {ht.view({s.hidden, s.steps, s.batch}).permute({1, 2, 0}), last.first, last.second};
  }
  return {outputs_of(ht, s), last.first, last.second};
}

// The backward's walk over the steps with the recurrent product through the CSR of P_hh^T
// (`hh_t`): one parallel region, each thread owning a range of units (their dh, dc and
// gate-gradient rows), one barrier per step between the gate gradients and dh.
template <typename scalar_t>
void rnn_backward_walk(const RnnShape& s, const Compressed& hh_t, bool reverse, const scalar_t* svp,
                       const scalar_t* htp, const scalar_t* gyp, const Tensor& h0t,
                       const Tensor& c0t, Tensor& dh, Tensor& dc, Tensor& direct, Tensor& dgi,
                       Tensor& dgh) {
  const bool lstm = s.cell == Cell::kLstm;
  const int64_t T = s.steps, B = s.batch, H = s.hidden, S = s.saved_rows(), TB = T * B;
  const int32_t* tcrow = hh_t.crow.const_data_ptr<int32_t>();
  const int32_t* tcol = hh_t.col.const_data_ptr<int32_t>();
  const scalar_t* tval = hh_t.val.const_data_ptr<scalar_t>();
  scalar_t* dhp = dh.mutable_data_ptr<scalar_t>();
  scalar_t* dcp = lstm ? dc.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* ddp = lstm ? nullptr : direct.mutable_data_ptr<scalar_t>();
  scalar_t* dgip = dgi.mutable_data_ptr<scalar_t>();
  scalar_t* dghp = dgh.mutable_data_ptr<scalar_t>();
  const scalar_t* h0p = h0t.const_data_ptr<scalar_t>();
  const scalar_t* c0p = lstm ? c0t.const_data_ptr<scalar_t>() : nullptr;
  const int threads = walk_threads(s, hh_t.col.numel());
#pragma omp parallel num_threads(threads)
  {
    const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t j0 = H * id / n, j1 = H * (id + 1) / n;
    const int64_t hb = H * B;
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = reverse ? k : T - 1 - k;
      const bool first = k == T - 1;
      const int64_t tp = reverse ? t + 1 : t - 1;
      const scalar_t* sv = svp + t * S * B;
      const scalar_t* gy_t = gyp != nullptr ? gyp + t * B : nullptr;
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* gyr = gy_t != nullptr ? gy_t + j * TB : nullptr;
        if (lstm) {
          const scalar_t* cp = first ? c0p + j * B : svp + tp * S * B + 4 * hb + j * B;
          lstm_unit_grad(sv + j * B, hb, cp, dhp + j * B, gyr, dcp + j * B, dgip + t * B + j * TB,
                         H * TB, B);
        } else {
          const scalar_t* hp = first ? h0p + j * B : htp + tp * B + j * TB;
          gru_unit_grad(sv + j * B, hb, hp, dhp + j * B, gyr, dgip + t * B + j * TB,
                        dghp + t * B + j * TB, H * TB, ddp + j * B, B);
        }
      }
#pragma omp barrier
      for (int64_t j = j0; j < j1; ++j) {
        if (j + 2 < j1) {  // (the gate-gradient rows of a row two ahead, written by every thread)
          prefetch_rows(dghp + t * B, TB, tcol, tcrow[j + 2], tcrow[j + 3], B);
        }
        // dh = P_hh^T dG (the GRU's direct part first).
        csr_row_pair(RowSource<scalar_t>{dghp + t * B, TB, tcol, tval, tcrow[j], tcrow[j + 1]},
                     RowSource<scalar_t>{},
                     lstm ? static_cast<const scalar_t*>(nullptr) : ddp + j * B, scalar_t(0), B,
                     dhp + j * B);
      }
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dst_sparse_rnn_backward_cpu(
    const std::optional<Tensor>& grad_y, const std::optional<Tensor>& grad_h_n,
    const std::optional<Tensor>& grad_c_n, const Tensor& x_in, const Tensor& h0_in,
    const std::optional<Tensor>& c0_in, const Tensor& weight_ih, const Tensor& weight_hh,
    const Tensor& y_in, const Tensor& saved_in, c10::string_view mode, bool reverse,
    bool input_grad) {
  const char* op = "dst_sparse_rnn_backward";
  const Cell cell = cell_of(op, mode);
  const bool lstm = cell == Cell::kLstm;
  check_weight(op, "weight_ih", weight_ih);
  check_weight(op, "weight_hh", weight_hh);
  const RnnShape s = check_rnn(op, cell, x_in, h0_in, c0_in, weight_ih.size(0), weight_ih.size(1),
                               weight_hh.size(0), weight_hh.size(1), weight_ih.scalar_type(),
                               std::nullopt, std::nullopt);
  const int64_t T = s.steps, B = s.batch, H = s.hidden, G = s.gates(), I = s.in;
  const int64_t S = s.saved_rows(), TB = T * B;
  TORCH_CHECK(y_in.sizes() == at::IntArrayRef({T, B, H}), op, ": y must be [", T, ", ", B, ", ", H,
              "], got ", y_in.sizes());
  TORCH_CHECK(saved_in.dim() == 1 && saved_in.numel() == s.saved_numel() &&
                  saved_in.scalar_type() == x_in.scalar_type(),
              op, ": saved must be the forward's (", s.saved_numel(), " values), got ",
              saved_in.sizes());
  const auto opt = x_in.options();
  const auto grad_of = [&](const std::optional<Tensor>& g, at::IntArrayRef shape,
                           const char* name) -> Tensor {
    if (!g.has_value() || !g->defined()) {
      return Tensor();
    }
    TORCH_CHECK(g->sizes() == shape && g->scalar_type() == x_in.scalar_type(), op, ": ", name,
                " must be ", shape, " with x's dtype, got ", g->sizes(), " ", g->scalar_type());
    return *g;
  };
  const Tensor gy = grad_of(grad_y, {T, B, H}, "grad_y");
  const Tensor ghn = grad_of(grad_h_n, {B, H}, "grad_h_n");
  const Tensor gcn = lstm ? grad_of(grad_c_n, {B, H}, "grad_c_n") : Tensor();
  // Feature-major: dh^T, dc^T [H, B]; dy^T [H, T * B]; the gate gradients [G, T * B].
  Tensor dh = ghn.defined() ? transposed_copy(ghn) : at::zeros({H, B}, opt);
  Tensor dc = lstm ? (gcn.defined() ? transposed_copy(gcn) : at::zeros({H, B}, opt)) : Tensor();
  const Tensor gyt = gy.defined() ? transposed_copy(gy.reshape({TB, H})) : Tensor();
  const Tensor x = x_in.contiguous();
  const Tensor h0t = transposed_copy(h0_in);
  const Tensor c0t = lstm ? transposed_copy(*c0_in) : Tensor();
  const Tensor saved = saved_in.contiguous();
  const Tensor ht = saved.narrow(0, TB * S, TB * H).view({H, TB});
  const Tensor pih = weight_ih.contiguous();
  const Tensor phh = weight_hh.contiguous();
  Tensor dgi = at::empty({G, TB}, opt);
  Tensor dgh = lstm ? dgi : at::empty({G, TB}, opt);
  Tensor dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dst_sparse_rnn_backward", [&] {
    const auto hh_t = product_of<scalar_t>(phh, B, true);
    Tensor rec = at::empty({H, B}, opt);
    Tensor direct = lstm ? Tensor() : at::empty({H, B}, opt);
    const scalar_t* svp = saved.const_data_ptr<scalar_t>();
    const scalar_t* htp = ht.const_data_ptr<scalar_t>();
    const scalar_t* gyp = gyt.defined() ? gyt.const_data_ptr<scalar_t>() : nullptr;
    if (!hh_t.dense.defined() && T > 0) {
      rnn_backward_walk<scalar_t>(s, hh_t.c, reverse, saved.const_data_ptr<scalar_t>(),
                                  ht.const_data_ptr<scalar_t>(), gyp, h0t, c0t, dh, dc, direct, dgi,
                                  dgh);
    } else {
      for (int64_t k = 0; k < T; ++k) {
        const int64_t t = reverse ? k : T - 1 - k;   // the forward's steps in reverse
        const bool first = k == T - 1;               // the forward's first step
        const int64_t tp = reverse ? t + 1 : t - 1;  // the step before it in the forward
        const scalar_t* sv = svp + t * S * B;
        const scalar_t* gy_t = gyp != nullptr ? gyp + t * B : nullptr;  // row stride T * B
        scalar_t* dgit = dgi.mutable_data_ptr<scalar_t>() + t * B;      // row stride T * B
        const scalar_t* dhp = dh.const_data_ptr<scalar_t>();
        const int64_t hb = H * B;
        if (lstm) {
          const scalar_t* c_prev =
              first ? c0t.const_data_ptr<scalar_t>() : svp + tp * S * B + 4 * hb;
          scalar_t* dcp = dc.mutable_data_ptr<scalar_t>();
          over_units(H, B, [&](int64_t j) {
            lstm_unit_grad(sv + j * B, hb, c_prev + j * B, dhp + j * B,
                           gy_t != nullptr ? gy_t + j * TB : nullptr, dcp + j * B, dgit + j * TB,
                           H * TB, B);
          });
          hh_t(dgit, TB, B, nullptr, rec.mutable_data_ptr<scalar_t>(), B, opt);
          std::swap(dh, rec);
        } else {
          const scalar_t* h_prev = first ? h0t.const_data_ptr<scalar_t>() : htp + tp * B;
          const int64_t ld_h = first ? B : TB;
          scalar_t* dght = dgh.mutable_data_ptr<scalar_t>() + t * B;
          scalar_t* dd = direct.mutable_data_ptr<scalar_t>();
          over_units(H, B, [&](int64_t j) {
            gru_unit_grad(sv + j * B, hb, h_prev + j * ld_h, dhp + j * B,
                          gy_t != nullptr ? gy_t + j * TB : nullptr, dgit + j * TB, dght + j * TB,
                          H * TB, dd + j * B, B);
          });
          hh_t(dght, TB, B, nullptr, rec.mutable_data_ptr<scalar_t>(), B, opt);
          rec.add_(direct);
          std::swap(dh, rec);
        }
      }
    }
    if (input_grad) {
      const auto ih_t = product_of<scalar_t>(pih, TB, true);
      Tensor dxt = at::empty({I, TB}, opt);
      ih_t(dgi.const_data_ptr<scalar_t>(), TB, TB, nullptr, dxt.mutable_data_ptr<scalar_t>(), TB,
           opt);
      dx = transposed_copy(dxt).view({T, B, I});
    } else {
      dx = at::empty({T, B, 0}, opt);
    }
  });
  // dP_ih = dG x over all steps; dP_hh = sum over steps of dG_hh(t) h_prev(t)^T, h_prev from
  // h^T shifted by a step (h0 for the first).
  Tensor dw_ih = at::mm(dgi, x.view({TB, I}));
  Tensor dw_hh = at::zeros({G, H}, opt);
  if (T > 0) {
    const int64_t first = reverse ? T - 1 : 0;
    dw_hh.addmm_(dgh.narrow(1, first * B, B), h0t.t());
    if (T > 1) {
      const int64_t n = (T - 1) * B;
      const Tensor dg_rest = reverse ? dgh.narrow(1, 0, n) : dgh.narrow(1, B, n);
      const Tensor h_rest = reverse ? ht.narrow(1, B, n) : ht.narrow(1, 0, n);
      dw_hh.addmm_(dg_rest, h_rest.t());
    }
  }
  Tensor db_ih = dgi.sum(1);
  Tensor db_hh = lstm ? db_ih.clone() : dgh.sum(1);
  return {dx,
          dh.t().contiguous(),
          lstm ? dc.t().contiguous() : at::empty({0}, opt),
          dw_ih,
          dw_hh,
          db_ih,
          db_hh};
}

}  // namespace

namespace sparse {

bool take(int64_t kept, int64_t tokens, int64_t in, int64_t out) {
  return take_sparse(kept, tokens, in, out);
}

void check_csr(const char* op, const Tensor& crow, const Tensor& col, const Tensor& values,
               int64_t k) {
  dst::check_csr(op, crow, col, values, k);
}

bool take_conv(int64_t kept, int64_t batch, int64_t in_channels, int64_t out_channels,
               int64_t kernel, int64_t out_pixels) {
  return take_at(kept, out_channels, in_channels * kernel,
                 sparse_conv_crossover(batch, in_channels, out_channels, kernel, out_pixels));
}

std::tuple<Tensor, Tensor, Tensor> csr_from_counts(const Tensor& weight, const Tensor& t,
                                                   const int64_t* counts) {
  Compressed c;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dst_sparse_csr",
      [&] { c = dst::csr_from_counts<scalar_t>(weight, t.const_data_ptr<scalar_t>(), counts); });
  return {c.crow, c.col, c.val};
}

int64_t nonzero_counts(const Tensor& p, int64_t* counts) {
  int64_t kept = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "dst_nonzeros",
                                  [&] { kept = nonzeros_of<scalar_t>(p, counts); });
  return kept;
}

Tensor product_from_counts(const Tensor& x, const Tensor& weight, const Tensor& t,
                           const int64_t* counts, const std::optional<Tensor>& bias,
                           bool transpose) {
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dst_sparse_product", [&] {
        Compressed c = dst::csr_from_counts<scalar_t>(weight, t.const_data_ptr<scalar_t>(), counts);
        if (transpose) {
          c = transposed<scalar_t>(c, weight.size(0), weight.numel() / weight.size(0));
        }
        y = dst_sparse_mm_cpu(x, c.crow, c.col, c.val, bias, false);
      });
  return y;
}

Tensor conv2d_from_counts(const Tensor& x, const Tensor& weight, const Tensor& t,
                          const int64_t* counts, const std::optional<Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  const ConvShape s = shape_of("dst_conv2d", x.sizes(), weight.size(0), weight.size(2),
                               weight.size(3), stride, padding, dilation);
  auto [crow, col, val] = csr_from_counts(weight, t, counts);
  const bool has_bias = bias.has_value() && bias->defined();
  const Tensor b = has_bias ? bias->contiguous() : Tensor();
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dst_conv2d", [&] {
    y = forward_from_csr<scalar_t>(x, crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
                                   val.const_data_ptr<scalar_t>(),
                                   has_bias ? b.const_data_ptr<scalar_t>() : nullptr, s);
  });
  return y;
}

Tensor conv2d_grad_input_from_counts(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                     const Tensor& t, const int64_t* counts, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  const ConvShape s = shape_of("dst_conv2d_grad_input", x.sizes(), weight.size(0), weight.size(2),
                               weight.size(3), stride, padding, dilation);
  TORCH_CHECK(grad_y.size(2) == s.oh && grad_y.size(3) == s.ow,
              "dst_conv2d_grad_input: grad_y must be [", s.n, ", ", s.oc, ", ", s.oh, ", ", s.ow,
              "] for this convolution, got ", grad_y.sizes());
  TORCH_CHECK(s.ph <= s.keh() - 1 && s.pw <= s.kew() - 1,
              "dst_conv2d_grad_input: the sparse path needs padding within the dilated kernel");
  auto [crow, col, val] = csr_from_counts(weight, t, counts);
  Tensor dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "dst_conv2d_grad_input", [&] {
        dx = grad_input_from_csr<scalar_t>(grad_y, crow.const_data_ptr<int32_t>(),
                                           col.const_data_ptr<int32_t>(),
                                           val.const_data_ptr<scalar_t>(), s);
      });
  return dx;
}
}  // namespace sparse
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CPU, m) {
  m.impl("dst_sparse_mask", &dst::dst_sparse_mask_cpu);
  m.impl("dst_sparse_mm", &dst::dst_sparse_mm_cpu);
  m.impl("dst_sparse_conv2d", &dst::dst_sparse_conv2d_cpu);
  m.impl("dst_sparse_rnn", &dst::dst_sparse_rnn_cpu);
  m.impl("dst_sparse_rnn_train", &dst::dst_sparse_rnn_train_cpu);
  m.impl("dst_sparse_rnn_backward", &dst::dst_sparse_rnn_backward_cpu);
}
