// MLA decode (mla.h) on AMX for bfloat16: both products of a key tile run as bf16 tile matrix
// multiplies with fp32 accumulation, which leaves the decode bound by reading the cache.
//
// Per task (one sequence, one key range) and per tile of 64 cached tokens:
//   S^T [64 tokens, R] = K [64, D] . Q^T   A = the gathered K rows as they are (bf16 rows are
//                                          the A tile layout), B = Q^T in VNNI pairs, built
//                                          once per task; R = Sq * H padded to 16
//   online softmax down the columns of S^T (mla_impl.h, fp32)
//   O [R, dv] += P [R, 64] . V [64, dv]    A = P rounded to bf16 (FlashMLA rounds P the same
//                                          way), B = V rows interleaved in token pairs (VNNI),
//                                          O accumulated in fp32 in memory, 4 tiles at a time
// Other dtypes take the AVX-512 kernel.
#include <immintrin.h>

#include "cpu/amx_util.h"
#include "cpu/mla_impl.h"

namespace r1x::cpu {
namespace {

constexpr int64_t kTile = 64;  // tokens per key tile: 4 row tiles of 16

inline int64_t align32(int64_t n) { return (n + 31) / 32 * 32; }

struct Dims {
  int64_t rows, rpad, dp, dvp;
};

Dims dims_of(const DecodeArgs& a) {
  const int64_t rows = a.sq * a.h;
  return {rows, align16(rows), align32(a.d), align16(a.dv)};
}

size_t amx_decode_scratch(const DecodeArgs& a) {
  if (a.dtype != DType::kBF16) return mla_kernels_avx512().decode_scratch(a);
  const Dims z = dims_of(a);
  const int64_t halves = z.dp * z.rpad          // Q^T, VNNI pairs
                         + kTile * z.dp         // gathered K rows
                         + kTile * z.dvp        // V, VNNI pairs
                         + z.rpad * kTile;      // P, bf16
  const int64_t floats = kTile * z.rpad + z.rpad * z.dvp + 2 * z.rpad;
  return static_cast<size_t>(halves * 2 + floats * 4) + 64 * 8;
}

// The 32-bit pair (lo, hi) of two bf16 values.
inline uint32_t pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

void amx_decode_task(const DecodeArgs& a, int64_t b, int64_t t0, int64_t t1, DecodePartial part,
                     void* scratch) {
  if (a.dtype != DType::kBF16) return mla_kernels_avx512().decode_task(a, b, t0, t1, part, scratch);
  const Dims z = dims_of(a);
  const int64_t d = a.d, dv = a.dv, rows = z.rows, rp = z.rpad, dp = z.dp, dvp = z.dvp;
  char* p = static_cast<char*>(scratch);
  auto take = [&p](int64_t bytes) {
    char* r = p;
    p += (bytes + 63) / 64 * 64;
    return r;
  };
  uint32_t* qv = reinterpret_cast<uint32_t*>(take(dp * rp * 2));   // [dp / 2][rp] pairs
  uint16_t* kb = reinterpret_cast<uint16_t*>(take(kTile * dp * 2)); // [64][dp]
  uint32_t* vv = reinterpret_cast<uint32_t*>(take(kTile * dvp * 2)); // [32][dvp] pairs
  uint16_t* pb = reinterpret_cast<uint16_t*>(take(rp * kTile * 2));  // [rp][64]
  float* s = reinterpret_cast<float*>(take(kTile * rp * 4));         // [64][rp]
  float* o = reinterpret_cast<float*>(take(rp * dvp * 4));           // [rp][dvp]
  float* alpha = reinterpret_cast<float*>(take(rp * 4));
  float* mx = reinterpret_cast<float*>(take(rp * 4));

  // Q^T in VNNI pairs: qv[kp * rp + r] = (q[r, 2kp], q[r, 2kp + 1]); zero past D and past R
  const uint16_t* q = static_cast<const uint16_t*>(a.q) + b * rows * d;
  for (int64_t kp = 0; kp < dp / 2; ++kp) {
    uint32_t* dst = qv + kp * rp;
    for (int64_t r = 0; r < rp; ++r) {
      const uint16_t lo = r < rows && 2 * kp < d ? q[r * d + 2 * kp] : 0;
      const uint16_t hi = r < rows && 2 * kp + 1 < d ? q[r * d + 2 * kp + 1] : 0;
      dst[r] = pair(lo, hi);
    }
  }
  std::fill(o, o + rp * dvp, 0.0f);
  float* m = part.m;
  float* l = part.l;
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);
  const float c = a.scale * kLog2e;
  const int32_t* table = a.table + b * a.max_blocks;
  const int64_t len = a.seqlens[b], first_limit = len - a.sq, tend = std::min(t1, len);
  const uint16_t* cache = static_cast<const uint16_t*>(a.cache);

