// AVX-512 helpers shared by the avx512 and amx kernel TUs (include only from TUs compiled
// with AVX-512 F/BW/VL/DQ/VBMI/BF16 flags). Internal linkage throughout.
#pragma once

#include <immintrin.h>

#include "cpu/fp8_scalar.h"
#include "cpu/kernels.h"

namespace r1x::cpu {
namespace {

// How far ahead weight streams are prefetched (bytes): more misses in flight than the
// hardware prefetchers keep.
constexpr int64_t kPrefetchBytes = 2048;

inline __m512 load16_f32(const void* x, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kF32: return _mm512_loadu_ps(static_cast<const float*>(x) + i);
    case DType::kBF16: {
      const __m256i h = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    default:
      return _mm512_cvtph_ps(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i)));
  }
}

inline float amax_avx512_impl(const void* x, DType dtype, int64_t n) {
  const __m512i mag_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_castps_si512(load16_f32(x, dtype, i)), mag_mask));
    m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_castps_si512(load16_f32(x, dtype, i + 16)), mag_mask));
  }
  for (; i + 16 <= n; i += 16)
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_castps_si512(load16_f32(x, dtype, i)), mag_mask));
  uint32_t r = _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
  for (; i < n; ++i) {
    const uint32_t b = abs_bits(load_as_f32(x, int(dtype), i));
    r = b > r ? b : r;
  }
  return bits_f32(r);
}

// 16 fp32 -> 16 e4m3 bytes (same rules as f32_to_e4m3).
inline __m128i f32x16_to_e4m3(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(bits, 24), _mm512_set1_epi32(0x80));
  const __m512i mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  __m512i r = _mm512_add_epi32(
      mag, _mm512_add_epi32(_mm512_set1_epi32(0x7ffff),
                            _mm512_and_si512(_mm512_srli_epi32(mag, 20), _mm512_set1_epi32(1))));
  r = _mm512_sub_epi32(_mm512_srli_epi32(r, 20), _mm512_set1_epi32(120 << 3));
  const __mmask16 is_sub = _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(0x3c800000));
  r = _mm512_mask_mov_epi32(
      r, is_sub, _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(512.0f))));
  r = _mm512_mask_mov_epi32(r, _mm512_cmpge_epu32_mask(mag, _mm512_set1_epi32(0x43e00000)),
                            _mm512_set1_epi32(0x7e));
  r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epu32_mask(mag, _mm512_set1_epi32(0x7f800000)),
                            _mm512_set1_epi32(0x7f));
  return _mm512_cvtepi32_epi8(_mm512_or_si512(r, sign));
}

inline void quantize_avx512_impl(const void* x, DType dtype, int64_t n, float scale, uint8_t* q) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     f32x16_to_e4m3(_mm512_div_ps(load16_f32(x, dtype, i), s)));
  for (; i < n; ++i) q[i] = f32_to_e4m3(load_as_f32(x, int(dtype), i) / scale);
}

