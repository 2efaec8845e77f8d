// AVX-512 kernels (F/BW/VL/DQ/VBMI + AVX512_BF16).
//
// The FP8 GEMM has two engines:
//
// * decode-sized batches (m <= kFusedMaxRows) stream the weights exactly once with the e4m3
//   decode fused into fp32 FMA dot products. The scales are folded into A: a tile of n rows lies
//   inside one 128-row weight block, so A'[m, k] = a[m, k] * a_scale[m, kb] * b_scale[nb, kb]
//   (one fp32 rounding) makes out[m, n] = sum_k A'[m, k] * b[n, k] a plain fp32 dot product over
//   all of K whose rounding matches per-block promotion to within fp32 accumulation error.
//   Within every 64 values of K, A and B are both held in decode64_f32_perm's lane order (dot
//   products do not care), which lets B be decoded with unpacks rather than byte permutes.
//
// * everything larger runs on the VDPBF16PS engine (dpbf16_avx512.h), transposed: C^T = B A^T
//   with A (the activations, decoded to bf16 and VNNI-packed once per call) as the vector
//   operand and the decoded weight rows as the broadcast operand, so the large operand is only
//   decoded, never transposed. Every e4m3 value is exactly a bf16 value and the product of two
//   is exact in fp32, so each 128-wide K block is an fp32 sum of exact products; its partial
//   sums are promoted into fp32 accumulators with a_scale[m, kb] * b_scale[nb, kb] (DeepGEMM's
//   promotion). Small batches (one A panel) decode a tile's weight rows over all of K first, in
//   memory order, while the next tile's rows are prefetched; larger ones decode one K block of
//   the tile's rows at a time and reuse it across up to 256 rows of A.
#include <algorithm>
#include <cstring>

#include "cpu/dpbf16_avx512.h"

