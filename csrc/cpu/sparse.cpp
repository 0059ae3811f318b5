// CPU kernels of the sparse op family: P = W * M in compressed form and the products
// with it.
//
//   dst_sparse_mask(W, t, transpose)   CSR of P (or of P^T), int32 indices
//   dst_sparse_mm(x, crow, col, val, b) y = x A^T + b for a CSR matrix A
//   sparse::product_from_counts        y = x P^T (or x P) from the CSR built off the mask
//                                      pass's row counts: the sparse path of the CPU
//                                      dst_linear kernels (csrc/cpu/linear.cpp)
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

#include <algorithm>
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

namespace {

using at::Tensor;

constexpr int64_t kGrainElements = 32768;
// Multiply-adds below which a product runs on one thread.
constexpr int64_t kGrainWork = 65536;
constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();

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
                                                     int64_t m0, int64_t m1) {
  using opmath_t = opmath<scalar_t>;
  using V = typename Vec<opmath_t>::type;
  constexpr int kLanes = sizeof(V) / sizeof(opmath_t);
  // Features in blocks of kBlock: their sums gather in `out` (kBlock x NB, in L1) and leave
  // as kBlock contiguous values per token row (one cache line), not one strided store each.
  constexpr int64_t kBlock = 16;
  alignas(64) opmath_t out[kBlock][NB];
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
    for (int64_t i = 0; i < nb; ++i) {
      scalar_t* yr = y + i * ldy;
      for (int64_t m = mb; m < me; ++m) {
        yr[m] = static_cast<scalar_t>(out[m - mb][i] + b[m - mb]);
      }
    }
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void tile_rows_any_impl(const opmath<scalar_t>* xt,
                                                              Csr<scalar_t> a, const scalar_t* bias,
                                                              scalar_t* y, int64_t ldy, int64_t nb,
                                                              int nbw, int64_t m0, int64_t m1) {
  switch (nbw) {
    case 1:
      return tile_rows<scalar_t, 1>(xt, a, bias, y, ldy, nb, m0, m1);
    case 2:
      return tile_rows<scalar_t, 2>(xt, a, bias, y, ldy, nb, m0, m1);
    case 4:
      return tile_rows<scalar_t, 4>(xt, a, bias, y, ldy, nb, m0, m1);
    case 8:
      return tile_rows<scalar_t, 8>(xt, a, bias, y, ldy, nb, m0, m1);
    case 16:
      return tile_rows<scalar_t, 16>(xt, a, bias, y, ldy, nb, m0, m1);
    case 32:
      return tile_rows<scalar_t, 32>(xt, a, bias, y, ldy, nb, m0, m1);
    default:
      return tile_rows<scalar_t, 64>(xt, a, bias, y, ldy, nb, m0, m1);
  }
}

DST_CPU_MULTIVERSION(tile_rows_any, tile_rows_any_impl)

#ifdef DST_AVX512_COMPRESS
// One token row of float x (contiguous, no packing): per output feature, 16 kept weights
// at a time with gathered x values, then a fixed-order horizontal sum.
__attribute__((target("avx512f"))) void spmv_rows_avx512(const float* x, Csr<float> a,
                                                         const float* bias, float* y, int64_t m0,
                                                         int64_t m1) {
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
    y[m] = _mm512_reduce_add_ps(acc) + (bias != nullptr ? bias[m] : 0.0f);
  }
}
#endif

// y[n, m] = bias[m] + sum_k x[n, k] A[m, k]: x is [n_rows, k] row-major, A is [m_rows, k]
// in CSR, y is [n_rows, m_rows] row-major. Parallel over (token tile, output feature)
// pairs, tile-major, so a thread packs each of its tiles once.
template <typename scalar_t>
void spmm(const scalar_t* x, int64_t n_rows, int64_t k, Csr<scalar_t> a, int64_t m_rows,
          int64_t nnz, const scalar_t* bias, scalar_t* y) {
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
          spmv_rows_avx512(x + n0 * k, a, bias, y + n0 * m_rows, m0, m1);
          it += m1 - m0;
          continue;
        }
      }
#endif
      pack_tile(x + n0 * k, k, k, nb, nbw, xt.get());
      tile_rows_any(static_cast<const opmath_t*>(xt.get()), a, bias, y + n0 * m_rows, m_rows, nb,
                    nbw, m0, m1);
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

bool take_sparse(int64_t kept, int64_t tokens, int64_t in, int64_t out) {
  if (kept > kMaxIndex || in > kMaxIndex || out > kMaxIndex) {
    return false;
  }
  switch (static_cast<SparseMode>(g_sparse_mode.load(std::memory_order_relaxed))) {
    case SparseMode::kAlways:
      return true;
    case SparseMode::kNever:
      return false;
    default:
      return static_cast<double>(kept) <
             sparse_crossover(tokens, in, out) * static_cast<double>(in * out);
  }
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
                         const Tensor& values, const std::optional<Tensor>& bias) {
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
                   y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

}  // namespace

namespace sparse {

bool take(int64_t kept, int64_t tokens, int64_t in, int64_t out) {
  return take_sparse(kept, tokens, in, out);
}

Tensor product_from_counts(const Tensor& x, const Tensor& weight, const Tensor& t,
                           const int64_t* counts, const std::optional<Tensor>& bias,
                           bool transpose) {
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "dst_sparse_product", [&] {
        Compressed c = csr_from_counts<scalar_t>(weight, t.const_data_ptr<scalar_t>(), counts);
        if (transpose) {
          c = transposed<scalar_t>(c, weight.size(0), weight.numel() / weight.size(0));
        }
        y = dst_sparse_mm_cpu(x, c.crow, c.col, c.val, bias);
      });
  return y;
}

}  // namespace sparse
}  // namespace dst

TORCH_LIBRARY_IMPL(dst_kernels, CPU, m) {
  m.impl("dst_sparse_mask", &dst::dst_sparse_mask_cpu);
  m.impl("dst_sparse_mm", &dst::dst_sparse_mm_cpu);
}
