// AMX bf16 GEMM (TDPBF16PS, fp32 accumulation in the tile registers); fp32 operands and
// decode-sized products take the AVX-512 FMA kernels.
//
// The tile unit computes C' = X' Y' from row-major X' tiles [16 rows][32 p] and "VNNI" Y'
// tiles [16 p-pairs][16 cols][2]. Two orientations cover every stride pattern:
//   mode N: X' = x,   Y' = y,   C' = out;
//   mode T: X' = y^T, Y' = x^T, C' = out^T (when y's columns are contiguous, as the weight
//           rows of a @ b.T are: X' tiles then load straight from the weights in memory).
// Y' is packed once per call into VNNI tiles (pair interleave when its rows are contiguous,
// a 16x16 dword transpose when its columns are); X' is read in place when its rows are
// contiguous, else packed too. K is zero-padded to a multiple of 32 in every packed tile, and
// tiles that would read past the end of an operand are copied into zero-padded scratch.
#include <cstring>

#include "cpu/amx_util.h"
#include "cpu/avx512_util.h"
#include "cpu/fgemm.h"

namespace r1x::cpu {
namespace {

constexpr int64_t kT = 16;    // tile rows
constexpr int64_t kC = 32;    // p (bf16 elements) per tile product
constexpr int64_t kTileElems = kT * kC;  // 512 bf16 = 1 KB
constexpr int kVariantFma = 1;
constexpr int kModeT = 2;
constexpr int kXDirect = 4;
// Y' much larger than X' (the weights of grad_a = grad @ b): instead of one packed copy of
// all of Y' per call (a second pass over the weights through memory), each tile packs the
// 32-column panel of Y' it needs into scratch, and the tile spans all rows of X'.
constexpr int kYPanel = 8;
constexpr int64_t kPanel = 128;  // Y' columns per panel
constexpr int64_t kCopyXMinCols = 128;  // see tile_amx
constexpr int64_t kKBlock = 8;   // p-chunks per K block (256 p: 16 KB of X' tiles)

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

// The product in tile-unit orientation.
struct Core {
  MatView xv, yv;  // X' [mi, k], Y' [k, nj]
  int64_t mi, nj, pc;
  bool trans, xdirect;
  const uint16_t* packed_y;  // [nj / 16][pc] VNNI tiles
  const uint16_t* packed_x;  // [mi / 16][pc] row-major tiles (when not direct)
};

Core core_of(const FGemmArgs& a, const FGemmPlan& plan, const void* packed) {
  Core c;
  c.trans = plan.variant & kModeT;
  c.xdirect = plan.variant & kXDirect;
  c.xv = c.trans ? a.y.t() : a.x;
  c.yv = c.trans ? a.x.t() : a.y;
  c.mi = c.trans ? a.n : a.m;
  c.nj = c.trans ? a.m : a.n;
  c.pc = cdiv(a.k, kC);
  c.packed_y = static_cast<const uint16_t*>(packed);
  c.packed_x = c.packed_y + (plan.variant & kYPanel ? 0 : cdiv(c.nj, kT)) * c.pc * kTileElems;
  return c;
}

FGemmPlan plan_amx(const FGemmArgs& a) {
  // fp32 operands, and decode-sized products whose y columns are contiguous (the forward
  // a @ b.T: the FMA kernel then streams the weights once, unpacked) take the AVX-512 kernel
  if (a.dtype != DType::kBF16 || (a.y.rs == 1 && (a.m <= 2 || a.n <= 2))) {
    FGemmPlan p = fgemm_kernels_avx512().plan(a);
    p.variant = p.variant * 8 + kVariantFma;  // the avx512 variant rides in the upper bits
    return p;
  }
  FGemmPlan p;
  const bool trans = a.y.rs == 1;
  const MatView xv = trans ? a.y.t() : a.x;
  const bool direct = xv.cs == 1;
  p.variant = (trans ? kModeT : 0) | (direct ? kXDirect : 0);
  const int64_t mi = trans ? a.n : a.m, nj = trans ? a.m : a.n, pc = cdiv(a.k, kC);
  const MatView yv = trans ? a.x.t() : a.y;
  const bool panel = yv.cs == 1 && nj > 4 * mi;
  if (panel) p.variant |= kYPanel;
  const int64_t yblocks = panel ? 0 : cdiv(nj, kT), xblocks = direct ? 0 : cdiv(mi, kT);
  p.pack_units = yblocks + xblocks;
  p.packed_bytes = static_cast<size_t>((yblocks + xblocks) * pc * kTileElems) * 2;
  // tiles: 64 rows of X' (its two 32-row blocks stay in L2 while all of Y' streams by), and
  // up to 256 columns of Y'; with Y' panels, 32 columns and up to 256 rows of X'
  const int64_t ti = panel ? (mi <= 256 ? round_up(mi, 32) : 256) : 64;
  const int64_t tj = panel ? kPanel : (nj <= 256 ? round_up(nj, 32) : 256);
  p.tile_m = trans ? tj : ti;
  p.tile_n = trans ? ti : tj;
  p.scratch_bytes = static_cast<size_t>(round_up(tj, 32) / 32) * 4096  // C tiles per column block
                    + static_cast<size_t>(2 * pc) * kTileElems * 2  // X' edge tiles
                    + static_cast<size_t>(2 * pc) * (sizeof(void*) + sizeof(int64_t))
                    + (panel ? static_cast<size_t>(kPanel / kT * pc) * kTileElems * 2 + 64 : 0);
  return p;
}

inline uint16_t at16(const MatView& v, int64_t r, int64_t c) {
  return static_cast<const uint16_t*>(v.ptr)[r * v.rs + c * v.cs];
}

// 16x16 dwords: dst[r][c] = src[c][r] (src 64-byte aligned).
inline void transpose16_dw(const uint32_t* src, uint32_t* dst) {
  const __m512i base = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64,
                                        48, 32, 16, 0);
  for (int r = 0; r < 16; ++r)
    _mm512_storeu_si512(dst + r * 16, _mm512_i32gather_epi32(
                                          _mm512_add_epi32(base, _mm512_set1_epi32(r)), src, 4));
}

// Two rows of up to 16 bf16 (`valid` of them; r1 may be null: zeros) -> 16 dwords
// (r0[j], r1[j]) pairs.
inline __m512i interleave_rows(const uint16_t* r0, const uint16_t* r1, int64_t valid) {
  const __mmask16 m = static_cast<__mmask16>(valid >= 16 ? 0xffff : (1u << valid) - 1);
  const __m256i a = r0 ? _mm256_maskz_loadu_epi16(m, r0) : _mm256_setzero_si256();
  const __m256i b = r1 ? _mm256_maskz_loadu_epi16(m, r1) : _mm256_setzero_si256();
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// VNNI tile of Y' for columns j0.. (nvalid of them) and p0..p0+31: dst[pp][j] =
// (Y'(p0 + 2pp, j0 + j), Y'(p0 + 2pp + 1, j0 + j)).
void pack_y_tile(const MatView& y, int64_t k, int64_t p0, int64_t j0, int64_t nvalid, uint32_t* dst) {
  const uint16_t* base = static_cast<const uint16_t*>(y.ptr);
  if (y.cs == 1) {
    for (int64_t pp = 0; pp < 16; ++pp) {
      const int64_t p = p0 + 2 * pp;
      const uint16_t* r0 = p < k ? base + p * y.rs + j0 : nullptr;
      const uint16_t* r1 = p + 1 < k ? base + (p + 1) * y.rs + j0 : nullptr;
      _mm512_storeu_si512(dst + pp * 16, interleave_rows(r0, r1, nvalid));
    }
  } else if (y.rs == 1) {
    alignas(64) uint32_t tmp[16 * 16];  // [j][pp]
    const int64_t pv = k - p0 < kC ? k - p0 : kC;
    const __mmask32 m = pv >= 32 ? 0xffffffffu : (1u << pv) - 1;
    for (int64_t j = 0; j < 16; ++j) {
      const __m512i v = j < nvalid ? _mm512_maskz_loadu_epi16(m, base + (j0 + j) * y.cs + p0)
                                   : _mm512_setzero_si512();
      _mm512_store_si512(tmp + j * 16, v);
    }
    transpose16_dw(tmp, dst);
  } else {
    for (int64_t pp = 0; pp < 16; ++pp)
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t p = p0 + 2 * pp;
        const uint32_t lo = j < nvalid && p < k ? at16(y, p, j0 + j) : 0;
        const uint32_t hi = j < nvalid && p + 1 < k ? at16(y, p + 1, j0 + j) : 0;
        dst[pp * 16 + j] = lo | (hi << 16);
      }
  }
}

// Row-major tile of X' for rows i0.. (mvalid of them) and p0..p0+31, zero-padded.
void pack_x_tile(const MatView& x, int64_t k, int64_t p0, int64_t i0, int64_t mvalid, uint16_t* dst) {
  const uint16_t* base = static_cast<const uint16_t*>(x.ptr);
  const int64_t pv = k - p0 < kC ? k - p0 : kC;
  if (x.cs == 1) {
    const __mmask32 m = pv >= 32 ? 0xffffffffu : (1u << pv) - 1;
    for (int64_t i = 0; i < 16; ++i) {
      const __m512i v = i < mvalid ? _mm512_maskz_loadu_epi16(m, base + (i0 + i) * x.rs + p0)
                                   : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + i * kC, v);
    }
  } else if (x.rs == 1) {
    // rows p of X' are contiguous in i: interleave p-pairs (dwords [pp][i]), then transpose
    alignas(64) uint32_t tmp[16 * 16];
    for (int64_t pp = 0; pp < 16; ++pp) {
      const int64_t p = p0 + 2 * pp;
      const uint16_t* r0 = p < k ? base + p * x.cs + i0 : nullptr;
      const uint16_t* r1 = p + 1 < k ? base + (p + 1) * x.cs + i0 : nullptr;
      _mm512_store_si512(tmp + pp * 16, interleave_rows(r0, r1, mvalid));
    }
    transpose16_dw(tmp, reinterpret_cast<uint32_t*>(dst));
  } else {
    for (int64_t i = 0; i < 16; ++i)
      for (int64_t p = 0; p < kC; ++p)
        dst[i * kC + p] = i < mvalid && p < pv ? at16(x, i0 + i, p0 + p) : 0;
  }
}

