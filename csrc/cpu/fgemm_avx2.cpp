// AVX2 float GEMM (bf16 and fp32 operands, fp32 FMA; bf16 widened exactly on load).
//
// Forwards with a handful of rows (y's columns contiguous, m <= kDirectMaxRows) take the FMA
// kernel in dot-product form, out[i, j] = dot(x row i, y column j) with MR x NR ymm
// accumulators, x packed once to fp32 and the weights (y's columns) read in place exactly once,
// the next kNr columns prefetched a line per line consumed (short weight rows otherwise start
// every hardware stream cold: 16 experts of N = 2048, K = 1408 at one row went 5.8 -> 4.0 ms on
// Zen 4 with kNr 2 -> 4 and the prefetch).
// Everything else runs fma_avx2.h's 2 x 6 micro-kernel in the orientations of the AVX-512 bf16
// engine (fgemm_avx512.cpp):
//   T (y's columns contiguous: a @ b.T): C^T = y^T x^T, x packed once into 16-row fp32 panels,
//     the weight rows (y's columns) broadcast, staged 6 rows x one K block at a time in fp32;
//   S (otherwise): C = x y, y's rows are the panels (16 contiguous columns, converted a K block
//     at a time inside the tile) and x's rows are broadcast, staged likewise (a strided gather
//     for grad^T @ a, whose rows of x are columns of grad).
// A tile accumulates 128-wide K blocks into an fp32 tile; the next tile's weights, read in
// place, are prefetched into L2 while one computes.
#include <algorithm>

#include "cpu/fgemm.h"
#include "cpu/fma_avx2.h"

namespace r1x::cpu {
namespace {

constexpr int kVariantDirect = 1;
constexpr int kVariantT = 2;
constexpr int kVariantS = 3;
constexpr int kMr = 2, kNr = 4;           // dot-product kernel
constexpr int64_t kDirectMaxRows = 6;
constexpr int64_t kPanel = 16;            // engine: vector-operand lanes per panel (2 ymm)
constexpr int64_t kStrip = 6;             // broadcast rows per micro-kernel call
constexpr int64_t kBlock = 128;           // K per block
constexpr int64_t kStripLd = kBlock + 8;  // staged rows (floats)
constexpr int64_t kTileV = 128;           // vector-operand rows per tile (8 panels)
constexpr int64_t kTileRT = 64, kTileRS = 384;  // broadcast rows per tile (see fgemm_avx512.cpp)

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
inline int64_t padded_k(int64_t k) { return round_up(k, 8); }

// A strided matrix of kF32 or kBF16 elements.
struct View {
  const void* p;
  int64_t rs, cs, rows, cols;
  DType dt;
  float at(int64_t r, int64_t c) const { return load_as_f32(p, int(dt), r * rs + c * cs); }
  // the 8 consecutive elements in memory from (r, c) (along whichever index has stride 1), n of
  // them valid (zeros after)
  __m256 load8(int64_t r, int64_t c, int64_t n) const {
    const int64_t o = r * rs + c * cs;
    if (n >= 8) {
      if (dt == DType::kF32) return _mm256_loadu_ps(static_cast<const float*>(p) + o);
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + o));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    alignas(32) float t[8] = {};
    for (int64_t i = 0; i < n; ++i) t[i] = load_as_f32(p, int(dt), o + i);
    return _mm256_load_ps(t);
  }
};

// The engine's operands: V [nv, k] (panels), R [nr, k] (broadcast rows), C[r][v] = out[v][r]
// (T) or out[r][v] (S).
struct Oriented {
  View v, r;
  bool out_t;
};

Oriented orient(const FGemmArgs& a, int variant) {
  const View x{a.x.ptr, a.x.rs, a.x.cs, a.m, a.k, a.dtype}, yt{a.y.ptr, a.y.cs, a.y.rs, a.n, a.k, a.dtype};
  return variant == kVariantT ? Oriented{x, yt, true} : Oriented{yt, x, false};
}

// Panel rows [v0, v0 + 16) of V, columns [c0, c0 + n) -> dst[c - c0][16] (zeros past the view).
void pack_panel(const View& v, int64_t v0, int64_t c0, int64_t n, float* dst) {
  for (int64_t c = c0; c < c0 + n; c += 8) {
    const int64_t nc = std::min<int64_t>(8, c0 + n - c);
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t r0 = v0 + 8 * h, nr = std::clamp<int64_t>(v.rows - r0, 0, 8);
      __m256 t[8];
      if (v.cs == 1) {  // rows contiguous over K: 8 rows x 8 columns, transposed
        for (int i = 0; i < 8; ++i) t[i] = i < nr ? v.load8(r0 + i, c, std::min<int64_t>(nc, v.cols - c)) : _mm256_setzero_ps();
        transpose8x8(t);
      } else if (v.rs == 1) {  // the 16 rows of a column contiguous
        for (int j = 0; j < 8; ++j) t[j] = c + j < v.cols ? v.load8(r0, c + j, nr) : _mm256_setzero_ps();
      } else {
        for (int j = 0; j < 8; ++j) {
          alignas(32) float e[8] = {};
          for (int i = 0; i < nr; ++i) e[i] = c + j < v.cols ? v.at(r0 + i, c + j) : 0.0f;
          t[j] = _mm256_load_ps(e);
        }
      }
      for (int64_t j = 0; j < nc; ++j) _mm256_storeu_ps(dst + (c - c0 + j) * kPanel + 8 * h, t[j]);
    }
  }
}

