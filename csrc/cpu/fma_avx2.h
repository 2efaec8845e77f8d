// The AVX2 GEMM engine: a register-blocked fp32 FMA micro-kernel and the conversions it needs
// (e4m3 and bf16 to fp32 on load, fp32 to bf16 on store), shared by the avx2 kernels of
// fp8_gemm / fp8_grouped_gemm (kernels_avx2.cpp). Include only from TUs compiled with
// -mavx2 -mfma -mf16c.
//
// The product is written as the AVX-512 engine's (dpbf16_avx512.h), C[r][v] = sum_k V[k][v] .
// R[r][k], in fp32: V, the vector operand, is packed in panels of 8 * MRV columns ([k][8 * MRV]
// floats), R, the broadcast operand, is fp32 rows with the reduction contiguous, one element
// broadcast at a time. MRV = 2 and NR = 6 keep 12 accumulators, two V vectors and a broadcast
// in the 16 ymm registers: per k, 2 loads and 6 broadcasts feed 12 FMAs.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/fp8_scalar.h"
#include "cpu/kernels.h"

namespace r1x::cpu {
namespace {

// e4m3 values decoded as fp32 times 2^-8 (see decode32_f32): callers fold the 2^8 into a scale.
constexpr float kE4m3Unscale = 256.0f;

// 32 e4m3 bytes -> 32 fp32 holding value * 2^-8, in order (out[g]: elements 8g .. 8g + 7). The
// 7 magnitude bits of an e4m3 byte shifted left by 7 form an fp16 whose value is the e4m3 value
// times 2^-8 (normals and subnormals alike), which F16C converts exactly; the sign goes to bit
// 15 and the e4m3 NaN (magnitude 0x7f) to an fp16 NaN. Bytes are widened to words as
// (byte << 8) by unpacking with zeros: fp16 = (w & 0x8000) | ((w >> 1) & 0x3f80).
inline void decode32_f32(const uint8_t* p, __m256 out[4]) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i z = _mm256_setzero_si256();
  const __m256i sign = _mm256_set1_epi16(static_cast<short>(0x8000)), mag = _mm256_set1_epi16(0x3f80);
  const __m256i nan_mag = _mm256_set1_epi16(0x7f00), nan = _mm256_set1_epi16(0x7e00);
  __m256i h[2];
  const __m256i w[2] = {_mm256_unpacklo_epi8(z, x), _mm256_unpackhi_epi8(z, x)};  // bytes 0-7|16-23, 8-15|24-31
  for (int i = 0; i < 2; ++i) {
    const __m256i f = _mm256_or_si256(_mm256_and_si256(w[i], sign), _mm256_and_si256(_mm256_srli_epi16(w[i], 1), mag));
    const __m256i is_nan = _mm256_cmpeq_epi16(_mm256_and_si256(w[i], nan_mag), nan_mag);
    h[i] = _mm256_or_si256(f, _mm256_and_si256(is_nan, nan));
  }
  out[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h[0]));
  out[1] = _mm256_cvtph_ps(_mm256_castsi256_si128(h[1]));
  out[2] = _mm256_cvtph_ps(_mm256_extracti128_si256(h[0], 1));
  out[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(h[1], 1));
}

// n (a multiple of 32) e4m3 bytes -> fp32 * 2^-8.
inline void decode_row_f32_avx2(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 32) {
    __m256 v[4];
    decode32_f32(src + i, v);
    for (int g = 0; g < 4; ++g) _mm256_storeu_ps(dst + i + 8 * g, v[g]);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 fp32 -> 8 bf16 (round to nearest even, NaN kept quiet).
inline __m128i f32x8_to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, quiet, is_nan);
  // 32-bit lanes -> 16-bit, in order
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: 4 words, twice
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

// n fp32 -> out as fp32 or bf16.
inline void store_row_avx2(const float* v, int64_t n, DType dtype, void* out) {
  int64_t i = 0;
  if (dtype == DType::kF32) {
    std::memcpy(out, v, static_cast<size_t>(n) * 4);
    return;
  }
  uint16_t* o = static_cast<uint16_t*>(out);
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), f32x8_to_bf16(_mm256_loadu_ps(v + i)));
  for (; i < n; ++i) o[i] = f32_to_bf16(v[i]);
}

// 8 x 8 floats in registers: r[i] (element j) -> r[j] (element i).
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

enum class FmaEpi { kStore, kAdd, kScaleAdd };

// C[r][v] for NR R rows (row r at r0 + r * ldr floats, k < kc) against one V panel of MRV
// vectors (k at v + k * vld floats). kScaleAdd: C += acc * (vs[v] * s1).
template <int MRV, int NR, FmaEpi E>
inline void fma_micro(const float* v, int64_t vld, const float* r0, int64_t ldr, int64_t kc,
                      float* c, int64_t ldc, const float* vs = nullptr, float s1 = 1.0f) {
  __m256 acc[MRV][NR];
  _Pragma("GCC unroll 2") for (int i = 0; i < MRV; ++i)
    _Pragma("GCC unroll 12") for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m256 vv[MRV];
    _Pragma("GCC unroll 2") for (int i = 0; i < MRV; ++i) vv[i] = _mm256_loadu_ps(v + k * vld + 8 * i);
    _Pragma("GCC unroll 12") for (int j = 0; j < NR; ++j) {
      const __m256 b = _mm256_broadcast_ss(r0 + j * ldr + k);
      _Pragma("GCC unroll 2") for (int i = 0; i < MRV; ++i) acc[i][j] = _mm256_fmadd_ps(vv[i], b, acc[i][j]);
    }
  }
  _Pragma("GCC unroll 2") for (int i = 0; i < MRV; ++i) {
    const __m256 s = E == FmaEpi::kScaleAdd ? _mm256_mul_ps(_mm256_loadu_ps(vs + 8 * i), _mm256_set1_ps(s1))
                                            : _mm256_setzero_ps();
    _Pragma("GCC unroll 12") for (int j = 0; j < NR; ++j) {
      float* p = c + j * ldc + 8 * i;
      if constexpr (E == FmaEpi::kScaleAdd) {
        _mm256_storeu_ps(p, _mm256_fmadd_ps(acc[i][j], s, _mm256_loadu_ps(p)));
      } else if constexpr (E == FmaEpi::kAdd) {
        _mm256_storeu_ps(p, _mm256_add_ps(acc[i][j], _mm256_loadu_ps(p)));
      } else {
        _mm256_storeu_ps(p, acc[i][j]);
      }
    }
  }
}

}  // namespace
}  // namespace r1x::cpu
