// AVX2 + FMA + F16C kernels. e4m3 is decoded to fp32 through fp16 (fma_avx2.h's
// decode32_f32: the value times 2^-8, exactly); the 2^8 goes into the scales.
#include <immintrin.h>

#include <algorithm>

#include "cpu/fma_avx2.h"

namespace r1x::cpu {
namespace {

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

void dequantize_avx2(const uint8_t* q, int64_t n, float scale, float* out) {
  const __m256 unscale = _mm256_set1_ps(kE4m3Unscale), sc = _mm256_set1_ps(scale);
  int64_t i = 0;
  // (q * 2^-8) * 2^8 is exact, so the product with the scale rounds exactly as q * scale.
  for (; i + 32 <= n; i += 32) {
    __m256 v[4];
    decode32_f32(q + i, v);
    for (int g = 0; g < 4; ++g) _mm256_storeu_ps(out + i + 8 * g, _mm256_mul_ps(_mm256_mul_ps(v[g], unscale), sc));
  }
  for (; i < n; ++i) out[i] = e4m3_to_f32(q[i]) * scale;
}

// ---- GEMM -------------------------------------------------------------------------------
// Two engines, as on the avx512 path (kernels_avx512.cpp), on fp32 FMA:
// * decode-sized batches (m <= kFusedMaxRows) stream the weights exactly once with the decode
//   fused into dot products: A'[m, k] = a[m, k] * a_scale[m, kb] * b_scale[nb, kb] * 2^8
//   (a tile of n rows lies inside one 128-row weight block; the 2^8 undoes decode32_f32's
//   2^-8), so out[m, n] = sum_k A'[m, k] * b'[n, k] is one fp32 dot product over all of K;
// * larger ones run C^T = B A^T on fma_micro: A decoded and packed once per call into panels
//   of 16 rows ([k][16] fp32), the weights decoded 6 rows x one K block at a time into L1
//   (the broadcast operand), per-128-K partial sums promoted with a_scale * b_scale (DeepGEMM's
//   promotion); the next tile's weights are prefetched into L2 while one computes.
constexpr int kVariantFused = 1;
constexpr int kVariantEngine = 2;
constexpr int64_t kFusedMaxRows = 8;
constexpr int64_t kPanel = 16;    // A rows per panel (2 ymm)
constexpr int64_t kStrip = 6;     // weight rows per micro-kernel call (NR)
constexpr int64_t kStripLd = kGemmBlock + 8;  // decoded strip rows (floats)
constexpr int64_t kTileM = 128;   // A rows per tile (8 panels)
constexpr int64_t kTileNMax = 128;
// e4m3 bytes of a tile's weights (prefetched into L2) where weight streaming is the bound (a
// single A panel); larger batches keep 128 columns a tile (see kernels_avx512.cpp)
constexpr int64_t kTileBytes = 384 << 10;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
inline size_t panels_bytes(int64_t m, int64_t k) { return static_cast<size_t>(round_up(m, kPanel) * k) * 4; }

GemmPlan plan_avx2(int64_t m, int64_t n, int64_t k) {
  GemmPlan p;
  if (m <= kFusedMaxRows) {
    p.variant = kVariantFused;
    p.tile_m = m;
    p.tile_n = 32;  // divides 128: a tile never straddles a weight block
    p.pack_rows = 1;
    p.packed_a_bytes = static_cast<size_t>(m * k) * 4;
    p.scratch_bytes = static_cast<size_t>(m * k + m * p.tile_n) * 4;
    return p;
  }
  p.variant = kVariantEngine;
  const int64_t mp = round_up(m, kPanel);
  p.pack_rows = kPanel;
  p.packed_a_bytes = panels_bytes(m, k) + static_cast<size_t>(mp * (k / kGemmBlock)) * 4;
  p.tile_m = std::min(mp, kTileM);
  int64_t tn = kTileNMax;
  while (m <= kPanel && tn > 16 && tn * k > kTileBytes) tn /= 2;
  p.tile_n = tn;
  p.scratch_bytes = static_cast<size_t>(kStrip * kStripLd + round_up(tn, kStrip) * p.tile_m) * 4;
  return p;
}

// Fused: A decoded once to exact fp32. Engine: A decoded and transposed into panels
// [k][16] (rows past m: zeros), then the scales transposed, [k / 128][round_up(m, 16)].
void pack_a_avx2(const GemmArgs& args, const GemmPlan& plan, int64_t m0, int64_t m1, void* packed) {
  const int64_t k = args.k;
  const __m256 unscale = _mm256_set1_ps(kE4m3Unscale);
  if (plan.variant == kVariantFused) {
    float* dst = static_cast<float*>(packed) + m0 * k;
    decode_row_f32_avx2(args.a + m0 * k, (m1 - m0) * k, dst);
    for (int64_t i = 0; i < (m1 - m0) * k; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_loadu_ps(dst + i), unscale));
    return;
  }
  const int64_t kblocks = k / kGemmBlock, mp = round_up(args.m, kPanel);
  float* at = reinterpret_cast<float*>(static_cast<char*>(packed) + panels_bytes(args.m, k));
  for (int64_t p = m0 / kPanel; p < cdiv(m1, kPanel); ++p) {
    float* panel = static_cast<float*>(packed) + p * kPanel * k;
    for (int64_t half = 0; half < 2; ++half) {  // 8 rows -> one vector of each k
      for (int64_t c = 0; c < k; c += 32) {
        __m256 rows[8][4];
        for (int r = 0; r < 8; ++r) {
          const int64_t row = p * kPanel + 8 * half + r;
          if (row < args.m) {
            decode32_f32(args.a + row * k + c, rows[r]);
          } else {
            for (int g = 0; g < 4; ++g) rows[r][g] = _mm256_setzero_ps();
          }
        }
        for (int g = 0; g < 4; ++g) {
          __m256 t[8];
          for (int r = 0; r < 8; ++r) t[r] = _mm256_mul_ps(rows[r][g], unscale);
          transpose8x8(t);  // t[j]: element c + 8g + j of the 8 rows
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(panel + (c + 8 * g + j) * kPanel + 8 * half, t[j]);
        }
      }
    }
    for (int64_t row = p * kPanel; row < (p + 1) * kPanel; ++row)
      for (int64_t kb = 0; kb < kblocks; ++kb)
        at[kb * mp + row] = row < args.m ? args.a_scale[row * kblocks + kb] : 0.0f;
  }
}

// out[i][j] = dot(as row i, b row n0 + j) for MR rows of A' and NR weight rows, decoding each
// weight row's 32 bytes once for all MR rows.
template <int MR, int NR>
inline void fused_rows(const float* as, const uint8_t* b, int64_t k, float* out, int64_t ldo) {
  __m256 acc[MR][NR];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k; c += 32) {
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) {
      const uint8_t* src = b + j * k + c;
      _mm_prefetch(reinterpret_cast<const char*>(src) + 2048, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(src) + 8192, _MM_HINT_T1);
      __m256 v[4];
      decode32_f32(src, v);
      _Pragma("GCC unroll 4") for (int g = 0; g < 4; ++g)
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
          acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(as + i * k + c + 8 * g), v[g], acc[i][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) out[i * ldo + j] = hsum(acc[i][j]);
}

template <int MR>
inline void fused_tile(const float* as, const GemmArgs& args, int64_t n0, int64_t n1, float* acc,
                       int64_t tn) {
  constexpr int NR = MR <= 2 ? 4 : MR <= 4 ? 2 : 1;
  const int64_t k = args.k;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) fused_rows<MR, NR>(as, args.b + n * k, k, acc + (n - n0), tn);
  for (; n < n1; ++n) fused_rows<MR, 1>(as, args.b + n * k, k, acc + (n - n0), tn);
}

