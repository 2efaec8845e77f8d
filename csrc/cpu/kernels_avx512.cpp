// AVX-512 kernels (F/BW/VL/DQ/VBMI + AVX512_BF16). The GEMM decodes e4m3 to bf16 with
// Bf16Decoder and multiplies with vdpbf16ps (pairs of bf16 products summed into fp32 lanes).
// e4m3 x e4m3 products are exact in fp32, so the only rounding inside a 128-wide K block is
// the fp32 accumulation; each block's sums are scaled and added to fp32 accumulators.
#include "cpu/avx512_util.h"

namespace r1x::cpu {
namespace {

float amax_avx512(const void* x, DType dtype, int64_t n) { return amax_avx512_impl(x, dtype, n); }
void quantize_avx512(const void* x, DType dtype, int64_t n, float scale, uint8_t* q) {
  quantize_avx512_impl(x, dtype, n, scale, q);
}
void dequantize_avx512(const uint8_t* q, int64_t n, float scale, float* out) {
  dequantize_avx512_impl(q, n, scale, out);
}

constexpr int kMr = 2;
constexpr int kNr = 4;

// Plan: A decoded once to bf16 [m, k]; a tile decodes kNr rows of B over all of k into
// scratch (bf16), then sweeps its rows of A with kMr x kNr register accumulators.
GemmPlan plan_avx512(int64_t m, int64_t n, int64_t k) {
  GemmPlan p;
  p.tile_m = m < 128 ? m : 128;
  p.tile_n = 32;
  p.pack_rows = 1;
  p.packed_a_bytes = static_cast<size_t>(m * k) * 2;
  p.scratch_bytes = static_cast<size_t>(p.tile_m * p.tile_n) * 4 + static_cast<size_t>(kNr * k) * 2;
  return p;
}

void pack_a_avx512(const GemmArgs& args, const GemmPlan&, int64_t m0, int64_t m1, void* packed) {
  const Bf16Decoder dec;
  dec.decode_row(args.a + m0 * args.k, (m1 - m0) * args.k,
                 static_cast<uint16_t*>(packed) + m0 * args.k);
}

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// acc[i * NR + j] = sum over k of a[i] . b[j] with per-block scales; b rows share one n-block.
template <int MR, int NR>
inline void micro(const uint16_t* a, const uint16_t* b, int64_t k, const float* sa,
                  const float* sb, float* out /*[MR][NR]*/) {
  const int64_t kblocks = k / kGemmBlock;
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    __m512 blk[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) blk[i][j] = _mm512_setzero_ps();
    for (int64_t c = kb * kGemmBlock; c < (kb + 1) * kGemmBlock; c += 32) {
      __m512i bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = _mm512_loadu_si512(b + j * k + c);
      for (int i = 0; i < MR; ++i) {
        const __m512i av = _mm512_loadu_si512(a + i * k + c);
        for (int j = 0; j < NR; ++j) blk[i][j] = _mm512_dpbf16_ps(blk[i][j], as_bh(av), as_bh(bv[j]));
      }
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 s = _mm512_set1_ps(sa[i * kblocks + kb] * sb[kb]);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(blk[i][j], s, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * NR + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int NR>
inline void rows_of_b(const GemmArgs& args, const uint16_t* a, int64_t m0, int64_t m1, int64_t n,
                      int64_t n0, int64_t tn, const uint16_t* bbuf, float* acc) {
  const int64_t k = args.k, kblocks = k / kGemmBlock;
  const float* sb = args.b_scale + (n / kGemmBlock) * kblocks;
  float d[kMr * NR];
  int64_t m = m0;
  for (; m + kMr <= m1; m += kMr) {
    micro<kMr, NR>(a + m * k, bbuf, k, args.a_scale + m * kblocks, sb, d);
    for (int i = 0; i < kMr; ++i)
      for (int j = 0; j < NR; ++j) acc[(m + i - m0) * tn + (n + j - n0)] = d[i * NR + j];
  }
  for (; m < m1; ++m) {
    micro<1, NR>(a + m * k, bbuf, k, args.a_scale + m * kblocks, sb, d);
    for (int j = 0; j < NR; ++j) acc[(m - m0) * tn + (n + j - n0)] = d[j];
  }
}

void tile_avx512(const GemmArgs& args, const GemmPlan& plan, const void* packed, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, void* scratch) {
  const Bf16Decoder dec;
  const uint16_t* a = static_cast<const uint16_t*>(packed);
  const int64_t k = args.k, tn = n1 - n0;
  float* acc = static_cast<float*>(scratch);
  uint16_t* bbuf = reinterpret_cast<uint16_t*>(acc + plan.tile_m * plan.tile_n);
  int64_t n = n0;
  // tile_n divides 128 and is a multiple of kNr: kNr rows never straddle a scale block.
  for (; n + kNr <= n1; n += kNr) {
    dec.decode_row(args.b + n * k, kNr * k, bbuf);
    rows_of_b<kNr>(args, a, m0, m1, n, n0, tn, bbuf, acc);
  }
  for (; n < n1; ++n) {
    dec.decode_row(args.b + n * k, k, bbuf);
    rows_of_b<1>(args, a, m0, m1, n, n0, tn, bbuf, acc);
  }
  const size_t esize = args.out_dtype == DType::kF32 ? 4 : 2;
  for (int64_t m = m0; m < m1; ++m)
    store_f32_row(acc + (m - m0) * tn, tn, args.out_dtype,
                  static_cast<char*>(args.out) + (m * args.n + n0) * esize);
}

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels k{Isa::kAvx512, amax_avx512, quantize_avx512, dequantize_avx512,
                         plan_avx512,  pack_a_avx512, tile_avx512};
  return k;
}

}  // namespace r1x::cpu
