// The AVX-512 BF16 GEMM engine: a register-blocked VDPBF16PS micro-kernel and the packing it
// needs, shared by the avx512 kernels of fp8_gemm / fp8_grouped_gemm (kernels_avx512.cpp), the
// bf16 grouped GEMM and its gradients (fgemm_avx512.cpp) and the MLA tiles (mla_avx512.cpp).
// Include only from TUs compiled with the AVX-512 F/BW/VL/DQ/VBMI/BF16 flags.
//
// Every product is written as
//
//   C[r][v] = sum_q  V[q][v] . R[r][q]        (q: pairs of the reduction index)
//
// where "." is the bf16 pair dot product of VDPBF16PS (two exact bf16 products added to the
// fp32 accumulator). The two operands play fixed roles:
//   V, the vector operand, is packed in "VNNI" panels of 16 * MRV rows: pair q of the panel is
//     16 * MRV consecutive dwords (each dword: elements 2q and 2q + 1 of one V row), so one zmm
//     load gives 16 rows' pairs;
//   R, the broadcast operand, is read as bf16 rows with the reduction contiguous: pair q of row r
//     is dword q of the row, broadcast to all 16 lanes.
// The micro-kernel keeps MRV x NR accumulators (16 V rows x 1 R row each) in zmm registers; per
// pair it loads MRV vectors of V and broadcasts NR dwords of R. On Zen 4 every shape from 1 x 16
// to 4 x 6 runs at ~99% of the VDPBF16PS peak with its operands in L1 (one instruction a cycle,
// 64 flops), so the drivers pick MRV and NR for their padding and cache blocking.
//
// Which matrix is V and which is R is the caller's choice: VNNI-packing a matrix whose
// reduction index runs down its rows is a cheap interleave of row pairs (pack_vnni_rowpairs),
// while one whose reduction index is contiguous needs a 16 x 16 dword transpose
// (pack_vnni_transpose); R must have the reduction contiguous, and can then be read in place.
#pragma once

#include <algorithm>
#include <cstring>

#include "cpu/avx512_util.h"

namespace r1x::cpu {
namespace {

// What the micro-kernel does with its accumulators at the end (C row r at c + r * ldc, its 16 *
// MRV V lanes contiguous):
//   kStore:    C = acc
//   kAdd:      C += acc
//   kScaleAdd: C += acc * (vs[v] * s1)   (DeepGEMM's per-block promotion: vs per V row)
enum class Epi { kStore, kAdd, kScaleAdd };

// A dword of R (two bf16) at any byte address: rows may start at any even byte (an odd element
// stride puts them 2 bytes off a dword).
typedef int32_t __attribute__((aligned(1), may_alias)) unaligned_i32;

// C[r][v] for NR R rows (row r at r0 + r * ldr bytes, pairs q < np) against one V panel of MRV
// vectors (pair q at v + q * vld dwords; a packed panel has vld = 16 * MRV).
template <int MRV, int NR, Epi E>
inline void dp_micro(const uint32_t* v, int64_t vld, const uint8_t* r0, int64_t ldr, int64_t np,
                     float* c, int64_t ldc, const float* vs = nullptr, float s1 = 1.0f) {
  __m512 acc[MRV][NR];
  _Pragma("GCC unroll 4") for (int i = 0; i < MRV; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t q = 0; q < np; ++q) {
    __m512bh vv[MRV];
    _Pragma("GCC unroll 4") for (int i = 0; i < MRV; ++i)
      vv[i] = (__m512bh)_mm512_loadu_si512(v + q * vld + 16 * i);
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const unaligned_i32*>(r0 + j * ldr + 4 * q));
      _Pragma("GCC unroll 4") for (int i = 0; i < MRV; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], vv[i], b);
    }
  }
  if constexpr (E == Epi::kScaleAdd) {
    const __m512 f = _mm512_set1_ps(s1);
    _Pragma("GCC unroll 4") for (int i = 0; i < MRV; ++i) {
      const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(vs + 16 * i), f);
      _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
        float* p = c + j * ldc + 16 * i;
        _mm512_storeu_ps(p, _mm512_fmadd_ps(acc[i][j], s, _mm512_loadu_ps(p)));
      }
    }
  } else {
    _Pragma("GCC unroll 4") for (int i = 0; i < MRV; ++i)
      _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
        float* p = c + j * ldc + 16 * i;
        _mm512_storeu_ps(p, E == Epi::kAdd ? _mm512_add_ps(acc[i][j], _mm512_loadu_ps(p)) : acc[i][j]);
      }
  }
}