// The VNNI tiles of Y' columns j0..j0+nvalid-1 (nvalid <= kPanel) for every p-chunk, rows
// contiguous (y.cs == 1): dst [kPanel / 16][pc] tiles. Rows are read in memory order,
// kPanel * 2 bytes each, with the next rows prefetched (a column panel of a row-major matrix
// is a strided walk the hardware prefetchers follow poorly).
void pack_y_panel(const MatView& y, int64_t k, int64_t j0, int64_t nvalid, int64_t pc, uint16_t* dst) {
  const uint16_t* base = static_cast<const uint16_t*>(y.ptr);
  // (r0[j], r1[j]) for j = 0..15 and 16..31, from the concatenation r0 | r1
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  constexpr int64_t kAhead = 8;  // row pairs
  for (int64_t p = 0; p < pc * kC; p += 2) {
    if (p + 2 * kAhead + 1 < k) {
      for (int64_t g = 0; g < nvalid; g += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(base + (p + 2 * kAhead) * y.rs + j0 + g), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(base + (p + 2 * kAhead + 1) * y.rs + j0 + g), _MM_HINT_T0);
      }
    }
    uint16_t* t0 = dst + (p / kC) * kTileElems + (p % kC) / 2 * 32;
    for (int64_t g = 0; g < nvalid; g += 32) {
      const int64_t left = nvalid - g;
      const __mmask32 m = left >= 32 ? 0xffffffffu : (1u << left) - 1;
      const __m512i r0 = p < k ? _mm512_maskz_loadu_epi16(m, base + p * y.rs + j0 + g) : _mm512_setzero_si512();
      const __m512i r1 = p + 1 < k ? _mm512_maskz_loadu_epi16(m, base + (p + 1) * y.rs + j0 + g) : _mm512_setzero_si512();
      uint16_t* t = t0 + (g / kT) * pc * kTileElems;
      _mm512_store_si512(t, _mm512_permutex2var_epi16(r0, lo, r1));
      _mm512_store_si512(t + pc * kTileElems, _mm512_permutex2var_epi16(r0, hi, r1));
    }
  }
}

