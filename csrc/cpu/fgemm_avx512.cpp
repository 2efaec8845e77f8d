// AVX-512 float GEMM.
//
// bf16 runs on the VDPBF16PS engine (dpbf16_avx512.h) in one of two orientations:
//   T (y's columns contiguous: the weight rows of a @ b.T, the forward): C^T = y^T x^T with x
//     VNNI-packed once per call as the vector operand and y's columns, the weights, as the
//     broadcast operand, read in place; the tile is transposed on the way out;
//   S (otherwise: grad @ b and grad^T @ a): C = x y with y VNNI-packed (pairs of its rows
//     interleaved) a K block at a time inside each tile, and x's rows broadcast, in place when
//     they are contiguous (grad @ b), else packed once per call with the reduction made
//     contiguous (grad^T @ a).
// A tile accumulates 128-wide K blocks into an fp32 tile; each block of 16 broadcast rows is
// staged at an L1-friendly stride (weight rows in place are often 4 KB apart: one L1 set) and
// used by all of the tile's vector panels. The next tile's weights, read in place, are
// prefetched into L2 while this one computes (TileCtx).
//
// fp32, and bf16 forwards with a handful of rows (decode-sized: the weights then stream from
// memory exactly once and the engine's 16-row vectors would be mostly padding), take the fp32
// FMA kernel in dot-product form: out[i, j] = dot(x row i, y column j) over all of K with
// MR x NR zmm accumulators. The rows of x are packed once per call into contiguous fp32
// [m][kp] (kp = K rounded up to 16, zero-padded). The columns of y are read straight from
// memory when they are contiguous (y.rs == 1), converting on the fly with a masked tail;
// otherwise they are packed like x.
#include "cpu/dpbf16_avx512.h"
#include "cpu/fgemm.h"

namespace r1x::cpu {
namespace {

constexpr int kVariantDirect = 1;
constexpr int kMr = 4;
constexpr int kNr = 4;

inline int64_t padded_k(int64_t k) { return (k + 15) / 16 * 16; }

// ---- bf16: the VDPBF16PS engine -------------------------------------------------------------
constexpr int kVariantEngineT = 2;         // orientation T: V = x, R = y^T (in place), C^T
constexpr int kVariantEngineS = 3;         // orientation S: V = y^T, R = x (in place)
constexpr int kVariantEngineSPackedR = 4;  // orientation S with x's rows packed
constexpr int64_t kPanel = 64;             // V rows per VNNI panel
constexpr int64_t kBlockPairs = 64;        // pairs per K block (128 elements)
constexpr int64_t kTileV = 256;            // V rows per tile (4 panels)
// R rows per tile. T: weight rows (tile_r x K bf16 are prefetched during the previous tile and
// must stay in L2 next to this tile's). S: token rows, many, so that each block of the weights
// (V) is packed and read from memory once for all the tokens of its group.
constexpr int64_t kTileRT = 64;
constexpr int64_t kTileRS = 512;
constexpr int64_t kRPad = 32;                       // packed R rows: elements of padding
constexpr int64_t kStageLd = 2 * kBlockPairs + 32;  // staged R rows (elements: 320 bytes apart)
// Up to this many rows a forward (y columns contiguous) streams the weights through the FMA
// kernel. Measured on Zen 4 (64 groups, N = 2816, K = 2048, weights from memory), FMA vs
// engine: rows 2: 23.5 vs 43.9 ms, 6: 39 vs 43, 8: 43.6 vs 43.3, 16: 70 vs 44.
constexpr int64_t kDirectMaxRows = 6;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// The engine's view of a product: V [nv, k] and R [nr, k] with C[r][v] = out[v][r] (T) or
// out[r][v] (S).
struct Oriented {
  Bf16View v, r;
  bool out_t, r_packed;
};

Oriented orient(const FGemmArgs& a, int variant) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x.ptr);
  const uint16_t* y = static_cast<const uint16_t*>(a.y.ptr);
  if (variant == kVariantEngineT)
    return {{x, a.x.rs, a.x.cs, a.m, a.k}, {y, a.y.cs, a.y.rs, a.n, a.k}, true, false};
  return {{y, a.y.cs, a.y.rs, a.n, a.k}, {x, a.x.rs, a.x.cs, a.m, a.k}, false,
          variant == kVariantEngineSPackedR};
}