void tile_fused(const GemmArgs& args, const void* packed, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1, void* scratch) {
  const float* a = static_cast<const float*>(packed);
  const int64_t k = args.k, kblocks = k / kGemmBlock, tm = m1 - m0, tn = n1 - n0;
  float* as = static_cast<float*>(scratch);  // [tm][k]: A with both scales (and 2^8) folded in
  float* acc = as + tm * k;                  // [tm][tn]
  const float* sb = args.b_scale + (n0 / kGemmBlock) * kblocks;
  for (int64_t i = 0; i < tm; ++i) {
    const float* sa = args.a_scale + (m0 + i) * kblocks;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const __m256 s = _mm256_set1_ps(sa[kb] * sb[kb] * kE4m3Unscale);
      for (int64_t c = kb * kGemmBlock; c < (kb + 1) * kGemmBlock; c += 8)
        _mm256_storeu_ps(as + i * k + c, _mm256_mul_ps(_mm256_loadu_ps(a + (m0 + i) * k + c), s));
    }
  }
  switch (tm) {
    case 1: fused_tile<1>(as, args, n0, n1, acc, tn); break;
    case 2: fused_tile<2>(as, args, n0, n1, acc, tn); break;
    case 3: fused_tile<3>(as, args, n0, n1, acc, tn); break;
    case 4: fused_tile<4>(as, args, n0, n1, acc, tn); break;
    case 5: fused_tile<5>(as, args, n0, n1, acc, tn); break;
    case 6: fused_tile<6>(as, args, n0, n1, acc, tn); break;
    case 7: fused_tile<7>(as, args, n0, n1, acc, tn); break;
    default: fused_tile<8>(as, args, n0, n1, acc, tn); break;
  }
  const size_t esize = args.out_dtype == DType::kF32 ? 4 : 2;
  for (int64_t i = 0; i < tm; ++i)
    store_row_avx2(acc + i * tn, tn, args.out_dtype, static_cast<char*>(args.out) + ((m0 + i) * args.n + n0) * esize);
}

