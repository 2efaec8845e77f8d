// AVX2 + FMA + F16C kernels. e4m3 is decoded to fp32 through fp16: the 7 magnitude bits of
// an e4m3 byte shifted left by 7 form an fp16 whose value is the e4m3 value times 2^-8
// (normals and subnormals alike), which F16C converts exactly; the 2^8 goes into the scales.
#include <immintrin.h>

#include "cpu/fp8_scalar.h"
#include "cpu/kernels.h"

namespace r1x::cpu {
namespace {

constexpr float kDecodeUnscale = 256.0f;  // decoded value * 2^8 = true value

inline __m256 load8_f32(const void* x, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kF32: return _mm256_loadu_ps(static_cast<const float*>(x) + i);
    case DType::kBF16: {
      const __m128i h = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default:
      return _mm256_cvtph_ps(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
  }
}

float amax_avx2(const void* x, DType dtype, int64_t n) {
  const __m256i mag_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i b = _mm256_and_si256(_mm256_castps_si256(load8_f32(x, dtype, i)), mag_mask);
    m = _mm256_max_epi32(m, b);  // magnitudes are < 2^31: signed max is unsigned max
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m);
  uint32_t r = 0;
  for (int j = 0; j < 8; ++j) r = lanes[j] > r ? lanes[j] : r;
  for (; i < n; ++i) {
    const uint32_t b = abs_bits(load_as_f32(x, int(dtype), i));
    r = b > r ? b : r;
  }
  return bits_f32(r);
}

// 8 fp32 -> 8 e4m3 bytes in the low 64 bits (same rules as f32_to_e4m3).
inline __m128i f32x8_to_e4m3(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
  const __m256i mag = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  __m256i normal = _mm256_add_epi32(
      mag, _mm256_add_epi32(_mm256_set1_epi32(0x7ffff),
                            _mm256_and_si256(_mm256_srli_epi32(mag, 20), _mm256_set1_epi32(1))));
  normal = _mm256_sub_epi32(_mm256_srli_epi32(normal, 20), _mm256_set1_epi32(120 << 3));
  const __m256i sub = _mm256_cvtps_epi32(
      _mm256_mul_ps(_mm256_castsi256_ps(mag), _mm256_set1_ps(512.0f)));  // RNE
  __m256i r = _mm256_blendv_epi8(normal, sub,
                                 _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3c800000), mag));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7e),
                         _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x43dfffff)));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7f),
                         _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f800000)));
  r = _mm256_or_si256(r, sign);
  // Byte 0 of each dword -> the low 4 bytes of each 128-bit lane, then join the lanes.
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, -1);
  r = _mm256_shuffle_epi8(r, pick);
  r = _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  return _mm256_castsi256_si128(r);
}

void quantize_avx2(const void* x, DType dtype, int64_t n, float scale, uint8_t* q) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i),
                     f32x8_to_e4m3(_mm256_div_ps(load8_f32(x, dtype, i), s)));
  }
  for (; i < n; ++i) q[i] = f32_to_e4m3(load_as_f32(x, int(dtype), i) / scale);
}

// 8 e4m3 bytes -> 8 fp32 holding value * 2^-8 (NaN stays NaN).
inline __m256 decode8(const uint8_t* p) {
  const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i mag = _mm_and_si128(w, _mm_set1_epi16(0x7f));
  __m128i h = _mm_or_si128(_mm_slli_epi16(mag, 7),
                           _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
  h = _mm_blendv_epi8(h, _mm_set1_epi16(0x7e00), _mm_cmpeq_epi16(mag, _mm_set1_epi16(0x7f)));
  return _mm256_cvtph_ps(h);
}

void dequantize_avx2(const uint8_t* q, int64_t n, float scale, float* out) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 unscale = _mm256_set1_ps(kDecodeUnscale);
  int64_t i = 0;
  // (q * 2^-8) * 2^8 is exact, so the product with the scale rounds exactly as q * scale.
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(decode8(q + i), unscale), s));
  for (; i < n; ++i) out[i] = e4m3_to_f32(q[i]) * scale;
}

// ---- GEMM: fp32 FMA. A is decoded once to fp32 (true values). Per tile, B rows are decoded
// 128 at a time into a buffer (values * 2^-8) and dotted with kMr rows of A at once.
constexpr int kMr = 4;
constexpr int kNr = 2;