inline int panel_mrv(int64_t nv, int64_t p) {
  return static_cast<int>(cdiv(std::min(kPanel, nv - p * kPanel), 16));
}
inline int64_t packed_r_ld(int64_t k) { return round_up(dp_pairs(k) * 2, 32) + kRPad; }
inline size_t v_panels_bytes(int64_t nv, int64_t k) {
  return static_cast<size_t>(cdiv(nv, kPanel) * kPanel * dp_pairs(k)) * 4;
}

FGemmPlan plan_engine(const FGemmArgs& a) {
  FGemmPlan p;
  p.variant = a.y.rs == 1 ? kVariantEngineT : a.x.cs == 1 ? kVariantEngineS : kVariantEngineSPackedR;
  const Oriented o = orient(a, p.variant);
  // T packs all of V (the activations) once; S packs V (the weights, or the activations of
  // grad^T @ a) a K block at a time inside the tiles, where it is used at once from L2
  const int64_t panels = o.out_t ? cdiv(o.v.rows, kPanel) : 0;
  const int64_t rblocks = o.r_packed ? cdiv(o.r.rows, 16) : 0;
  p.pack_units = panels + rblocks;
  p.packed_bytes = (o.out_t ? v_panels_bytes(o.v.rows, a.k) : 0) +
                   static_cast<size_t>(rblocks * 16 * packed_r_ld(a.k)) * 2;
  const int64_t tv = std::min(round_up(o.v.rows, kPanel), kTileV);
  const int64_t tr = std::min(round_up(o.r.rows, 16), o.out_t ? kTileRT : kTileRS);
  p.tile_m = o.out_t ? tv : tr;
  p.tile_n = o.out_t ? tr : tv;
  // C tile [tr][tv] fp32, the staged R rows of one K block, S: the tile's V panels of one block
  p.scratch_bytes = static_cast<size_t>(tr * tv) * 4 + 16 * kStageLd * 2 + 64 +
                    (o.out_t ? 0 : static_cast<size_t>(tv * kBlockPairs) * 4);
  return p;
}

void pack_engine(const FGemmArgs& a, const FGemmPlan& plan, int64_t u0, int64_t u1, void* packed) {
  const Oriented o = orient(a, plan.variant);
  const int64_t panels = o.out_t ? cdiv(o.v.rows, kPanel) : 0, np = dp_pairs(a.k);
  uint32_t* vbase = static_cast<uint32_t*>(packed);
  uint16_t* rbase = reinterpret_cast<uint16_t*>(static_cast<char*>(packed) +
                                                (o.out_t ? v_panels_bytes(o.v.rows, a.k) : 0));
  for (int64_t u = u0; u < u1; ++u) {
    if (u < panels) {
      pack_v_panel(o.v, u * kPanel, panel_mrv(o.v.rows, u), 0, np, vbase + u * kPanel * np);
    } else {
      const int64_t r0 = (u - panels) * 16, ld = packed_r_ld(a.k);
      pack_r_rows16(o.r, r0, rbase + r0 * ld, ld);
    }
  }
}