void tile_avx2(const GemmArgs& args, const GemmPlan& plan, const void* packed, int64_t m0,
               int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx) {
  if (plan.variant == kVariantFused) return tile_fused(args, packed, m0, m1, n0, n1, scratch);
  const int64_t m = args.m, k = args.k, kblocks = k / kGemmBlock, mp = round_up(m, kPanel);
  const int64_t rows = n1 - n0, strips = cdiv(rows, kStrip);
  const float* at = reinterpret_cast<const float*>(static_cast<const char*>(packed) + panels_bytes(m, k));
  const float* sb = args.b_scale + (n0 / kGemmBlock) * kblocks;
  const int64_t p0 = m0 / kPanel, p1 = cdiv(m1, kPanel), ldc = (p1 - p0) * kPanel;
  float* bd = static_cast<float*>(scratch);  // [kStrip][kStripLd]: decoded weights (* 2^-8)
  float* ct = bd + kStrip * kStripLd;        // [strips * kStrip][ldc]: C^T

  const SpreadPrefetch next = next_fp8_weights(ctx, kblocks * strips);
  int64_t step = 0;

  std::memset(ct, 0, static_cast<size_t>(strips * kStrip * ldc) * 4);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const float s1 = sb[kb] * kE4m3Unscale;
    for (int64_t s = 0; s < strips; ++s, ++step) {
      const int64_t r0 = n0 + s * kStrip, r1 = std::min(n1, r0 + kStrip);
      for (int64_t r = r0; r < r1; ++r)
        decode_row_f32_avx2(args.b + r * k + kb * kGemmBlock, kGemmBlock, bd + (r - r0) * kStripLd);
      for (int64_t r = r1 - r0; r < kStrip; ++r) std::memset(bd + r * kStripLd, 0, kGemmBlock * 4);
      next.step(step);
      for (int64_t p = p0; p < p1; ++p) {
        const float* panel = static_cast<const float*>(packed) + p * kPanel * k + kb * kGemmBlock * kPanel;
        fma_micro<2, kStrip, FmaEpi::kScaleAdd>(panel, kPanel, bd, kStripLd, kGemmBlock,
                                               ct + s * kStrip * ldc + (p - p0) * kPanel, ldc,
                                               at + kb * mp + p * kPanel, s1);
      }
    }
  }
  // out[m0 + i][n0 + j] = ct[j][i]: 8 x 8 blocks transposed in registers
  const size_t esize = args.out_dtype == DType::kF32 ? 4 : 2;
  alignas(32) float buf[8][8];
  for (int64_t j0 = 0; j0 < rows; j0 += 8) {
    const int64_t nj = std::min<int64_t>(8, rows - j0);
    for (int64_t i0 = 0; i0 < m1 - m0; i0 += 8) {
      __m256 t[8];
      for (int j = 0; j < 8; ++j) t[j] = j < nj ? _mm256_loadu_ps(ct + (j0 + j) * ldc + i0) : _mm256_setzero_ps();
      transpose8x8(t);
      const int64_t ni = std::min<int64_t>(8, m1 - m0 - i0);
      for (int64_t i = 0; i < ni; ++i) {
        _mm256_store_ps(buf[i], t[i]);
        store_row_avx2(buf[i], nj, args.out_dtype,
                       static_cast<char*>(args.out) + ((m0 + i0 + i) * args.n + n0 + j0) * esize);
      }
    }
  }
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