  configure_full_tiles();
  for (int64_t k0 = t0; k0 < tend; k0 += kTile) {
    const int64_t bk = std::min(kTile, tend - k0);
    // gather the tile's rows (zero padding past D and past bk: padded P entries are 0, and
    // 0 * NaN would not be)
    for (int64_t t = 0; t < kTile; ++t) {
      uint16_t* row = kb + t * dp;
      if (t < bk) {
        const int64_t j = k0 + t;
        const uint16_t* src = cache + (static_cast<int64_t>(table[j / a.block_size]) * a.block_size +
                                       j % a.block_size) * d;
        std::memcpy(row, src, d * 2);
        std::fill(row + d, row + dp, uint16_t{0});
      } else {
        std::fill(row, row + dp, uint16_t{0});
      }
    }
    // S^T = K Q^T, 16 query rows at a time, 4 token tiles in tmm0-3
    for (int64_t cb = 0; cb < rp; cb += 16) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < dp; k += 32) {
        _tile_loadd(4, qv + (k / 2) * rp + cb, rp * 4);
        _tile_loadd(5, kb + 0 * 16 * dp + k, dp * 2);
        _tile_dpbf16ps(0, 5, 4);
        _tile_loadd(6, kb + 1 * 16 * dp + k, dp * 2);
        _tile_dpbf16ps(1, 6, 4);
        _tile_loadd(5, kb + 2 * 16 * dp + k, dp * 2);
        _tile_dpbf16ps(2, 5, 4);
        _tile_loadd(6, kb + 3 * 16 * dp + k, dp * 2);
        _tile_dpbf16ps(3, 6, 4);
      }
      _tile_stored(0, s + 0 * 16 * rp + cb, rp * 4);
      _tile_stored(1, s + 1 * 16 * rp + cb, rp * 4);
      _tile_stored(2, s + 2 * 16 * rp + cb, rp * 4);
      _tile_stored(3, s + 3 * 16 * rp + cb, rp * 4);
    }
    if (a.causal && k0 + bk - 1 > first_limit) {
      for (int64_t t = 0; t < bk; ++t)
        for (int64_t r = 0; r < rows; ++r)
          s[t * rp + r] = k0 + t > first_limit + r / a.h ? kNegInf : s[t * rp + r];
    }
    softmax_step(s, rp, bk, rows, c, m, l, alpha, mx);
    for (int64_t r = 0; r < rows; ++r) {
      if (alpha[r] == 1.0f) continue;
      float* row = o + r * dvp;
      for (int64_t j = 0; j < dv; ++j) row[j] *= alpha[r];
    }
    // P [rp][64] in bf16 (zero past bk and past R), V in token pairs
    // (column r of S^T is row r of P: a stride-rp gather of 16 tokens at a time)
    const __m512i idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(static_cast<int>(rp)));
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* dst = pb + r * kTile;
      for (int64_t t = 0; t < kTile; t += 16) {
        const int64_t n = std::clamp<int64_t>(bk - t, 0, 16);
        const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
        const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, s + t * rp + r, 4);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t), (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
    std::fill(pb + rows * kTile, pb + rp * kTile, uint16_t{0});
    for (int64_t tp = 0; tp < kTile / 2; ++tp) {
      const uint16_t* r0 = kb + 2 * tp * dp;
      const uint16_t* r1 = r0 + dp;
      uint32_t* dst = vv + tp * dvp;
      for (int64_t j = 0; j < dv; ++j) dst[j] = pair(r0[j], r1[j]);
      for (int64_t j = dv; j < dvp; ++j) dst[j] = 0;
    }
    // O += P V: P's two 32-token halves in tmm4/5, 4 output tiles at a time in tmm0-3
    for (int64_t rb = 0; rb < rp; rb += 16) {
      _tile_loadd(4, pb + rb * kTile, kTile * 2);
      _tile_loadd(5, pb + rb * kTile + 32, kTile * 2);
      float* orow = o + rb * dvp;
      int64_t cb = 0;
      for (; cb + 64 <= dvp; cb += 64) {
        _tile_loadd(0, orow + cb, dvp * 4);
        _tile_loadd(1, orow + cb + 16, dvp * 4);
        _tile_loadd(2, orow + cb + 32, dvp * 4);
        _tile_loadd(3, orow + cb + 48, dvp * 4);
        _tile_loadd(6, vv + cb, dvp * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb, dvp * 4);
        _tile_dpbf16ps(0, 5, 7);
        _tile_loadd(6, vv + cb + 16, dvp * 4);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb + 16, dvp * 4);
        _tile_dpbf16ps(1, 5, 7);
        _tile_loadd(6, vv + cb + 32, dvp * 4);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb + 32, dvp * 4);
        _tile_dpbf16ps(2, 5, 7);
        _tile_loadd(6, vv + cb + 48, dvp * 4);
        _tile_dpbf16ps(3, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb + 48, dvp * 4);
        _tile_dpbf16ps(3, 5, 7);
        _tile_stored(0, orow + cb, dvp * 4);
        _tile_stored(1, orow + cb + 16, dvp * 4);
        _tile_stored(2, orow + cb + 32, dvp * 4);
        _tile_stored(3, orow + cb + 48, dvp * 4);
      }
      for (; cb < dvp; cb += 16) {
        _tile_loadd(0, orow + cb, dvp * 4);
        _tile_loadd(6, vv + cb, dvp * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, vv + 16 * dvp + cb, dvp * 4);
        _tile_dpbf16ps(0, 5, 7);
        _tile_stored(0, orow + cb, dvp * 4);
      }
    }
  }
  _tile_release();
  for (int64_t r = 0; r < rows; ++r) std::memcpy(part.o + r * dv, o + r * dvp, dv * 4);
}

}  // namespace

const MlaKernels& mla_kernels_amx() {
  static const MlaKernels k = [] {
    MlaKernels t = mla_kernels_avx512();
    t.isa = Isa::kAmx;
    t.decode_scratch = amx_decode_scratch;
    t.decode_task = amx_decode_task;
    return t;
  }();
  return k;
}

}  // namespace r1x::cpu