void tile_engine(const FGemmArgs& a, const FGemmPlan& plan, const void* packed, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx) {
  const Oriented o = orient(a, plan.variant);
  const int64_t v0 = o.out_t ? m0 : n0, v1 = o.out_t ? m1 : n1;
  const int64_t r0 = o.out_t ? n0 : m0, r1 = o.out_t ? n1 : m1;
  const int64_t np = dp_pairs(a.k), rows = r1 - r0, strips = cdiv(rows, 16);
  const int64_t p0 = v0 / kPanel, p1 = cdiv(v1, kPanel), ldc = (p1 - p0) * kPanel;
  float* ct = static_cast<float*>(scratch);                                // [strips * 16][ldc]: C
  uint16_t* stage = reinterpret_cast<uint16_t*>(ct + strips * 16 * ldc);  // [16][kStageLd]
  uint32_t* vblock = reinterpret_cast<uint32_t*>(stage + 16 * kStageLd);  // S: [panels][kBlockPairs][64]

  // R rows: packed (the reduction made contiguous), or in place
  Bf16View r = o.r;
  if (o.r_packed) {
    const int64_t ld = packed_r_ld(a.k);
    r = {reinterpret_cast<const uint16_t*>(static_cast<const char*>(packed) +
                                           (o.out_t ? v_panels_bytes(o.v.rows, a.k) : 0)),
         ld, 1, o.r.rows, a.k};
  }
  // pair q0's block of panel p: packed once per call (T) or per block here (S)
  auto vpanel = [&](int64_t p, int64_t q0) {
    return o.out_t ? static_cast<const uint32_t*>(packed) + p * kPanel * np + q0 * 16 * panel_mrv(o.v.rows, p)
                   : vblock + (p - p0) * kPanel * kBlockPairs;
  };

  // the next tile's R rows, when read in place, arrive while this tile computes
  const SpreadPrefetch next = next_fgemm_rows(ctx, cdiv(np, kBlockPairs) * strips);
  int64_t step = 0;

  for (int64_t q0 = 0; q0 < np; q0 += kBlockPairs) {
    const int64_t nq = std::min(kBlockPairs, np - q0);
    // elements of this block; an odd k's last pair is (R[k - 1], 0)
    const int64_t ne = std::min(2 * kBlockPairs, a.k - 2 * q0);
    if (!o.out_t)
      for (int64_t p = p0; p < p1; ++p)
        pack_v_panel(o.v, p * kPanel, panel_mrv(o.v.rows, p), q0, nq, vblock + (p - p0) * kPanel * kBlockPairs);
    for (int64_t s = 0; s < strips; ++s, ++step) {
      next.step(step);
      // this block of 16 R rows, staged (rows past r1: zeros)
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t row = r0 + 16 * s + i;
        uint16_t* d = stage + i * kStageLd;
        for (int64_t c = 0; c < 2 * nq; c += 32) {
          const int64_t n = std::min<int64_t>(32, ne - c);
          const __mmask32 mask = row < r1 && n > 0 ? (n >= 32 ? 0xffffffffu : (1u << n) - 1) : 0u;
          _mm512_storeu_si512(d + c, _mm512_maskz_loadu_epi16(mask, r.p + row * r.rs + 2 * q0 + c));
        }
      }
      const uint8_t* rs = reinterpret_cast<const uint8_t*>(stage);
      for (int64_t p = p0; p < p1; ++p) {
        const int mrv = panel_mrv(o.v.rows, p);
        float* c = ct + 16 * s * ldc + (p - p0) * kPanel;
        if (q0 == 0) {  // the first block writes C, the others add to it
          dp_panel<Epi::kStore>(mrv, vpanel(p, q0), 16 * mrv, rs, kStageLd * 2, 16, nq, c, ldc);
        } else {
          dp_panel<Epi::kAdd>(mrv, vpanel(p, q0), 16 * mrv, rs, kStageLd * 2, 16, nq, c, ldc);
        }
      }
    }
  }
  // out
  uint16_t* out = static_cast<uint16_t*>(a.out);
  if (o.out_t) {  // out[v][r] = C[r][v]: 16 x 16 blocks transposed in registers
    for (int64_t j0 = 0; j0 < rows; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, rows - j0);
      const __mmask16 mask = static_cast<__mmask16>(nj == 16 ? 0xffff : (1u << nj) - 1);
      for (int64_t i0 = 0; i0 < v1 - v0; i0 += 16) {
        __m512i t[16];
        for (int j = 0; j < 16; ++j) t[j] = _mm512_loadu_si512(ct + (j0 + j) * ldc + i0);
        transpose16x16_dw(t);
        const int64_t ni = std::min<int64_t>(16, v1 - v0 - i0);
        for (int64_t i = 0; i < ni; ++i)
          _mm256_mask_storeu_epi16(out + (v0 + i0 + i) * a.ldo + r0 + j0, mask,
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(t[i])));
      }
    }
  } else {
    for (int64_t i = 0; i < rows; ++i)
      store_f32_row(ct + i * ldc, v1 - v0, DType::kBF16, out + (r0 + i) * a.ldo + v0);
  }
}