namespace r1x::cpu {
namespace {

float amax_avx512(const void* x, DType dtype, int64_t n) { return amax_avx512_impl(x, dtype, n); }
void quantize_avx512(const void* x, DType dtype, int64_t n, float scale, uint8_t* q) {
  quantize_avx512_impl(x, dtype, n, scale, q);
}
void dequantize_avx512(const uint8_t* q, int64_t n, float scale, float* out) {
  dequantize_avx512_impl(q, n, scale, out);
}

// ---- decode-sized batches: fused decode + fp32 FMA dot products ----------------------------
constexpr int kVariantFused = 1;  // (also what kernels_amx.cpp's plan sets for its small batches)
// Up to 8 rows (fused_tile's limit) the fused FMA path is faster than the engine, whose 16-row
// vectors would be mostly padding (measured on Zen 4: M = 3: 0.61 vs 1.52 ms, M = 8: 1.65 vs
// 1.89 ms for N = 7168, K = 2048).
constexpr int64_t kFusedMaxRows = 8;

GemmPlan plan_fused(int64_t m, int64_t k) {
  GemmPlan p;
  p.tile_m = m;
  p.tile_n = 32;  // divides 128: a tile never straddles a weight block
  p.pack_rows = 1;
  p.packed_a_bytes = static_cast<size_t>(m * k) * 4;
  p.scratch_bytes = static_cast<size_t>(p.tile_m * k + p.tile_m * p.tile_n) * 4;
  p.variant = kVariantFused;
  return p;
}

// A decoded once to exact fp32 values.
void pack_a_fused(const GemmArgs& args, int64_t m0, int64_t m1, void* packed) {
  const E4m3Decoder dec;
  dec.decode_row_f32(args.a + m0 * args.k, (m1 - m0) * args.k,
                     static_cast<float*>(packed) + m0 * args.k);
}

// Decode fused into the dot products (no B buffer), for tiles of at most two rows of A: B
// is read exactly once, straight from memory, NR rows (NR streams) at a time.
template <int MR, int NR>
inline void fused_rows(const E4m3Decoder& dec, const float* as, const uint8_t* b, int64_t k,
                       float* out, int64_t ldo) {
  __m512 acc[MR][NR];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 64) {
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) {
      const uint8_t* src = b + j * k + c;
      _mm_prefetch(reinterpret_cast<const char*>(src) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(src) + 4 * kPrefetchBytes, _MM_HINT_T1);
      __m512 v[4];
      dec.decode64_f32_perm(src, v);
      _Pragma("GCC unroll 4") for (int g = 0; g < 4; ++g)
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
          acc[i][j] = _mm512_fmadd_ps(_mm512_loadu_ps(as + i * k + c + 16 * g), v[g], acc[i][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// NR weight rows per pass: MR x NR accumulators plus four decoded vectors stay in registers.
template <int MR>
inline void fused_tile(const E4m3Decoder& dec, const float* as, const GemmArgs& args, int64_t n0,
                       int64_t n1, float* acc, int64_t tn) {
  constexpr int NR = MR <= 4 ? 4 : 2;
  const int64_t k = args.k;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) fused_rows<MR, NR>(dec, as, args.b + n * k, k, acc + (n - n0), tn);
  for (; n < n1; ++n) fused_rows<MR, 1>(dec, as, args.b + n * k, k, acc + (n - n0), tn);
}

void tile_fused(const GemmArgs& args, const void* packed, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1, void* scratch) {
  const E4m3Decoder dec;
  const float* a = static_cast<const float*>(packed);
  const int64_t k = args.k, kblocks = k / kGemmBlock, tm = m1 - m0, tn = n1 - n0;
  float* as = static_cast<float*>(scratch);  // [tm][k]: A with both scales folded in
  float* acc = as + tm * k;                  // [tm][tn]
  const float* sb = args.b_scale + (n0 / kGemmBlock) * kblocks;
  for (int64_t i = 0; i < tm; ++i) {
    const float* src = a + (m0 + i) * k;
    const float* sa = args.a_scale + (m0 + i) * kblocks;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const __m512 s = _mm512_set1_ps(sa[kb] * sb[kb]);
      for (int64_t c = kb * kGemmBlock; c < (kb + 1) * kGemmBlock; c += 64) {
        __m512 v[4], pv[4];
        for (int g = 0; g < 4; ++g) v[g] = _mm512_mul_ps(_mm512_loadu_ps(src + c + 16 * g), s);
        permute64_f32(v, pv);  // the order B is decoded in
        for (int g = 0; g < 4; ++g) _mm512_storeu_ps(as + i * k + c + 16 * g, pv[g]);
      }
    }
  }
  switch (tm) {
    case 1: fused_tile<1>(dec, as, args, n0, n1, acc, tn); break;
    case 2: fused_tile<2>(dec, as, args, n0, n1, acc, tn); break;
    case 3: fused_tile<3>(dec, as, args, n0, n1, acc, tn); break;
    case 4: fused_tile<4>(dec, as, args, n0, n1, acc, tn); break;
    case 5: fused_tile<5>(dec, as, args, n0, n1, acc, tn); break;
    case 6: fused_tile<6>(dec, as, args, n0, n1, acc, tn); break;
    case 7: fused_tile<7>(dec, as, args, n0, n1, acc, tn); break;
    default: fused_tile<8>(dec, as, args, n0, n1, acc, tn); break;
  }
  const size_t esize = args.out_dtype == DType::kF32 ? 4 : 2;
  for (int64_t i = 0; i < tm; ++i)
    store_f32_row(acc + i * tn, tn, args.out_dtype,
                  static_cast<char*>(args.out) + ((m0 + i) * args.n + n0) * esize);
}

// ---- everything else: the VDPBF16PS engine, C^T = B A^T -------------------------------------
constexpr int kVariantEngine = 2;
constexpr int64_t kPanel = 64;  // rows of A per VNNI panel (4 vectors of 16)
constexpr int64_t kPairsPerBlock = kGemmBlock / 2;
constexpr int64_t kStrip = 16;  // weight rows decoded at a time (one K block of them: 4 KB of bf16)
// Decoded rows are padded by 64 bytes, so that the rows one micro-kernel broadcasts from do not
// fall into the same L1 sets.
constexpr int64_t kRowStride = kGemmBlock + 32;
// A tile's e4m3 weight rows (tile_n x K bytes) are prefetched into L2 during the thread's
// previous tile; where weight streaming is the bound (one A panel) the two tiles' rows stay
// within about half of a 1-2 MB L2. Larger batches are bound by the products and keep 128
// columns a tile whatever K is: each tile re-reads its rows of A (256 x K bf16), which narrow
// tiles would multiply (tile_n = 16 at K = 16384 ran at 0.68x bf16 matmul).
constexpr int64_t kTileBytes = 384 << 10;
constexpr int64_t kTileM = 256;  // rows of A per tile: each tile decodes its weight rows once
constexpr int64_t kTileNMax = 128;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
inline int panel_mrv(int64_t m, int64_t p) {
  return static_cast<int>(cdiv(std::min(kPanel, m - p * kPanel), 16));
}

// Packed A: panel p (rows 64p ..) at p * 64 * k bf16, [k / 2 pairs][16 * mrv] dwords; then the
// scales transposed, [k / 128][round_up(m, 64)] (zero for padding rows).
inline size_t panels_bytes(int64_t m, int64_t k) {
  return static_cast<size_t>(round_up(m, kPanel) * k) * 2;
}

GemmPlan plan_avx512(int64_t m, int64_t n, int64_t k) {
  if (m <= kFusedMaxRows) return plan_fused(m, k);
  GemmPlan p;
  p.variant = kVariantEngine;
  const int64_t mp = round_up(m, kPanel);
  p.pack_rows = kPanel;
  p.packed_a_bytes = panels_bytes(m, k) + static_cast<size_t>(mp * (k / kGemmBlock)) * 4;
  p.tile_m = std::min(mp, kTileM);
  int64_t tn = kTileNMax;
  while (m <= kPanel && tn > kStrip && tn * k > kTileBytes) tn /= 2;
  p.tile_n = tn;
  p.scratch_bytes = static_cast<size_t>(kStrip * kRowStride) * 2 + static_cast<size_t>(tn * p.tile_m) * 4;
  return p;
}

void pack_a_avx512(const GemmArgs& args, const GemmPlan& plan, int64_t m0, int64_t m1, void* packed) {
  if (plan.variant == kVariantFused) return pack_a_fused(args, m0, m1, packed);
  const E4m3Decoder dec;
  const int64_t m = args.m, k = args.k, kblocks = k / kGemmBlock, mp = round_up(m, kPanel);
  uint16_t* base = static_cast<uint16_t*>(packed);
  float* at = reinterpret_cast<float*>(static_cast<char*>(packed) + panels_bytes(m, k));
  for (int64_t p = m0 / kPanel; p < cdiv(m1, kPanel); ++p) {
    const int mrv = panel_mrv(m, p);
    uint32_t* panel = reinterpret_cast<uint32_t*>(base + p * kPanel * k);
    for (int v = 0; v < mrv; ++v) {
      for (int64_t k64 = 0; k64 < k; k64 += 64) {
        // 16 rows x 64 k: decoded (pairs in decode64_perm's order, as B's), then transposed so
        // that pair q of the 16 rows is one vector
        __m512i lo[16], hi[16];
        for (int r = 0; r < 16; ++r) {
          const int64_t row = p * kPanel + v * 16 + r;
          if (row < m) {
            dec.decode64_perm(args.a + row * k + k64, lo[r], hi[r]);
          } else {
            lo[r] = hi[r] = _mm512_setzero_si512();
          }
        }
        transpose16x16_dw(lo);
        transpose16x16_dw(hi);
        uint32_t* dst = panel + (k64 / 2) * 16 * mrv + 16 * v;
        for (int q = 0; q < 16; ++q) {
          _mm512_storeu_si512(dst + q * 16 * mrv, lo[q]);
          _mm512_storeu_si512(dst + (16 + q) * 16 * mrv, hi[q]);
        }
      }
    }
    for (int64_t row = p * kPanel; row < (p + 1) * kPanel; ++row)
      for (int64_t kb = 0; kb < kblocks; ++kb)
        at[kb * mp + row] = row < m ? args.a_scale[row * kblocks + kb] : 0.0f;
  }
}

// out[m0 + i][n0 + j] = ct[j][i] for i < tm, j < tn (ct rows ldc floats apart): 16 x 16 blocks
// transposed in registers.
inline void store_transposed(const float* ct, int64_t ldc, int64_t tm, int64_t tn,
                             const GemmArgs& args, int64_t m0, int64_t n0) {
  const bool f32 = args.out_dtype == DType::kF32;
  for (int64_t j0 = 0; j0 < tn; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, tn - j0);
    const __mmask16 mask = static_cast<__mmask16>(nj == 16 ? 0xffff : (1u << nj) - 1);
    for (int64_t i0 = 0; i0 < tm; i0 += 16) {
      __m512i v[16];
      for (int j = 0; j < 16; ++j)
        v[j] = j < nj ? _mm512_loadu_si512(ct + (j0 + j) * ldc + i0) : _mm512_setzero_si512();
      transpose16x16_dw(v);
      const int64_t ni = std::min<int64_t>(16, tm - i0);
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t o = (m0 + i0 + i) * args.n + n0 + j0;
        const __m512 x = _mm512_castsi512_ps(v[i]);
        if (f32) {
          _mm512_mask_storeu_ps(static_cast<float*>(args.out) + o, mask, x);
        } else {
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(args.out) + o, mask,
                                   (__m256i)_mm512_cvtneps_pbh(x));
        }
      }
    }
  }
}

