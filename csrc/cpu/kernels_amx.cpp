// AMX kernels: the FP8 GEMM on tile matrix multiply (TDPBF16PS), everything else as avx512.
//
// The GEMM is computed transposed, C^T = B A^T, because the tile unit wants its second
// operand in "VNNI" layout ([k/2][cols][2]) and its first row-major: the weight rows B[n, :]
// are already row-major in memory, so they only need e4m3 -> bf16 decoding into a small
// buffer (no transposition of the large operand), while A (the activations, decoded and
// VNNI-packed once per call) takes the transposition. Per 128-wide K block, 4 tile products
// accumulate in the tile registers, which are then stored and promoted into fp32
// accumulators with that block's scales (DeepGEMM's promotion, on the CPU). A and B are both
// decoded with decode64_perm, so K runs in the same (lane-permuted) order within every 64
// values of both operands.
#include <cstring>

#include "cpu/amx_util.h"
#include "cpu/avx512_util.h"

namespace r1x::cpu {
namespace {

constexpr int64_t kTile = 16;        // tile rows; 32 bf16 (64 bytes) per row
constexpr int64_t kChunk = 32;       // K per tile product
constexpr int64_t kTileNMax = 128;   // output columns per task (inside one weight block)
constexpr int64_t kPackRows = 32;    // A is packed (and padded with zeros) to 32-row blocks
constexpr int64_t kAmxPrefetchL1 = 1024;  // per weight row, bytes ahead into L1

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Layout of the packed A: tiles[m / 16][k / 32] of 16 x 16 dwords (bf16 pairs), k-pair-major,
// then the scales transposed to [k / 128][m32] (zero-padded rows have zero scales).
inline size_t tiles_bytes(int64_t m, int64_t k) { return static_cast<size_t>(round_up(m, kPackRows) * k) * 2; }

// A handful of rows (decode-sized batches) cannot fill the 16-row tiles: the AVX-512 FMA path
// with its fused decode streams the weights faster there.
constexpr int64_t kMaxRowsForFma = 2;
constexpr int kVariantFma = 1;
// Small batches (one 32-row group of A) decode the tile's weight rows over all of K first, in
// memory order, so the weights stream sequentially from DRAM; larger batches decode one K
// block at a time (the decoded block is reused across many rows of A while in L1).
constexpr int kVariantWholeRows = 2;
constexpr int64_t kWholeRowsMaxK = 4096;  // 32 decoded rows stay <= 256 KB (L2-resident)

GemmPlan plan_amx(int64_t m, int64_t n, int64_t k) {
  if (m <= kMaxRowsForFma) {
    GemmPlan p = kernels_avx512().gemm_plan(m, n, k);
    p.variant = kVariantFma;
    return p;
  }
  GemmPlan p;
  const int64_t m32 = round_up(m, kPackRows);
  p.tile_m = m32 <= 256 ? m32 : 256;
  // Large batches reuse each A tile across 128 columns (A traffic from L3 is what limits
  // them); small ones keep 32-column tasks so both threads have work.
  p.tile_n = m >= 128 ? kTileNMax : 32;
  p.pack_rows = kPackRows;
  p.packed_a_bytes = tiles_bytes(m, k) + static_cast<size_t>(m32 * (k / kGemmBlock)) * 4;
  if (m32 <= 32 && k <= kWholeRowsMaxK) {
    p.variant = kVariantWholeRows;
  }
  p.scratch_bytes = static_cast<size_t>(p.tile_n * p.tile_m) * 4  // acc (C^T)
                    + static_cast<size_t>(p.tile_n * kGemmBlock) * 2  // decoded B block
                    + 4 * 256 * 4                                 // stored C tiles
                    + (p.variant == kVariantWholeRows ? static_cast<size_t>(p.tile_n * k) * 2 : 0);
  return p;
}

void pack_a_amx(const GemmArgs& args, const GemmPlan& plan, int64_t m0, int64_t m1, void* packed) {
  if (plan.variant == kVariantFma) return kernels_avx512().gemm_pack_a(args, plan, m0, m1, packed);
  const E4m3Decoder dec;
  const int64_t k = args.k, kblocks = k / kGemmBlock, m32 = round_up(args.m, kPackRows);
  const int64_t mend = m1 == args.m ? m32 : m1;  // the last chunk also writes the padding
  uint32_t* tiles = static_cast<uint32_t*>(packed);
  alignas(64) uint16_t rows[kTile][64];
  for (int64_t mb = m0 / kTile; mb < mend / kTile; ++mb) {
    for (int64_t k64 = 0; k64 < k; k64 += 64) {
      for (int64_t r = 0; r < kTile; ++r) {
        const int64_t m = mb * kTile + r;
        if (m < args.m) {
          __m512i o0, o1;
          dec.decode64_perm(args.a + m * k + k64, o0, o1);
          _mm512_store_si512(rows[r], o0);
          _mm512_store_si512(rows[r] + 32, o1);
        } else {
          _mm512_store_si512(rows[r], _mm512_setzero_si512());
          _mm512_store_si512(rows[r] + 32, _mm512_setzero_si512());
        }
      }
      for (int64_t h = 0; h < 2; ++h) {
        uint32_t* dst = tiles + (mb * (k / kChunk) + k64 / kChunk + h) * 256;
        for (int64_t kp = 0; kp < 16; ++kp) {
          // dword kp of each of the 16 rows -> one 64-byte tile row
          const __m512i idx = _mm512_set_epi32(
              15 * 32 + kp, 14 * 32 + kp, 13 * 32 + kp, 12 * 32 + kp, 11 * 32 + kp, 10 * 32 + kp,
              9 * 32 + kp, 8 * 32 + kp, 7 * 32 + kp, 6 * 32 + kp, 5 * 32 + kp, 4 * 32 + kp,
              3 * 32 + kp, 2 * 32 + kp, 32 + kp, kp);
          const __m512i v = _mm512_i32gather_epi32(
              _mm512_add_epi32(idx, _mm512_set1_epi32(static_cast<int>(h * 16))), rows[0], 4);
          _mm512_storeu_si512(dst + kp * 16, v);
        }
      }
    }
    float* at = reinterpret_cast<float*>(static_cast<char*>(packed) + tiles_bytes(args.m, k));
    for (int64_t r = 0; r < kTile; ++r) {
      const int64_t m = mb * kTile + r;
      for (int64_t kb = 0; kb < kblocks; ++kb)
        at[kb * m32 + m] = m < args.m ? args.a_scale[m * kblocks + kb] : 0.0f;
    }
  }
}

// One 32 (n) x 16*MT (m) block of C^T over one 128-wide K block, promoted into acc.
// btiles: the decoded B slice's 16x32 tile for (first n16 block, this K chunk); tiles are
// contiguous (1 KB, row stride 64 bytes: no cache-set conflicts), the next K chunk 512
// elements on, the second n16 block n16_stride elements on.
template <int MT>
inline void block_128(const uint16_t* btiles, int64_t n16_stride, const uint16_t* atiles,
                      int64_t tiles_per_mb, const float* sa /*16*MT scales*/, float sb,
                      float* acc, int64_t ldacc, float* ctmp) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (MT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  // Tile registers are not renamed: a load into a tile waits until every product reading
  // it has finished. Loading each operand of the next K chunk right after its last use in
  // this one lets the load run under the remaining products instead of stalling the unit.
  constexpr int kChunks = kGemmBlock / kChunk;
  _tile_loadd(4, btiles, 64);
  _tile_loadd(6, atiles, 64);
  _tile_loadd(5, btiles + n16_stride, 64);
  if constexpr (MT == 2) _tile_loadd(7, atiles + tiles_per_mb * 512, 64);
  _Pragma("GCC unroll 4") for (int c = 0; c < kChunks; ++c) {
    const bool more = c + 1 < kChunks;
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MT == 2) {
      _tile_dpbf16ps(2, 4, 7);
      if (more) _tile_loadd(4, btiles + (c + 1) * 512, 64);
      _tile_dpbf16ps(1, 5, 6);
      if (more) _tile_loadd(6, atiles + (c + 1) * 512, 64);
      _tile_dpbf16ps(3, 5, 7);
      if (more) {
        _tile_loadd(5, btiles + n16_stride + (c + 1) * 512, 64);
        _tile_loadd(7, atiles + (tiles_per_mb + c + 1) * 512, 64);
      }
    } else {
      if (more) _tile_loadd(4, btiles + (c + 1) * 512, 64);
      _tile_dpbf16ps(1, 5, 6);
      if (more) {
        _tile_loadd(6, atiles + (c + 1) * 512, 64);
        _tile_loadd(5, btiles + n16_stride + (c + 1) * 512, 64);
      }
    }
  }
  _tile_stored(0, ctmp, 64);
  _tile_stored(1, ctmp + 256, 64);
  if constexpr (MT == 2) {
    _tile_stored(2, ctmp + 512, 64);
    _tile_stored(3, ctmp + 768, 64);
  }
  const __m512 vsb = _mm512_set1_ps(sb);
  for (int j = 0; j < MT; ++j) {
    const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(sa + 16 * j), vsb);
    for (int i = 0; i < 2; ++i) {
      const float* ct = ctmp + (2 * j + i) * 256;
      float* arow = acc + (16 * i) * ldacc + 16 * j;
      for (int r = 0; r < 16; ++r) {
        float* p = arow + r * ldacc;
        _mm512_storeu_ps(p, _mm512_fmadd_ps(_mm512_load_ps(ct + 16 * r), s, _mm512_loadu_ps(p)));
      }
    }
  }
}