inline size_t panels_bytes(int64_t nv, int64_t k) { return static_cast<size_t>(round_up(nv, kPanel) * k) * 4; }

FGemmPlan plan_avx2(const FGemmArgs& a) {
  FGemmPlan p;
  if (a.y.rs == 1 && a.m <= kDirectMaxRows) {
    p.variant = kVariantDirect;
    p.tile_m = a.m;
    p.tile_n = 32;
    p.pack_units = a.m;
    p.packed_bytes = static_cast<size_t>(a.m * padded_k(a.k)) * 4;
    p.scratch_bytes = static_cast<size_t>(p.tile_m * p.tile_n) * 4;
    return p;
  }
  p.variant = a.y.rs == 1 ? kVariantT : kVariantS;
  const Oriented o = orient(a, p.variant);
  // T packs x once (its panels); S converts y's rows a K block at a time in the tile
  p.pack_units = o.out_t ? cdiv(o.v.rows, kPanel) : 0;
  p.packed_bytes = o.out_t ? panels_bytes(o.v.rows, a.k) : 0;
  const int64_t tv = std::min(round_up(o.v.rows, kPanel), kTileV);
  const int64_t tr = std::min(round_up(o.r.rows, kStrip), o.out_t ? kTileRT : kTileRS);
  p.tile_m = o.out_t ? tv : tr;
  p.tile_n = o.out_t ? tr : tv;
  p.scratch_bytes = static_cast<size_t>(round_up(tr, kStrip) * tv + kStrip * kStripLd +
                                        (o.out_t ? 0 : tv * kBlock)) * 4 + 64;
  return p;
}

void pack_avx2(const FGemmArgs& a, const FGemmPlan& plan, int64_t u0, int64_t u1, void* packed) {
  const int64_t kp = padded_k(a.k);
  if (plan.variant == kVariantDirect) {
    for (int64_t u = u0; u < u1; ++u) {
      float* dst = static_cast<float*>(packed) + u * kp;
      for (int64_t c = 0; c < kp; c += 8) {
        const int64_t n = std::clamp<int64_t>(a.k - c, 0, 8);
        const View x{a.x.ptr, a.x.rs, a.x.cs, a.m, a.k, a.dtype};
        alignas(32) float e[8] = {};
        if (a.x.cs != 1)
          for (int64_t i = 0; i < n; ++i) e[i] = x.at(u, c + i);
        _mm256_storeu_ps(dst + c, a.x.cs == 1 ? x.load8(u, c, n) : _mm256_load_ps(e));
      }
    }
    return;
  }
  const Oriented o = orient(a, plan.variant);
  for (int64_t u = u0; u < u1; ++u) pack_panel(o.v, u * kPanel, 0, a.k, static_cast<float*>(packed) + u * kPanel * a.k);
}