void tile_avx512(const GemmArgs& args, const GemmPlan& plan, const void* packed, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx) {
  if (plan.variant == kVariantFused) return tile_fused(args, packed, m0, m1, n0, n1, scratch);
  const E4m3Decoder dec;
  const int64_t m = args.m, k = args.k, kblocks = k / kGemmBlock, mp = round_up(m, kPanel);
  const int64_t rows = n1 - n0, strips = cdiv(rows, kStrip);
  const uint16_t* panels = static_cast<const uint16_t*>(packed);
  const float* at = reinterpret_cast<const float*>(static_cast<const char*>(packed) + panels_bytes(m, k));
  const float* sb = args.b_scale + (n0 / kGemmBlock) * kblocks;
  const int64_t p0 = m0 / kPanel, p1 = cdiv(m1, kPanel), ldc = (p1 - p0) * kPanel;
  uint16_t* bd = static_cast<uint16_t*>(scratch);                           // [kStrip][kRowStride]
  float* ct = reinterpret_cast<float*>(bd + kStrip * kRowStride);           // [strips * 16][ldc]: C^T

  // The next tile's weight rows (contiguous in B) are prefetched into L2 a slice per step, so
  // they arrive while this tile computes; this tile's were, during the previous one (else the
  // first K block waits for memory).
  const SpreadPrefetch next = next_fp8_weights(ctx, kblocks * strips);
  int64_t step = 0;

  std::memset(ct, 0, static_cast<size_t>(strips * kStrip * ldc) * 4);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    for (int64_t s = 0; s < strips; ++s, ++step) {
      // one K block of 16 weight rows -> bf16 (rows past n1: zeros), used at once from L1
      const int64_t r0 = n0 + s * kStrip, r1 = std::min(n1, r0 + kStrip);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* src = args.b + r * k + kb * kGemmBlock;
        uint16_t* d = bd + (r - r0) * kRowStride;
        for (int64_t j = 0; j < kGemmBlock; j += 64) {
          __m512i o0, o1;
          dec.decode64_perm(src + j, o0, o1);
          _mm512_storeu_si512(d + j, o0);
          _mm512_storeu_si512(d + j + 32, o1);
        }
      }
      for (int64_t r = r1 - r0; r < kStrip; ++r) std::memset(bd + r * kRowStride, 0, kGemmBlock * 2);
      next.step(step);
      for (int64_t p = p0; p < p1; ++p) {
        const int mrv = panel_mrv(m, p);
        const uint32_t* panel = reinterpret_cast<const uint32_t*>(panels + p * kPanel * k);
        dp_panel<Epi::kScaleAdd>(mrv, panel + kb * kPairsPerBlock * 16 * mrv, 16 * mrv,
                                 reinterpret_cast<const uint8_t*>(bd), kRowStride * 2, kStrip,
                                 kPairsPerBlock, ct + s * kStrip * ldc + (p - p0) * kPanel, ldc,
                                 at + kb * mp + p * kPanel, sb[kb]);
      }
    }
  }
  store_transposed(ct, ldc, m1 - m0, rows, args, m0, n0);
}

// 12 independent VDPBF16PS chains (more than latency x throughput on current cores).
double peak_avx512(int64_t iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(0.001f * i);
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);
  for (int64_t it = 0; it < iters; ++it) {
    _Pragma("GCC unroll 12") for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));  // keeps the loop from being folded
  }
  __m512 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return 64.0 * 12 * static_cast<double>(iters);
}

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels k{Isa::kAvx512, amax_avx512,   quantize_avx512, dequantize_avx512,
                         plan_avx512,  pack_a_avx512, tile_avx512,     peak_avx512,
                         "bf16 VDPBF16PS"};
  return k;
}

}  // namespace r1x::cpu