// The register block for a panel of MRV vectors: NR broadcast rows, all dividing 16 so that
// R row counts padded to 16 need no edge kernel.
template <int MRV>
constexpr int dp_nr() {
  return MRV == 1 ? 16 : MRV == 2 ? 8 : 4;
}

// C[0 .. rows)[panel] for one V panel (MRV = 1..4 vectors, pair stride vld dwords) against
// `rows` R rows (a multiple of dp_nr<MRV>()), one micro-kernel call per NR rows.
template <Epi E>
inline void dp_panel(int mrv, const uint32_t* v, int64_t vld, const uint8_t* r, int64_t ldr,
                     int64_t rows, int64_t np, float* c, int64_t ldc, const float* vs = nullptr,
                     float s1 = 1.0f) {
  switch (mrv) {
    case 1:
      for (int64_t j = 0; j < rows; j += dp_nr<1>()) dp_micro<1, dp_nr<1>(), E>(v, vld, r + j * ldr, ldr, np, c + j * ldc, ldc, vs, s1);
      break;
    case 2:
      for (int64_t j = 0; j < rows; j += dp_nr<2>()) dp_micro<2, dp_nr<2>(), E>(v, vld, r + j * ldr, ldr, np, c + j * ldc, ldc, vs, s1);
      break;
    case 3:
      for (int64_t j = 0; j < rows; j += dp_nr<3>()) dp_micro<3, dp_nr<3>(), E>(v, vld, r + j * ldr, ldr, np, c + j * ldc, ldc, vs, s1);
      break;
    default:
      for (int64_t j = 0; j < rows; j += dp_nr<4>()) dp_micro<4, dp_nr<4>(), E>(v, vld, r + j * ldr, ldr, np, c + j * ldc, ldc, vs, s1);
      break;
  }
}

// C[0 .. rows)[0 .. cols) for a V operand of `cols` lanes (a multiple of 16, pair stride vld
// dwords) in panels of up to 64 lanes, against `rows` R rows (a multiple of 16).
template <Epi E>
inline void dp_block(const uint32_t* v, int64_t vld, int64_t cols, const uint8_t* r, int64_t ldr,
                     int64_t rows, int64_t np, float* c, int64_t ldc) {
  for (int64_t c0 = 0; c0 < cols; c0 += 64) {
    const int mrv = static_cast<int>(std::min<int64_t>(64, cols - c0) / 16);
    dp_panel<E>(mrv, v + c0, vld, r, ldr, rows, np, c + c0, ldc);
  }
}