void tile_engine(const FGemmArgs& a, const FGemmPlan& plan, const void* packed, int64_t m0,
                 int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx) {
  const Oriented o = orient(a, plan.variant);
  const int64_t v0 = o.out_t ? m0 : n0, v1 = o.out_t ? m1 : n1;
  const int64_t r0 = o.out_t ? n0 : m0, r1 = o.out_t ? n1 : m1;
  const int64_t rows = r1 - r0, strips = cdiv(rows, kStrip);
  const int64_t p0 = v0 / kPanel, p1 = cdiv(v1, kPanel), ldc = (p1 - p0) * kPanel;
  float* ct = static_cast<float*>(scratch);  // [strips * 6][ldc]: C
  float* stage = ct + strips * kStrip * ldc;  // [6][kStripLd]
  float* vblock = stage + kStrip * kStripLd;  // S: [panels][kBlock][16]

  // the next tile's broadcast rows, when read in place, arrive while this tile computes
  const SpreadPrefetch next = next_fgemm_rows(ctx, cdiv(a.k, kBlock) * strips);
  int64_t step = 0;

  for (int64_t c0 = 0; c0 < a.k; c0 += kBlock) {
    const int64_t nc = std::min(kBlock, a.k - c0);
    if (!o.out_t)
      for (int64_t p = p0; p < p1; ++p) pack_panel(o.v, p * kPanel, c0, nc, vblock + (p - p0) * kPanel * kBlock);
    for (int64_t s = 0; s < strips; ++s, ++step) {
      next.step(step);
      for (int64_t i = 0; i < kStrip; ++i) {  // 6 broadcast rows of this block, in fp32
        const int64_t row = r0 + s * kStrip + i;
        float* d = stage + i * kStripLd;
        if (row >= r1) {
          std::fill(d, d + nc, 0.0f);
        } else if (o.r.cs == 1) {
          for (int64_t c = 0; c < nc; c += 8) _mm256_storeu_ps(d + c, o.r.load8(row, c0 + c, std::min<int64_t>(8, nc - c)));
        } else {
          for (int64_t c = 0; c < nc; ++c) d[c] = o.r.at(row, c0 + c);
        }
      }
      for (int64_t p = p0; p < p1; ++p) {
        const float* v = o.out_t ? static_cast<const float*>(packed) + p * kPanel * a.k + c0 * kPanel
                                 : vblock + (p - p0) * kPanel * kBlock;
        float* c = ct + s * kStrip * ldc + (p - p0) * kPanel;
        if (c0 == 0) {
          fma_micro<2, kStrip, FmaEpi::kStore>(v, kPanel, stage, kStripLd, nc, c, ldc);
        } else {
          fma_micro<2, kStrip, FmaEpi::kAdd>(v, kPanel, stage, kStripLd, nc, c, ldc);
        }
      }
    }
  }
  const size_t es = a.dtype == DType::kF32 ? 4 : 2;
  char* out = static_cast<char*>(a.out);
  if (o.out_t) {  // out[v][r] = C[r][v]: 8 x 8 blocks transposed in registers
    alignas(32) float buf[8];
    for (int64_t j0 = 0; j0 < rows; j0 += 8) {
      const int64_t nj = std::min<int64_t>(8, rows - j0);
      for (int64_t i0 = 0; i0 < v1 - v0; i0 += 8) {
        __m256 t[8];
        for (int j = 0; j < 8; ++j) t[j] = j < nj ? _mm256_loadu_ps(ct + (j0 + j) * ldc + i0) : _mm256_setzero_ps();
        transpose8x8(t);
        for (int64_t i = 0; i < std::min<int64_t>(8, v1 - v0 - i0); ++i) {
          _mm256_store_ps(buf, t[i]);
          store_row_avx2(buf, nj, a.dtype, out + ((v0 + i0 + i) * a.ldo + r0 + j0) * es);
        }
      }
    }
  } else {
    for (int64_t i = 0; i < rows; ++i) store_row_avx2(ct + i * ldc, v1 - v0, a.dtype, out + ((r0 + i) * a.ldo + v0) * es);
  }
}