GemmPlan plan_avx2(int64_t m, int64_t n, int64_t k) {
  GemmPlan p;
  p.tile_m = m < 64 ? m : 64;
  p.tile_n = 32;
  p.pack_rows = 1;
  p.packed_a_bytes = static_cast<size_t>(m * k) * sizeof(float);
  p.scratch_bytes = static_cast<size_t>(p.tile_m * p.tile_n + kNr * kGemmBlock) * sizeof(float);
  return p;
}

void pack_a_avx2(const GemmArgs& args, const GemmPlan&, int64_t m0, int64_t m1, void* packed) {
  float* dst = static_cast<float*>(packed);
  const __m256 unscale = _mm256_set1_ps(kDecodeUnscale);
  for (int64_t i = m0 * args.k; i < m1 * args.k; i += 8)  // k % 128 == 0
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(decode8(args.a + i), unscale));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int MR, int NR>
inline void block_dots(const float* a, int64_t lda, const float* b, float* out /*[MR][NR]*/) {
  __m256 acc[MR][NR];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  _Pragma("GCC unroll 16") for (int64_t kk = 0; kk < kGemmBlock; kk += 8) {
    __m256 bv[NR];
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) bv[j] = _mm256_loadu_ps(b + j * kGemmBlock + kk);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_loadu_ps(a + i * lda + kk);
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) out[i * NR + j] = hsum(acc[i][j]);
}

template <int NR>
void tile_rows(const GemmArgs& args, const float* a, int64_t m0, int64_t m1, int64_t n,
               int64_t n0, int64_t tn, float* acc, float* bbuf) {
  const int64_t k = args.k, kblocks = k / kGemmBlock;
  const float* sb = args.b_scale + (n / kGemmBlock) * kblocks;
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j)
      for (int64_t i = 0; i < kGemmBlock; i += 8)
        _mm256_storeu_ps(bbuf + j * kGemmBlock + i,
                         decode8(args.b + (n + j) * k + kb * kGemmBlock + i));
    const float sbk = sb[kb] * kDecodeUnscale;
    int64_t m = m0;
    float d[kMr * NR];
    for (; m + kMr <= m1; m += kMr) {
      block_dots<kMr, NR>(a + m * k + kb * kGemmBlock, k, bbuf, d);
      _Pragma("GCC unroll 8") for (int i = 0; i < kMr; ++i) {
        const float s = args.a_scale[(m + i) * kblocks + kb] * sbk;
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[(m + i - m0) * tn + (n + j - n0)] += s * d[i * NR + j];
      }
    }
    for (; m < m1; ++m) {
      block_dots<1, NR>(a + m * k + kb * kGemmBlock, k, bbuf, d);
      const float s = args.a_scale[m * kblocks + kb] * sbk;
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[(m - m0) * tn + (n + j - n0)] += s * d[j];
    }
  }
}

void tile_avx2(const GemmArgs& args, const GemmPlan& plan, const void* packed, int64_t m0,
               int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx&) {
  const float* a = static_cast<const float*>(packed);
  const int64_t tn = n1 - n0;
  float* acc = static_cast<float*>(scratch);
  float* bbuf = acc + plan.tile_m * plan.tile_n;
  for (int64_t i = 0; i < (m1 - m0) * tn; ++i) acc[i] = 0.0f;
  int64_t n = n0;
  // tile_n is a multiple of kNr and divides 128, so a row pair never straddles a scale block.
  for (; n + kNr <= n1; n += kNr) tile_rows<kNr>(args, a, m0, m1, n, n0, tn, acc, bbuf);
  for (; n < n1; ++n) tile_rows<1>(args, a, m0, m1, n, n0, tn, acc, bbuf);
  const size_t esize = args.out_dtype == DType::kF32 ? 4 : 2;
  for (int64_t m = m0; m < m1; ++m)
    store_row_scalar(acc + (m - m0) * tn, tn, int(args.out_dtype),
                     static_cast<char*>(args.out) + (m * args.n + n0) * esize);
}

// 12 independent fp32 FMA chains (more than latency x throughput on current cores).
double peak_avx2(int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(0.001f * i);
  __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.9999999f);
  for (int64_t it = 0; it < iters; ++it) {
    _Pragma("GCC unroll 12") for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(a, acc[i], b);
    __asm__ volatile("" : "+x"(a));  // keeps the loop from being folded
  }
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  volatile float sink = hsum(s);
  (void)sink;
  return 16.0 * 12 * static_cast<double>(iters);
}

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels k{Isa::kAvx2, amax_avx2,   quantize_avx2, dequantize_avx2,
                         plan_avx2,  pack_a_avx2, tile_avx2,     peak_avx2,
                         "fp32 FMA (AVX2)"};
  return k;
}

}  // namespace r1x::cpu