// Rows r0..r0+rows-1 of X' (contiguous in p) -> pc row-major tiles [16][32], zero-padded.
void copy_x_rows(const MatView& x, int64_t k, int64_t r0, int64_t rows, int64_t pc, uint16_t* dst) {
  const uint16_t* base = static_cast<const uint16_t*>(x.ptr);
  for (int64_t i = 0; i < kT; ++i) {
    const uint16_t* src = base + (r0 + i) * x.rs;
    for (int64_t q = 0; q < pc; ++q) {
      const int64_t pv = k - q * kC < kC ? k - q * kC : kC;
      const __mmask32 m = i < rows ? (pv >= 32 ? 0xffffffffu : (1u << pv) - 1) : 0;
      _mm512_storeu_si512(dst + q * kTileElems + i * kC, _mm512_maskz_loadu_epi16(m, src + q * kC));
    }
  }
}

void pack_amx(const FGemmArgs& a, const FGemmPlan& plan, int64_t u0, int64_t u1, void* packed) {
  if (plan.variant & kVariantFma) {
    FGemmPlan inner = plan;
    inner.variant = plan.variant / 8;
    return fgemm_kernels_avx512().pack(a, inner, u0, u1, packed);
  }
  const Core c = core_of(a, plan, packed);
  const int64_t yblocks = plan.variant & kYPanel ? 0 : cdiv(c.nj, kT);
  for (int64_t u = u0; u < u1; ++u) {
    if (u < yblocks) {
      uint16_t* dst = const_cast<uint16_t*>(c.packed_y) + u * c.pc * kTileElems;
      const int64_t nvalid = c.nj - u * kT < kT ? c.nj - u * kT : kT;
      for (int64_t q = 0; q < c.pc; ++q)
        pack_y_tile(c.yv, a.k, q * kC, u * kT, nvalid, reinterpret_cast<uint32_t*>(dst + q * kTileElems));
    } else {
      const int64_t ib = u - yblocks;
      uint16_t* dst = const_cast<uint16_t*>(c.packed_x) + ib * c.pc * kTileElems;
      const int64_t mvalid = c.mi - ib * kT < kT ? c.mi - ib * kT : kT;
      for (int64_t q = 0; q < c.pc; ++q) pack_x_tile(c.xv, a.k, q * kC, ib * kT, mvalid, dst + q * kTileElems);
    }
  }
}

