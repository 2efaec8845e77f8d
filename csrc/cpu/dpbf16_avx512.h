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

template <int MRV, int NR, Epi E>
inline void dp_micro(const uint32_t* v, const uint32_t* r, int64_t ldr, int64_t np, float* c,
                     int64_t ldc, const float* vs = nullptr, float s1 = 1.0f) {
  __m512 acc[MRV][NR];
  _Pragma("GCC unroll 4") for (int i = 0; i < MRV; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int32_t* rr = reinterpret_cast<const int32_t*>(r);
  for (int64_t q = 0; q < np; ++q) {
    __m512bh vv[MRV];
    _Pragma("GCC unroll 4") for (int i = 0; i < MRV; ++i)
      vv[i] = (__m512bh)_mm512_loadu_si512(v + q * 16 * MRV + 16 * i);
    _Pragma("GCC unroll 16") for (int j = 0; j < NR; ++j) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(rr[j * ldr + q]);
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

// C[r0 .. r0 + rows)[panel] for one V panel (MRV = 1..4 vectors) against `rows` R rows
// (a multiple of dp_nr<MRV>()), one micro-kernel call per NR rows.
template <Epi E>
inline void dp_panel(int mrv, const uint32_t* v, const uint32_t* r, int64_t ldr, int64_t rows,
                     int64_t np, float* c, int64_t ldc, const float* vs = nullptr, float s1 = 1.0f) {
  switch (mrv) {
    case 1:
      for (int64_t j = 0; j < rows; j += dp_nr<1>()) dp_micro<1, dp_nr<1>(), E>(v, r + j * ldr, ldr, np, c + j * ldc, ldc, vs, s1);
      break;
    case 2:
      for (int64_t j = 0; j < rows; j += dp_nr<2>()) dp_micro<2, dp_nr<2>(), E>(v, r + j * ldr, ldr, np, c + j * ldc, ldc, vs, s1);
      break;
    case 3:
      for (int64_t j = 0; j < rows; j += dp_nr<3>()) dp_micro<3, dp_nr<3>(), E>(v, r + j * ldr, ldr, np, c + j * ldc, ldc, vs, s1);
      break;
    default:
      for (int64_t j = 0; j < rows; j += dp_nr<4>()) dp_micro<4, dp_nr<4>(), E>(v, r + j * ldr, ldr, np, c + j * ldc, ldc, vs, s1);
      break;
  }
}

// 16 x 16 dwords in registers: rows[i] (dword j) -> rows[j] (dword i).
inline void transpose16x16_dw(__m512i rows[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    rows[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    rows[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    rows[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    rows[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // rows[4b + e] now holds, in 128-bit lane L, dword e of rows 4L' .. : element (row 4b + x,
  // column 4L + e) sits at lane L, position x; gather the lanes of 4 registers.
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

}  // namespace
}  // namespace r1x::cpu