// ---- dot-product kernel ----------------------------------------------------------------------
// out[i * ldo + j] = dot(x row i, y column j0 + j) for i < MR, j < NR (y's columns in place).
template <bool BF16>
inline __m256 load_y8(const void* p, int64_t o) {
  if constexpr (BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + o));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(p) + o);
  }
}

template <int MR, int NR, bool BF16>
void micro(const float* x, int64_t kp, const View& y, int64_t j0, int64_t k, float* out, int64_t ldo,
           bool prefetch) {
  constexpr int64_t es = BF16 ? 2 : 4, kLine = BF16 ? 32 : 16;  // elements per cache line
  __m256 acc[MR][NR];
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  auto step = [&](const __m256* yv, int64_t p) {
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * kp + p);  // zero-padded
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, yv[j], acc[i][j]);
    }
  };
  const int64_t kf = k / 8 * 8;
  int64_t p = 0;
  const char* next = static_cast<const char*>(y.p) + (j0 + NR) * y.rs * es;  // next columns
  for (; p < kf; p += 8) {
    if (prefetch && p % kLine == 0)
      _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) __builtin_prefetch(next + (j * y.rs + p) * es, 0, 3);
    __m256 yv[NR];
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) yv[j] = load_y8<BF16>(y.p, (j0 + j) * y.rs + p);
    step(yv, p);
  }
  if (p < k) {
    __m256 yv[NR];
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) yv[j] = y.load8(j0 + j, p, k - p);
    step(yv, p);
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int j = 0; j < NR; ++j) out[i * ldo + j] = hsum(acc[i][j]);
}

template <int NR, bool BF16>
void dot_rows(const float* x, int64_t kp, int64_t tm, const View& y, int64_t j0, int64_t k, float* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + kMr <= tm; i += kMr) micro<kMr, NR, BF16>(x + i * kp, kp, y, j0, k, out + i * ldo, ldo, i + kMr >= tm);
  if (tm - i == 1) micro<1, NR, BF16>(x + i * kp, kp, y, j0, k, out + i * ldo, ldo, true);
}

template <bool BF16>
void dot_columns(const float* x, int64_t kp, int64_t tm, const View& y, int64_t n0, int64_t n1, int64_t k, float* acc, int64_t tn) {
  int64_t j = n0;
  if (tm == 1)  // one row: 8 columns at a time (8 accumulators, 8 weight streams)
    for (; j + 8 <= n1; j += 8) micro<1, 8, BF16>(x, kp, y, j, k, acc + (j - n0), tn, true);
  for (; j + kNr <= n1; j += kNr) dot_rows<kNr, BF16>(x, kp, tm, y, j, k, acc + (j - n0), tn);
  for (; j < n1; ++j) dot_rows<1, BF16>(x, kp, tm, y, j, k, acc + (j - n0), tn);
}

void tile_avx2(const FGemmArgs& a, const FGemmPlan& plan, const void* packed, int64_t m0,
               int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx) {
  if (plan.variant != kVariantDirect) return tile_engine(a, plan, packed, m0, m1, n0, n1, scratch, ctx);
  const int64_t kp = padded_k(a.k), tm = m1 - m0, tn = n1 - n0;
  const float* x = static_cast<const float*>(packed) + m0 * kp;
  float* acc = static_cast<float*>(scratch);  // [tm][tn]
  const View y{a.y.ptr, a.y.cs, 1, a.n, a.k, a.dtype};  // y's columns as rows
  if (a.dtype == DType::kBF16) dot_columns<true>(x, kp, tm, y, n0, n1, a.k, acc, tn);
  else dot_columns<false>(x, kp, tm, y, n0, n1, a.k, acc, tn);
  const size_t es = a.dtype == DType::kF32 ? 4 : 2;
  for (int64_t i = 0; i < tm; ++i)
    store_row_avx2(acc + i * tn, tn, a.dtype, static_cast<char*>(a.out) + ((m0 + i) * a.ldo + n0) * es);
}

}  // namespace

const FGemmKernels& fgemm_kernels_avx2() {
  static const FGemmKernels k{Isa::kAvx2, plan_avx2, pack_avx2, tile_avx2};
  return k;
}

}  // namespace r1x::cpu