// ---- fp32 FMA -------------------------------------------------------------------------------
FGemmPlan plan_avx512(const FGemmArgs& a) {
  if (a.dtype == DType::kBF16 && !(a.y.rs == 1 && a.m <= kDirectMaxRows)) return plan_engine(a);
  FGemmPlan p;
  const bool direct = a.y.rs == 1;
  p.variant = direct ? kVariantDirect : 0;
  p.tile_m = a.m < 64 ? a.m : 64;
  p.tile_n = 32;
  p.pack_units = a.m + (direct ? 0 : a.n);
  p.packed_bytes = static_cast<size_t>(p.pack_units * padded_k(a.k)) * sizeof(float);
  p.scratch_bytes = static_cast<size_t>(p.tile_m * p.tile_n) * sizeof(float);
  return p;
}

// n values at src[0], src[stride], ... -> fp32 dst[0, kp), zero-padded.
void gather_f32(const void* src, int64_t stride, DType dt, int64_t n, int64_t kp, float* dst) {
  int64_t p = 0;
  if (stride == 1) {
    for (; p + 16 <= n; p += 16) _mm512_storeu_ps(dst + p, load16_f32(src, dt, p));
  }
  for (; p < n; ++p) dst[p] = load_as_f32(src, int(dt), p * stride);
  for (; p < kp; ++p) dst[p] = 0.0f;
}

void pack_avx512(const FGemmArgs& a, const FGemmPlan& plan, int64_t u0, int64_t u1, void* packed) {
  if (plan.variant >= kVariantEngineT) return pack_engine(a, plan, u0, u1, packed);
  const int64_t kp = padded_k(a.k);
  const size_t esize = a.dtype == DType::kF32 ? 4 : 2;
  for (int64_t u = u0; u < u1; ++u) {
    float* dst = static_cast<float*>(packed) + u * kp;
    if (u < a.m) {
      gather_f32(static_cast<const char*>(a.x.ptr) + u * a.x.rs * esize, a.x.cs, a.dtype, a.k, kp, dst);
    } else {
      gather_f32(static_cast<const char*>(a.y.ptr) + (u - a.m) * a.y.cs * esize, a.y.rs, a.dtype,
                 a.k, kp, dst);
    }
  }
}

// Sources of the NR columns of y: 16 consecutive p of column j.
struct PackedCols {
  const float* base;
  int64_t kp;
  __m512 load(int64_t j, int64_t p) const { return _mm512_loadu_ps(base + j * kp + p); }
  __m512 load_tail(int64_t j, int64_t p, __mmask16) const { return load(j, p); }  // zero-padded
  static constexpr int64_t kLine = 0;  // packed: nothing to prefetch
  void prefetch(int64_t, int64_t) const {}
};
struct DirectF32 {
  const float* base;
  int64_t stride;
  __m512 load(int64_t j, int64_t p) const { return _mm512_loadu_ps(base + j * stride + p); }
  __m512 load_tail(int64_t j, int64_t p, __mmask16 m) const {
    return _mm512_maskz_loadu_ps(m, base + j * stride + p);
  }
  static constexpr int64_t kLine = 16;  // elements per cache line
  void prefetch(int64_t j, int64_t p) const { __builtin_prefetch(base + j * stride + p, 0, 3); }
};
struct DirectBF16 {
  const uint16_t* base;
  int64_t stride;
  static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  __m512 load(int64_t j, int64_t p) const {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + j * stride + p)));
  }
  __m512 load_tail(int64_t j, int64_t p, __mmask16 m) const {
    return widen(_mm256_maskz_loadu_epi16(m, base + j * stride + p));
  }
  static constexpr int64_t kLine = 32;
  void prefetch(int64_t j, int64_t p) const { __builtin_prefetch(base + j * stride + p, 0, 3); }
};