// e4m3 -> bf16 or fp32 (exact: every e4m3 value is a bf16 value) by table lookup: vpermi2b
// looks up the low and the high byte of the bf16 pattern of the 7 magnitude bits (its index
// uses bits 0-6 only, so the sign bit is ignored for free) and the sign is or-ed in; one more
// byte permute per 32 bf16 (or, with zero-masking, per 16 fp32) puts the bytes in place.
struct E4m3Decoder {
  __m512i lo0, lo1, hi0, hi1, mix0, mix1, sign;
  E4m3Decoder() {
    alignas(64) static uint8_t tables[6][64];
    static const bool init = [] {
      for (int i = 0; i < 128; ++i) {
        const uint16_t h = f32_to_bf16(e4m3_to_f32(static_cast<uint8_t>(i)));
        tables[i / 64][i % 64] = static_cast<uint8_t>(h & 0xff);
        tables[2 + i / 64][i % 64] = static_cast<uint8_t>(h >> 8);
      }
      for (int i = 0; i < 32; ++i) {
        tables[4][2 * i] = static_cast<uint8_t>(i);
        tables[4][2 * i + 1] = static_cast<uint8_t>(64 + i);
        tables[5][2 * i] = static_cast<uint8_t>(32 + i);
        tables[5][2 * i + 1] = static_cast<uint8_t>(96 + i);
      }
      return true;
    }();
    (void)init;
    lo0 = _mm512_load_si512(tables[0]);
    lo1 = _mm512_load_si512(tables[1]);
    hi0 = _mm512_load_si512(tables[2]);
    hi1 = _mm512_load_si512(tables[3]);
    mix0 = _mm512_load_si512(tables[4]);
    mix1 = _mm512_load_si512(tables[5]);
    sign = _mm512_set1_epi8(static_cast<char>(0x80));
    // dword i of group 0: bytes (-, -, lo[i], hi[i]) = indices (0, 0, i, 64 + i)
    const __m512i w0 = _mm512_set_epi32(0x4f0f0000, 0x4e0e0000, 0x4d0d0000, 0x4c0c0000,
                                        0x4b0b0000, 0x4a0a0000, 0x49090000, 0x48080000,
                                        0x47070000, 0x46060000, 0x45050000, 0x44040000,
                                        0x43030000, 0x42020000, 0x41010000, 0x40000000);
    for (int g = 0; g < 4; ++g) widen[g] = _mm512_add_epi32(w0, _mm512_set1_epi32(0x10100000 * g));
  }
  __m512i widen[4];  // group g: indices (-, -, 16g + i, 64 + 16g + i)
  inline void bytes64(const uint8_t* p, __m512i& lo, __m512i& hi) const {
    const __m512i u = _mm512_loadu_si512(p);
    lo = _mm512_permutex2var_epi8(lo0, u, lo1);
    hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, u, hi1), u, sign, 0xf8);  // a | (b & c)
  }
  // 64 e4m3 bytes -> 64 bf16 (out0: elements 0-31, out1: 32-63).
  inline void decode64(const uint8_t* p, __m512i& out0, __m512i& out1) const {
    __m512i lo, hi;
    bytes64(p, lo, hi);
    out0 = _mm512_permutex2var_epi8(lo, mix0, hi);
    out1 = _mm512_permutex2var_epi8(lo, mix1, hi);
  }
  // 64 e4m3 bytes -> 64 fp32 (out[g]: elements 16g .. 16g+15): bf16 bytes into the top half
  // of each dword, the bottom half zeroed by the mask.
  inline void decode64_f32(const uint8_t* p, __m512 out[4]) const {
    __m512i lo, hi;
    bytes64(p, lo, hi);
    const __mmask64 top = 0xccccccccccccccccULL;
    for (int g = 0; g < 4; ++g)
      out[g] = _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi8(top, lo, widen[g], hi));
  }
  // 64 e4m3 bytes -> 64 bf16 in lane-permuted order: 128-bit lane L of out0 holds elements
  // 16 L + 0..7, of out1 16 L + 8..15 (byte unpacks instead of decode64's byte permutes). For
  // products whose two operands are both decoded this way (the AMX GEMM's A and B).
  inline void decode64_perm(const uint8_t* p, __m512i& out0, __m512i& out1) const {
    __m512i lo, hi;
    bytes64(p, lo, hi);
    out0 = _mm512_unpacklo_epi8(lo, hi);
    out1 = _mm512_unpackhi_epi8(lo, hi);
  }
  // 64 e4m3 bytes -> 64 fp32 in lane-permuted order: out[g], 128-bit lane L, holds elements
  // 16 L + 4 g .. 16 L + 4 g + 3. Byte and word unpacks instead of decode64_f32's byte
  // permutes (which compete with the FMAs for one port): a dot product whose other operand is
  // permuted alike (permute64_f32) is unchanged.
  inline void decode64_f32_perm(const uint8_t* p, __m512 out[4]) const {
    __m512i lo, hi;
    bytes64(p, lo, hi);
    const __m512i w0 = _mm512_unpacklo_epi8(lo, hi);  // bf16 of bytes 16 L + 0..7
    const __m512i w1 = _mm512_unpackhi_epi8(lo, hi);  // bf16 of bytes 16 L + 8..15
    const __m512i z = _mm512_setzero_si512();
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, w0));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, w0));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, w1));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, w1));
  }
  // n (multiple of 64) contiguous e4m3 bytes -> n fp32 (in decode64_f32_perm's order within
  // every 64 when kPerm), prefetching the stream ahead (also past its end: rows of a matrix are
  // contiguous).
  template <bool kPerm = false>
  inline void decode_row_f32(const uint8_t* src, int64_t n, float* dst) const {
    for (int64_t i = 0; i < n; i += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(src + i) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(src + i) + 4 * kPrefetchBytes, _MM_HINT_T1);
      __m512 v[4];
      if constexpr (kPerm) {
        decode64_f32_perm(src + i, v);
      } else {
        decode64_f32(src + i, v);
      }
      for (int g = 0; g < 4; ++g) _mm512_storeu_ps(dst + i + 16 * g, v[g]);
    }
  }
};

// 64 fp32 (v[q] = elements 16 q .. 16 q + 15) into decode64_f32_perm's order: a 4 x 4
// transpose of 128-bit lanes (out[g] lane L = v[L] lane g).
inline void permute64_f32(const __m512 v[4], __m512 out[4]) {
  const __m512 t0 = _mm512_shuffle_f32x4(v[0], v[1], 0x44), t1 = _mm512_shuffle_f32x4(v[0], v[1], 0xee);
  const __m512 t2 = _mm512_shuffle_f32x4(v[2], v[3], 0x44), t3 = _mm512_shuffle_f32x4(v[2], v[3], 0xee);
  out[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  out[1] = _mm512_shuffle_f32x4(t0, t2, 0xdd);
  out[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  out[3] = _mm512_shuffle_f32x4(t1, t3, 0xdd);
}

inline __m512 bf16x16_to_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void dequantize_avx512_impl(const uint8_t* q, int64_t n, float scale, float* out) {
  const E4m3Decoder dec;
  const __m512 s = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512i o0, o1;
    dec.decode64(q + i, o0, o1);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(bf16x16_to_f32(_mm512_castsi512_si256(o0)), s));
    _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(bf16x16_to_f32(_mm512_extracti64x4_epi64(o0, 1)), s));
    _mm512_storeu_ps(out + i + 32, _mm512_mul_ps(bf16x16_to_f32(_mm512_castsi512_si256(o1)), s));
    _mm512_storeu_ps(out + i + 48, _mm512_mul_ps(bf16x16_to_f32(_mm512_extracti64x4_epi64(o1, 1)), s));
  }
  for (; i < n; ++i) out[i] = e4m3_to_f32(q[i]) * scale;
}

// Rows of fp32 -> output dtype (bf16 with round to nearest even).
inline void store_f32_row(const float* v, int64_t n, DType dtype, void* out) {
  if (dtype == DType::kF32) {
    float* o = static_cast<float*>(out);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_loadu_ps(v + i));
    for (; i < n; ++i) o[i] = v[i];
  } else {
    uint16_t* o = static_cast<uint16_t*>(out);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + i)));
    for (; i < n; ++i) o[i] = f32_to_bf16(v[i]);
  }
}

}  // namespace
}  // namespace r1x::cpu