// C'[32 x 32] block (MI x NJ tiles of 16 x 16) over p-chunks [q0, q0 + qn), accumulated onto
// the C tiles at acc (zeros when `first`). xp/xs: X' tile pointers and strides per chunk
// (second tile row pc entries on); y0: Y' tiles per chunk (second column block pc tiles on).
template <int MI, int NJ>
void block(const uint16_t* const* xp, const int64_t* xs, const uint16_t* y0, int64_t pc,
           int64_t q0, int64_t qn, bool first, float* acc) {
  if (first) {
    _tile_zero(0);
    if constexpr (NJ == 2) _tile_zero(1);
    if constexpr (MI == 2) _tile_zero(2);
    if constexpr (MI == 2 && NJ == 2) _tile_zero(3);
  } else {
    _tile_loadd(0, acc, 64);
    if constexpr (NJ == 2) _tile_loadd(1, acc + 256, 64);
    if constexpr (MI == 2) _tile_loadd(2, acc + 512, 64);
    if constexpr (MI == 2 && NJ == 2) _tile_loadd(3, acc + 768, 64);
  }
  // Tile registers are not renamed: a load into a tile waits for every product still reading
  // it. Each operand of the next chunk is loaded right after its last use in this one, so the
  // loads run under the remaining products instead of stalling the unit.
  const int64_t q1 = q0 + qn;
  _tile_loadd(4, xp[q0], xs[q0]);
  _tile_loadd(6, y0 + q0 * kTileElems, 64);
  if constexpr (NJ == 2) _tile_loadd(7, y0 + (pc + q0) * kTileElems, 64);
  if constexpr (MI == 2) _tile_loadd(5, xp[pc + q0], xs[pc + q0]);
  for (int64_t q = q0; q < q1; ++q) {
    const bool more = q + 1 < q1;
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NJ == 2) _tile_dpbf16ps(1, 4, 7);
    if (more) _tile_loadd(4, xp[q + 1], xs[q + 1]);
    if constexpr (MI == 2) {
      _tile_dpbf16ps(2, 5, 6);
      if (more) _tile_loadd(6, y0 + (q + 1) * kTileElems, 64);
      if constexpr (NJ == 2) _tile_dpbf16ps(3, 5, 7);
      if (more) _tile_loadd(5, xp[pc + q + 1], xs[pc + q + 1]);
    } else {
      if (more) _tile_loadd(6, y0 + (q + 1) * kTileElems, 64);
    }
    if constexpr (NJ == 2) {
      if (more) _tile_loadd(7, y0 + (pc + q + 1) * kTileElems, 64);
    }
  }
  _tile_stored(0, acc, 64);
  if constexpr (NJ == 2) _tile_stored(1, acc + 256, 64);
  if constexpr (MI == 2) _tile_stored(2, acc + 512, 64);
  if constexpr (MI == 2 && NJ == 2) _tile_stored(3, acc + 768, 64);
}

