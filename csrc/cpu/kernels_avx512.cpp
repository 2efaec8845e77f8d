// AVX-512 kernels (F/BW/VL/DQ/VBMI + AVX512_BF16).
//
// Within every 64 values of K, A and B are both held in decode64_f32_perm's lane order (dot
// products do not care), which lets B be decoded with unpacks rather than byte permutes.
//
// The GEMM runs on fp32 FMA: on current x86 cores a 512-bit FMA retires every cycle while
// vdpbf16ps (the bf16 pair dot product) takes several, so decoding e4m3 to fp32 and using
// FMA does more work per cycle. The scales are folded into A instead of promoting per-block
// partial sums: a tile of n rows lies inside one 128-row weight block, so
// A'[m, k] = a[m, k] * a_scale[m, kb] * b_scale[nb, kb] (one fp32 rounding) makes
// out[m, n] = sum_k A'[m, k] * b[n, k], a plain fp32 dot product over all of K whose
// rounding matches per-block promotion (DeepGEMM's) to within fp32 accumulation error.
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

constexpr int kMr = 4;
constexpr int kNr = 4;

GemmPlan plan_avx512(int64_t m, int64_t n, int64_t k) {
  GemmPlan p;
  p.tile_m = m < 64 ? m : 64;
  p.tile_n = 32;  // divides 128: a tile never straddles a weight block
  p.pack_rows = 1;
  p.packed_a_bytes = static_cast<size_t>(m * k) * 4;
  p.scratch_bytes = static_cast<size_t>(p.tile_m * k + kNr * k + p.tile_m * p.tile_n) * 4;
  return p;
}

// A decoded once to exact fp32 values.
void pack_a_avx512(const GemmArgs& args, const GemmPlan&, int64_t m0, int64_t m1, void* packed) {
  const E4m3Decoder dec;
  dec.decode_row_f32(args.a + m0 * args.k, (m1 - m0) * args.k,
                     static_cast<float*>(packed) + m0 * args.k);
}

// out[i][j] = dot(a[i], b[j]) over k, fp32 FMA with MR x NR accumulators.
template <int MR, int NR>
inline void micro(const float* a, const float* b, int64_t k, float* out, int64_t ldo) {
  __m512 acc[MR][NR];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 16) {
    __m512 bv[NR];
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) bv[j] = _mm512_loadu_ps(b + j * k + c);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * k + c);
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int NR>
inline void rows_of_b(const float* as, int64_t tm, int64_t k, const float* bbuf, float* acc,
                      int64_t tn) {
  int64_t i = 0;
  for (; i + kMr <= tm; i += kMr) micro<kMr, NR>(as + i * k, bbuf, k, acc + i * tn, tn);
  switch (tm - i) {
    case 3: micro<3, NR>(as + i * k, bbuf, k, acc + i * tn, tn); break;
    case 2: micro<2, NR>(as + i * k, bbuf, k, acc + i * tn, tn); break;
    case 1: micro<1, NR>(as + i * k, bbuf, k, acc + i * tn, tn); break;
    default: break;
  }
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

template <int MR>
inline void fused_tile(const E4m3Decoder& dec, const float* as, const GemmArgs& args, int64_t n0,
                       int64_t n1, float* acc, int64_t tn) {
  const int64_t k = args.k;
  int64_t n = n0;
  for (; n + kNr <= n1; n += kNr) fused_rows<MR, kNr>(dec, as, args.b + n * k, k, acc + (n - n0), tn);
  for (; n < n1; ++n) fused_rows<MR, 1>(dec, as, args.b + n * k, k, acc + (n - n0), tn);
}

void tile_avx512(const GemmArgs& args, const GemmPlan& plan, const void* packed, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, void* scratch) {
  const E4m3Decoder dec;
  const float* a = static_cast<const float*>(packed);
  const int64_t k = args.k, kblocks = k / kGemmBlock, tm = m1 - m0, tn = n1 - n0;
  float* as = static_cast<float*>(scratch);  // [tm][k]: A with both scales folded in
  float* bbuf = as + plan.tile_m * k;        // [kNr][k]: decoded rows of B
  float* acc = bbuf + kNr * k;               // [tm][tn]
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
  if (tm == 2) {
    fused_tile<2>(dec, as, args, n0, n1, acc, tn);
  } else if (tm == 1) {
    fused_tile<1>(dec, as, args, n0, n1, acc, tn);
  } else {
    for (int64_t n = n0; n < n1; n += kNr) {
      const int64_t rows = n1 - n < kNr ? n1 - n : kNr;
      dec.decode_row_f32<true>(args.b + n * k, rows * k, bbuf);  // the rows are contiguous
      float* out = acc + (n - n0);
      switch (rows) {
        case 4: rows_of_b<4>(as, tm, k, bbuf, out, tn); break;
        case 3: rows_of_b<3>(as, tm, k, bbuf, out, tn); break;
        case 2: rows_of_b<2>(as, tm, k, bbuf, out, tn); break;
        default: rows_of_b<1>(as, tm, k, bbuf, out, tn); break;
      }
    }
  }
  const size_t esize = args.out_dtype == DType::kF32 ? 4 : 2;
  for (int64_t i = 0; i < tm; ++i)
    store_f32_row(acc + i * tn, tn, args.out_dtype,
                  static_cast<char*>(args.out) + ((m0 + i) * args.n + n0) * esize);
}

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels k{Isa::kAvx512, amax_avx512, quantize_avx512, dequantize_avx512,
                         plan_avx512,  pack_a_avx512, tile_avx512};
  return k;
}

}  // namespace r1x::cpu