void tile_amx(const GemmArgs& args, const GemmPlan& plan, const void* packed, int64_t m0,
              int64_t m1, int64_t n0, int64_t n1, void* scratch, TileCtx& ctx) {
  if (plan.variant == kVariantFma) {
    return kernels_avx512().gemm_tile(args, plan, packed, m0, m1, n0, n1, scratch, ctx);
  }
  configure_full_tiles();

  const E4m3Decoder dec;
  const int64_t k = args.k, kblocks = k / kGemmBlock, m32 = round_up(args.m, kPackRows);
  const int64_t tiles_per_mb = k / kChunk;
  // rows of A handled, padding included (a single 16-row tile when m <= 16)
  const int64_t tm = args.m <= kTile ? kTile : round_up(m1 - m0, kPackRows);
  const int64_t ldacc = plan.tile_m;
  const int64_t tile_n = plan.tile_n, rows = n1 - n0;  // rows <= tile_n: one weight block
  const int64_t rows_pad = round_up(rows, 32);
  float* acc = static_cast<float*>(scratch);  // [tile_n][tile_m], C^T
  uint16_t* bk = reinterpret_cast<uint16_t*>(acc + tile_n * plan.tile_m);
  float* ctmp = reinterpret_cast<float*>(bk + tile_n * kGemmBlock);
  const uint16_t* atiles = static_cast<const uint16_t*>(packed);
  const float* at = reinterpret_cast<const float*>(static_cast<const char*>(packed) + tiles_bytes(args.m, k));
  const bool pair = args.m > kTile;
  const float* sb = args.b_scale + (n0 / kGemmBlock) * kblocks;

  for (int64_t i = 0; i < rows_pad * ldacc; ++i) acc[i] = 0.0f;
  // Decoded weights, one K block: 16x32 tiles [n / 16][4 chunks][16][32]. The whole-rows
  // variant keeps all K blocks (kb_stride apart), else one block is decoded at a time.
  const bool whole_rows = plan.variant == kVariantWholeRows;
  uint16_t* ball = reinterpret_cast<uint16_t*>(ctmp + 4 * 256);
  const int64_t kb_stride = tile_n * kGemmBlock;
  auto tile_row = [](uint16_t* base, int64_t r) { return base + ((r / kTile) * 4 * kTile + r % kTile) * kChunk; };
  auto zero_padding_rows = [&](uint16_t* base) {  // rows past n contribute zeros
    for (int64_t r = rows; r < rows_pad; ++r)
      for (int64_t c = 0; c < kGemmBlock / kChunk; ++c)
        _mm512_store_si512(tile_row(base, r) + c * 512, _mm512_setzero_si512());
  };
  // Row r, K block kb -> base, prefetching `ahead` bytes further along the row's stream.
  auto decode_block = [&](int64_t r, int64_t kb, uint16_t* base, int64_t ahead) {
    const uint8_t* src = args.b + (n0 + r) * k + kb * kGemmBlock;
    _mm_prefetch(reinterpret_cast<const char*>(src) + ahead, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(src) + ahead + 64, _MM_HINT_T0);
    uint16_t* dst = tile_row(base, r);
    for (int64_t j = 0; j < kGemmBlock; j += 64) {
      __m512i o0, o1;
      dec.decode64_perm(src + j, o0, o1);
      _mm512_store_si512(dst + (j / kChunk) * 512, o0);
      _mm512_store_si512(dst + (j / kChunk + 1) * 512, o1);
    }
  };
  if (whole_rows) {
    // in memory order: the weights stream sequentially
    for (int64_t kb = 0; kb < kblocks; ++kb) zero_padding_rows(ball + kb * kb_stride);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t kb = 0; kb < kblocks; ++kb) decode_block(r, kb, ball + kb * kb_stride, kPrefetchBytes);
  } else {
    zero_padding_rows(bk);
  }
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t* bkb = bk;
    if (whole_rows) {
      bkb = ball + kb * kb_stride;
    } else {
      // this K block of every row (<= 32 KB: stays in L1 while all of A's rows use it)
      for (int64_t r = 0; r < rows; ++r) decode_block(r, kb, bk, kAmxPrefetchL1);
    }
    for (int64_t ms = 0; ms < tm; ms += pair ? 32 : 16) {
      const int64_t mb = (m0 + ms) / kTile;
      const uint16_t* ap = atiles + (mb * tiles_per_mb + kb * (kGemmBlock / kChunk)) * 512;
      const float* sa = at + kb * m32 + m0 + ms;
      for (int64_t ns = 0; ns < rows_pad; ns += 32) {
        const uint16_t* bs = bkb + (ns / kTile) * 4 * 512;
        float* ac = acc + ns * ldacc + ms;
        if (pair) {
          block_128<2>(bs, 4 * 512, ap, tiles_per_mb, sa, sb[kb], ac, ldacc, ctmp);
        } else {
          block_128<1>(bs, 4 * 512, ap, tiles_per_mb, sa, sb[kb], ac, ldacc, ctmp);
        }
      }
    }
  }
  _tile_release();

  // out[m, n] = acc[n, m], transposed 16 rows of m at a time through a small buffer so that
  // both acc and out are read and written along cache lines.
  const size_t esize = args.out_dtype == DType::kF32 ? 4 : 2;
  alignas(64) float buf[kTile][kTileNMax];
  for (int64_t mb = m0; mb < m1; mb += kTile) {
    const int64_t mrows = m1 - mb < kTile ? m1 - mb : kTile;
    for (int64_t r = 0; r < rows; ++r) {
      alignas(64) float v[kTile];
      _mm512_store_ps(v, _mm512_loadu_ps(acc + r * ldacc + (mb - m0)));
      for (int64_t i = 0; i < kTile; ++i) buf[i][r] = v[i];
    }
    for (int64_t i = 0; i < mrows; ++i)
      store_f32_row(buf[i], rows, args.out_dtype,
                    static_cast<char*>(args.out) + ((mb + i) * args.n + n0) * esize);
  }
}

// Four independent TDPBF16PS accumulator tiles (16 x 16 fp32 each, 16 x 32 bf16 operands).
double peak_amx(int64_t iters) {
  configure_full_tiles();
  alignas(64) static const uint16_t ones[16 * 32] = {};
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_release();
  return 4.0 * 2 * 16 * 16 * 32 * static_cast<double>(iters);
}

}  // namespace

const Kernels& kernels_amx() {
  static const Kernels k = [] {
    Kernels t = kernels_avx512();
    t.isa = Isa::kAmx;
    t.gemm_plan = plan_amx;
    t.gemm_pack_a = pack_a_amx;
    t.gemm_tile = tile_amx;
    t.peak_probe = peak_amx;
    t.peak_unit = "bf16 AMX TDPBF16PS";
    return t;
  }();
  return k;
}

}  // namespace r1x::cpu
