// Scalar FP8 (e4m3fn) and 16-bit float conversions shared by every kernel TU. Everything has
// internal linkage (static), so each ISA's TU keeps its own copy compiled with its own flags.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace r1x::cpu {

constexpr float kFp8Max = 448.0f;
constexpr float kMinAmax = 1e-4f;
constexpr int64_t kGemmBlock = 128;

static inline uint32_t f32_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}
static inline float bits_f32(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

// fp32 -> e4m3fn, round to nearest even, saturating to +-448; NaN -> 0x7f (with sign).
static inline uint8_t f32_to_e4m3(float v) {
  const uint32_t bits = f32_bits(v);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  const uint32_t mag = bits & 0x7fffffffu;
  if (mag > 0x7f800000u) return sign | 0x7f;
  if (mag >= 0x43e00000u) return sign | 0x7e;  // >= 448 (and inf)
  if (mag < 0x3c800000u) {                     // below 2^-6: e4m3 subnormal, step 2^-9
    // mag * 2^9 is exact and < 8; nearbyint rounds half to even.
    return sign | static_cast<uint8_t>(std::nearbyint(bits_f32(mag) * 512.0f));
  }
  // Keep 3 mantissa bits with round-to-nearest-even, then rebias the exponent (127 -> 7).
  const uint32_t r = (mag + 0x7ffffu + ((mag >> 20) & 1u)) >> 20;
  return sign | static_cast<uint8_t>(r - (120u << 3));
}

static inline float e4m3_to_f32(uint8_t q) {
  const uint32_t sign = static_cast<uint32_t>(q & 0x80) << 24;
  const uint32_t e = (q >> 3) & 0xf, m = q & 0x7;
  if (e == 0xf && m == 0x7) return bits_f32(sign | 0x7fc00000u);
  if (e == 0) return bits_f32(sign | f32_bits(static_cast<float>(m) * 0.001953125f));  // m * 2^-9
  return bits_f32(sign | ((e + 120u) << 23) | (m << 20));
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

static inline uint16_t f32_to_bf16(float v) {
  const uint32_t b = f32_bits(v);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40);  // quiet NaN
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e == 0) return bits_f32(sign | f32_bits(static_cast<float>(m) * 5.9604644775390625e-8f));
  if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

static inline float load_as_f32(const void* x, int dtype, int64_t i) {
  switch (dtype) {
    case 0: return static_cast<const float*>(x)[i];
    case 1: return bf16_to_f32(static_cast<const uint16_t*>(x)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(x)[i]);
  }
}

// n fp32 values -> out as fp32 (dtype 0) or bf16 (round to nearest even).
static inline void store_row_scalar(const float* v, int64_t n, int dtype, void* out) {
  if (dtype == 0) {
    std::memcpy(out, v, static_cast<size_t>(n) * sizeof(float));
  } else {
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t j = 0; j < n; ++j) o[j] = f32_to_bf16(v[j]);
  }
}

// |v| order on fp32 bit patterns: for non-negative values integer order equals float order,
// and any NaN compares above +inf, so a running max of bit patterns propagates NaN.
static inline uint32_t abs_bits(float v) { return f32_bits(v) & 0x7fffffffu; }

}  // namespace r1x::cpu