void tile_amx(const FGemmArgs& a, const FGemmPlan& plan, const void* packed, int64_t m0,
              int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx) {
  if (plan.variant & kVariantFma) {
    FGemmPlan inner = plan;
    inner.variant = plan.variant / 8;
    return fgemm_kernels_avx512().tile(a, inner, packed, m0, m1, n0, n1, scratch, ctx);
  }
  configure_full_tiles();

  const Core c = core_of(a, plan, packed);
  const int64_t pc = c.pc;
  const int64_t i0 = c.trans ? n0 : m0, i1 = c.trans ? n1 : m1;
  const int64_t j0 = c.trans ? m0 : n0, j1 = c.trans ? m1 : n1;
  // C tiles of every 32-column block of the tile: [jblocks][4][16 x 16] fp32
  const int64_t tj = round_up(c.trans ? plan.tile_m : plan.tile_n, 32);
  float* accs = static_cast<float*>(scratch);
  uint16_t* edge = reinterpret_cast<uint16_t*>(accs + (tj / 32) * 1024);  // [2][pc] X' tiles
  const uint16_t** xp = reinterpret_cast<const uint16_t**>(edge + 2 * pc * kTileElems);
  int64_t* xs = reinterpret_cast<int64_t*>(xp + 2 * pc);
  // 64-byte aligned: the panel is written with aligned stores
  uint16_t* panel = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(xs + 2 * pc) + 63) & ~uintptr_t{63});
  const bool use_panel = plan.variant & kYPanel;
  if (use_panel) pack_y_panel(c.yv, a.k, j0, j1 - j0, pc, panel);  // the tile spans one panel
  const size_t esize = a.dtype == DType::kF32 ? 4 : 2;
  const uint16_t* xbase = static_cast<const uint16_t*>(c.xv.ptr);
  // Rows of X' with contiguous p are copied into contiguous tiles when several column blocks
  // will reuse them: rows a multiple of 4 KB apart (a K of 2048 bf16) all map to the same L1
  // sets and would evict each other between the column blocks. A few column blocks (small
  // batches per expert) read them in place, where the loads overlap the products (a copy
  // would first stall on memory).
  const bool copy_x = c.xdirect && j1 - j0 > kCopyXMinCols;

  for (int64_t ib = i0; ib < i1; ib += 2 * kT) {
    const int mi = i1 - ib > kT ? 2 : 1;
    for (int h = 0; h < mi; ++h) {  // the X' tile row at ib + 16 h, every p-chunk
      const int64_t r0 = ib + h * kT, rows = c.mi - r0 < kT ? c.mi - r0 : kT;
      for (int64_t q = 0; q < pc; ++q) {
        const int64_t slot = h * pc + q;
        if (!c.xdirect) {
          xp[slot] = c.packed_x + ((r0 / kT) * pc + q) * kTileElems;
          xs[slot] = 64;
        } else if (!copy_x && rows == kT && (q + 1) * kC <= a.k) {
          xp[slot] = xbase + r0 * c.xv.rs + q * kC;  // loaded in place
          xs[slot] = c.xv.rs * 2;
        } else {
          if (!copy_x) pack_x_tile(c.xv, a.k, q * kC, r0, rows, edge + slot * kTileElems);
          xp[slot] = edge + slot * kTileElems;
          xs[slot] = 64;
        }
      }
      if (copy_x) copy_x_rows(c.xv, a.k, r0, rows, pc, edge + h * pc * kTileElems);
    }
    // K blocks outermost: the X' tiles of one block (32 rows x kKBlock) stay in L1 while
    // every column block of Y' passes by; C lives in memory between K blocks
    for (int64_t q0 = 0; q0 < pc; q0 += kKBlock) {
      const int64_t qn = pc - q0 < kKBlock ? pc - q0 : kKBlock;
      for (int64_t jb = j0; jb < j1; jb += 2 * kT) {
        const int nj = j1 - jb > kT ? 2 : 1;
        const uint16_t* y0 = use_panel ? panel + ((jb - j0) / kT) * pc * kTileElems
                                       : c.packed_y + (jb / kT) * pc * kTileElems;
        float* acc = accs + ((jb - j0) / 32) * 1024;
        if (mi == 2 && nj == 2) block<2, 2>(xp, xs, y0, pc, q0, qn, q0 == 0, acc);
        else if (mi == 2) block<2, 1>(xp, xs, y0, pc, q0, qn, q0 == 0, acc);
        else if (nj == 2) block<1, 2>(xp, xs, y0, pc, q0, qn, q0 == 0, acc);
        else block<1, 1>(xp, xs, y0, pc, q0, qn, q0 == 0, acc);
      }
    }
    for (int64_t jb = j0; jb < j1; jb += 2 * kT) {
      const int nj = j1 - jb > kT ? 2 : 1;
      const float* ctmp = accs + ((jb - j0) / 32) * 1024;
      // C' tile (h, g) holds rows ib + 16 h, columns jb + 16 g
      for (int h = 0; h < mi; ++h) {
        for (int g = 0; g < nj; ++g) {
          const float* ct = ctmp + (h * 2 + g) * 256;
          const int64_t r0 = ib + h * kT, c0 = jb + g * kT;
          const int64_t nr = i1 - r0 < kT ? i1 - r0 : kT, nc = j1 - c0 < kT ? j1 - c0 : kT;
          if (!c.trans) {
            for (int64_t r = 0; r < nr; ++r)
              store_f32_row(ct + r * 16, nc, a.dtype, static_cast<char*>(a.out) + ((r0 + r) * a.ldo + c0) * esize);
          } else {
            // column cc of the C' tile is a row of out: 16 strided values, one gather
            const __m512i rows16 = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112,
                                                    96, 80, 64, 48, 32, 16, 0);
            alignas(64) float col[16];
            for (int64_t cc = 0; cc < nc; ++cc) {
              _mm512_store_ps(col, _mm512_i32gather_ps(_mm512_add_epi32(rows16, _mm512_set1_epi32(int(cc))), ct, 4));
              store_f32_row(col, nr, a.dtype, static_cast<char*>(a.out) + ((c0 + cc) * a.ldo + r0) * esize);
            }
          }
        }
      }
    }
  }
  _tile_release();
}

}  // namespace

const FGemmKernels& fgemm_kernels_amx() {
  static const FGemmKernels k{Isa::kAmx, plan_amx, pack_amx, tile_amx};
  return k;
}

}  // namespace r1x::cpu