// 16 x 16 dwords in registers: rows[i] (dword j) -> rows[j] (dword i).
inline void transpose16x16_dw(__m512i rows[16]) {
  __m512i t[16];
  // within each 128-bit lane L: t[2a], t[2a+1] interleave dwords of rows 2a and 2a+1
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  // rows[4b + e], lane L: dword 4L + e of rows 4b .. 4b + 3
  for (int i = 0; i < 16; i += 4) {
    rows[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    rows[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    rows[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    rows[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // column 4L + e = lane L of rows[e], rows[4 + e], rows[8 + e], rows[12 + e]
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(rows[i], rows[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(rows[i], rows[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(rows[8 + i], rows[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(rows[8 + i], rows[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    rows[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    rows[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    rows[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    rows[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// ---- packing bf16 operands ---------------------------------------------------------------
// A bf16 matrix view: element (row, col) at p[row * rs + col * cs]; cols is the reduction.
struct Bf16View {
  const uint16_t* p;
  int64_t rs, cs;
  int64_t rows, cols;
  uint16_t at(int64_t r, int64_t c) const { return p[r * rs + c * cs]; }
};

inline int64_t dp_pairs(int64_t k) { return (k + 1) / 2; }

// 16 dwords (row pair (2q, 2q + 1) of 16 consecutive rows r0.. of a view whose rows are
// contiguous in memory (rs == 1)): elements past the view read as 0.
inline __m512i interleave_pair16(const Bf16View& m, int64_t r0, int64_t q) {
  const int64_t n = std::min<int64_t>(16, m.rows - r0);
  const __mmask16 mask = static_cast<__mmask16>(n >= 16 ? 0xffff : n <= 0 ? 0 : (1u << n) - 1);
  const int64_t c = 2 * q;
  const __m256i a = c < m.cols ? _mm256_maskz_loadu_epi16(mask, m.p + r0 + c * m.cs) : _mm256_setzero_si256();
  const __m256i b = c + 1 < m.cols ? _mm256_maskz_loadu_epi16(mask, m.p + r0 + (c + 1) * m.cs) : _mm256_setzero_si256();
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// 16 pairs (32 elements, from column 32 * q16) of row r of a view whose rows are contiguous
// (cs == 1) as 16 dwords; elements past the view read as 0.
inline __m512i row_pairs16(const Bf16View& m, int64_t r, int64_t q16) {
  if (r >= m.rows) return _mm512_setzero_si512();
  const int64_t c0 = 32 * q16, n = std::min<int64_t>(32, m.cols - c0);
  const __mmask32 mask = n >= 32 ? 0xffffffffu : (n <= 0 ? 0u : (1u << n) - 1);
  return _mm512_maskz_loadu_epi16(mask, m.p + r * m.rs + c0);
}

// The V panel of rows [v0, v0 + 16 * mrv) of `m` (rows past the view: zeros), pairs
// [q0, q0 + nq): dst[q - q0][16 * mrv] dwords (an odd last column pairs with 0).
inline void pack_v_panel(const Bf16View& m, int64_t v0, int mrv, int64_t q0, int64_t nq, uint32_t* dst) {
  const int64_t w = 16 * mrv;
  for (int vec = 0; vec < mrv; ++vec) {
    const int64_t r0 = v0 + 16 * vec;
    if (m.cs == 1) {
      for (int64_t q = q0; q < q0 + nq;) {
        // 16 pairs from a 16-pair boundary of the row
        const int64_t q16 = q / 16, take = std::min<int64_t>(16 * (q16 + 1), q0 + nq) - q;
        __m512i rows[16];
        for (int i = 0; i < 16; ++i) rows[i] = row_pairs16(m, r0 + i, q16);
        transpose16x16_dw(rows);
        for (int64_t j = 0; j < take; ++j) _mm512_storeu_si512(dst + (q - q0 + j) * w + 16 * vec, rows[q % 16 + j]);
        q += take;
      }
    } else if (m.rs == 1) {
      for (int64_t q = q0; q < q0 + nq; ++q)
        _mm512_storeu_si512(dst + (q - q0) * w + 16 * vec, interleave_pair16(m, r0, q));
    } else {
      for (int64_t q = q0; q < q0 + nq; ++q)
        for (int i = 0; i < 16; ++i) {
          const int64_t r = r0 + i, c = 2 * q;
          const uint32_t lo = r < m.rows ? m.at(r, c) : 0;
          const uint32_t hi = r < m.rows && c + 1 < m.cols ? m.at(r, c + 1) : 0;
          dst[(q - q0) * w + 16 * vec + i] = lo | (hi << 16);
        }
    }
  }
}

// Rows [r0, r0 + 16) of `m` as R rows with the reduction contiguous, for a view whose rows are
// contiguous in memory (rs == 1: the transpose of what R wants): dst row i at dst + i * ldr
// elements, all dp_pairs(m.cols) pairs (zero past the view).
inline void pack_r_rows16(const Bf16View& m, int64_t r0, uint16_t* dst, int64_t ldr) {
  const int64_t np = dp_pairs(m.cols);
  for (int64_t q16 = 0; q16 * 16 < np; ++q16) {
    __m512i v[16];
    for (int q = 0; q < 16; ++q) v[q] = interleave_pair16(m, r0, 16 * q16 + q);
    transpose16x16_dw(v);  // v[i]: row r0 + i, pairs 16 q16 ..
    const int64_t nq = std::min<int64_t>(16, np - 16 * q16);
    const __mmask16 mask = static_cast<__mmask16>(nq >= 16 ? 0xffff : (1u << nq) - 1);
    for (int i = 0; i < 16; ++i) _mm512_mask_storeu_epi32(dst + i * ldr + 32 * q16, mask, v[i]);
  }
}

}  // namespace
}  // namespace r1x::cpu