// out[i * ldo + j] = dot(x row i, column j) for i < MR, j < NR.
// With `prefetch`, the next NR columns are requested a line for each line of these consumed
// (short weight rows would otherwise start every hardware stream cold).
template <int MR, int NR, class Src>
void micro(const float* x, int64_t kp, const Src& src, int64_t j0, int64_t k, float* out,
           int64_t ldo, bool prefetch = false) {
  __m512 acc[MR][NR];
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t kfull = k / 16 * 16;
  for (int64_t p = 0; p < kfull; p += 16) {
    if constexpr (Src::kLine > 0) {
      if (prefetch && p % Src::kLine == 0)
        _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) src.prefetch(j0 + NR + j, p);
    }
    __m512 yv[NR];
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) yv[j] = src.load(j0 + j, p);
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * kp + p);
      _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, yv[j], acc[i][j]);
    }
  }
  if (kfull < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - kfull)) - 1);
    __m512 yv[NR];
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) yv[j] = src.load_tail(j0 + j, kfull, m);
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * kp + kfull);  // zero-padded
      _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, yv[j], acc[i][j]);
    }
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < NR; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int NR, class Src>
void rows(const float* x, int64_t kp, int64_t tm, const Src& src, int64_t j0, int64_t k,
          float* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + kMr <= tm; i += kMr) micro<kMr, NR>(x + i * kp, kp, src, j0, k, out + i * ldo, ldo, i == 0);
  switch (tm - i) {
    case 3: micro<3, NR>(x + i * kp, kp, src, j0, k, out + i * ldo, ldo, i == 0); break;
    case 2: micro<2, NR>(x + i * kp, kp, src, j0, k, out + i * ldo, ldo, i == 0); break;
    case 1: micro<1, NR>(x + i * kp, kp, src, j0, k, out + i * ldo, ldo, i == 0); break;
    default: break;
  }
}

template <class Src>
void tile_with(const FGemmArgs& a, const float* x, int64_t tm, const Src& src, int64_t n0,
               int64_t n1, float* acc) {
  const int64_t kp = padded_k(a.k), tn = n1 - n0;
  for (int64_t j = n0; j < n1; j += kNr) {
    float* out = acc + (j - n0);
    switch (n1 - j < kNr ? n1 - j : kNr) {
      case 4: rows<4>(x, kp, tm, src, j, a.k, out, tn); break;
      case 3: rows<3>(x, kp, tm, src, j, a.k, out, tn); break;
      case 2: rows<2>(x, kp, tm, src, j, a.k, out, tn); break;
      default: rows<1>(x, kp, tm, src, j, a.k, out, tn); break;
    }
  }
}

void tile_avx512(const FGemmArgs& a, const FGemmPlan& plan, const void* packed, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx) {
  if (plan.variant >= kVariantEngineT) return tile_engine(a, plan, packed, m0, m1, n0, n1, scratch, ctx);
  const int64_t kp = padded_k(a.k), tm = m1 - m0, tn = n1 - n0;
  const float* x = static_cast<const float*>(packed) + m0 * kp;
  float* acc = static_cast<float*>(scratch);  // [tm][tn]
  if (plan.variant != kVariantDirect) {
    tile_with(a, x, tm, PackedCols{static_cast<const float*>(packed) + a.m * kp, kp}, n0, n1, acc);
  } else if (a.dtype == DType::kF32) {
    tile_with(a, x, tm, DirectF32{static_cast<const float*>(a.y.ptr), a.y.cs}, n0, n1, acc);
  } else {
    tile_with(a, x, tm, DirectBF16{static_cast<const uint16_t*>(a.y.ptr), a.y.cs}, n0, n1, acc);
  }
  const size_t esize = a.dtype == DType::kF32 ? 4 : 2;
  for (int64_t i = 0; i < tm; ++i)
    store_f32_row(acc + i * tn, tn, a.dtype, static_cast<char*>(a.out) + ((m0 + i) * a.ldo + n0) * esize);
}

}  // namespace

const FGemmKernels& fgemm_kernels_avx512() {
  static const FGemmKernels k{Isa::kAvx512, plan_avx512, pack_avx512, tile_avx512};
  return k;
}

}  // namespace r1x::cpu
