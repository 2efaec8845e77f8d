// MLA in bfloat16 on bf16 tile products (mla.h), shared by the AMX kernels (mla_amx.cpp:
// TDPBF16PS tiles) and the AVX-512 ones (mla_avx512.cpp: the VDPBF16PS engine), written once
// over `Ops`, which provides the two tile products and their set-up:
//   Ops::st(kb, dp, qv, ldq, ncols, s, lds):  s[64][lds] = kb[64][dp] . Q^T (kb: 64 rows,
//       bf16, dp a multiple of 32; qv: Q^T in VNNI pairs, [dp / 2][ldq] dwords; ncols a
//       multiple of 16): S^T = K Q^T, and the backward's dP^T = V dO^T;
//   Ops::pv(pb, rpad, vv, dvp, o):  o[rpad][dvp] += pb[rpad][64] . V (pb: P rows in bf16, 64
//       keys; vv: V rows in key pairs, [32][dvp] dwords): O += P V, and the backward's
//       dV += P^T dO, dK += dS^T Q, dQ += dS K;
//   Ops::begin() / Ops::end() around a task's products, Ops::fallback() for other dtypes.
// Include only from TUs compiled with the AVX-512 flags; internal linkage throughout.
//
// Decode, per task (one sequence, one key range) and per tile of 64 cached tokens:
//   S^T [64 tokens, R] = K [64, D] . Q^T   the gathered K rows as they are (bf16 rows), Q^T in
//                                          VNNI pairs, built once per task; R = Sq * H padded
//                                          to 16
//   online softmax down the columns of S^T (mla_impl.h, fp32)
//   O [R, dv] += P [R, 64] . V [64, dv]    P rounded to bf16 (FlashMLA rounds P the same way),
//                                          V rows interleaved in token pairs (VNNI), O
//                                          accumulated in fp32 in memory
// The training forward is the AVX-512 kernel's algorithm (mla_impl.h) with both products on
// bf16 tiles; the backward its loop order (per key block, over the query blocks that see it),
// all five products on tiles. Per (sequence, head) the query-side operands are laid out once:
// Q^T and dO^T in pairs of feature columns (for S^T = K Q^T and dP^T = V dO^T), Q and dO in
// pairs of queries (for dK += dS^T Q and dV += P^T dO); per key block K in pairs of keys (for
// dQ += dS K). P^T and dS^T are rounded to bf16, as FlashAttention's backward does on GPUs.
#pragma once

#include <immintrin.h>

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

// The 32-bit pair (lo, hi) of two bf16 values.
inline uint32_t pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Q^T in VNNI pairs, the B operand of S^T = K Q^T: qv[kp * ldq + r] = (q[r, 2kp], q[r, 2kp+1])
// for the `rows` rows of q (row stride rs), zero past d and past rows (up to ldq columns).
void q_pairs(const uint16_t* q, int64_t rs, int64_t rows, int64_t d, int64_t dp, int64_t ldq,
             uint32_t* qv) {
  for (int64_t kp = 0; kp < dp / 2; ++kp) {
    uint32_t* dst = qv + kp * ldq;
    for (int64_t r = 0; r < ldq; ++r) {
      const uint16_t lo = r < rows && 2 * kp < d ? q[r * rs + 2 * kp] : 0;
      const uint16_t hi = r < rows && 2 * kp + 1 < d ? q[r * rs + 2 * kp + 1] : 0;
      dst[r] = pair(lo, hi);
    }
  }
}

// One key row into the A operand buffer: d values, zero up to dp (src null: a zero row; the
// padded P entries are 0, and 0 * NaN would not be).
inline void key_row(const uint16_t* src, int64_t d, int64_t dp, uint16_t* row) {
  if (src != nullptr) {
    std::memcpy(row, src, d * 2);
    std::fill(row + d, row + dp, uint16_t{0});
  } else {
    std::fill(row, row + dp, uint16_t{0});
  }
}

// P [rows padded to 16][64] in bf16 from P^T = s[64][lds] (bk valid keys): column r of P^T is
// row r of P, a stride-lds gather of 16 keys at a time; zero past bk and past rows.
void p_rows(const float* s, int64_t lds, int64_t bk, int64_t rows, int64_t rpad, uint16_t* pb) {
  const __m512i idx = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int>(lds)));
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* dst = pb + r * kTile;
    for (int64_t t = 0; t < kTile; t += 16) {
      const int64_t n = std::clamp<int64_t>(bk - t, 0, 16);
      const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, s + t * lds + r, 4);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + t), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
  std::fill(pb + rows * kTile, pb + rpad * kTile, uint16_t{0});
}

// Rows in pairs, the B operand of P V (and the backward's products over queries or keys):
// vv[tp * dvp + j] = (v[2tp, j], v[2tp+1, j]) for tp < npairs, over the bk rows of v (row
// stride rs), zero past bk and past dv.
void v_pairs(const uint16_t* v, int64_t rs, int64_t bk, int64_t dv, int64_t dvp, uint32_t* vv,
             int64_t npairs = kTile / 2) {
  for (int64_t tp = 0; tp < npairs; ++tp) {
    uint32_t* dst = vv + tp * dvp;
    if (2 * tp + 1 < bk) {
      const uint16_t* r0 = v + 2 * tp * rs;
      const uint16_t* r1 = r0 + rs;
      // 32 columns of both rows -> 32 pairs, by two word permutes across the row pair
      alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,
                                                       37, 6, 38, 7, 39, 8,  40, 9,  41, 10, 42,
                                                       11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
      const __m512i lo = _mm512_load_si512(kLo);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      int64_t j = 0;
      for (; j + 32 <= dv; j += 32) {
        const __m512i x0 = _mm512_loadu_si512(r0 + j), x1 = _mm512_loadu_si512(r1 + j);
        _mm512_storeu_si512(dst + j, _mm512_permutex2var_epi16(x0, lo, x1));
        _mm512_storeu_si512(dst + j + 16, _mm512_permutex2var_epi16(x0, hi, x1));
      }
      for (; j < dv; ++j) dst[j] = pair(r0[j], r1[j]);
      std::fill(dst + dv, dst + dvp, 0u);
    } else if (2 * tp < bk) {
      const uint16_t* r0 = v + 2 * tp * rs;
      for (int64_t j = 0; j < dv; ++j) dst[j] = r0[j];
      std::fill(dst + dv, dst + dvp, 0u);
    } else {
      std::fill(dst, dst + dvp, 0u);
    }
  }
}

inline void to_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

struct BwdDims {
  int64_t lp, dqp, dvp, dvk;  // queries padded to 64; dqk padded to 32; dv padded to 16 and 32
};

BwdDims bwd_dims(const AttnArgs& a, int64_t len) {
  return {(std::max<int64_t>(len, 1) + 63) / 64 * 64, align32(a.dqk), align16(a.dv), align32(a.dv)};
}

template <class Ops>
struct MlaBf16 {
  static size_t decode_scratch(const DecodeArgs& a) {
    if (a.dtype != DType::kBF16) return Ops::fallback().decode_scratch(a);
    const Dims z = dims_of(a);
    const int64_t halves = z.dp * z.rpad          // Q^T, VNNI pairs
                           + kTile * z.dp         // gathered K rows
                           + kTile * z.dvp        // V, VNNI pairs
                           + z.rpad * kTile;      // P, bf16
    const int64_t floats = kTile * z.rpad + z.rpad * z.dvp + 2 * z.rpad;
    return static_cast<size_t>(halves * 2 + floats * 4) + 64 * 8;
  }

  static void decode_task(const DecodeArgs& a, int64_t b, int64_t t0, int64_t t1, DecodePartial part,
                       void* scratch) {
    if (a.dtype != DType::kBF16) return Ops::fallback().decode_task(a, b, t0, t1, part, scratch);
    const Dims z = dims_of(a);
    const int64_t d = a.d, dv = a.dv, rows = z.rows, rp = z.rpad, dp = z.dp, dvp = z.dvp;
    Carve cv{static_cast<char*>(scratch)};
    uint32_t* qv = cv.take<uint32_t>(dp * rp / 2);   // [dp / 2][rp] pairs
    uint16_t* kb = cv.take<uint16_t>(kTile * dp); // [64][dp]
    uint32_t* vv = cv.take<uint32_t>(kTile * dvp / 2); // [32][dvp] pairs
    uint16_t* pb = cv.take<uint16_t>(rp * kTile);  // [rp][64]
    float* s = cv.take<float>(kTile * rp);         // [64][rp]
    float* o = cv.take<float>(rp * dvp);           // [rp][dvp]
    float* alpha = cv.take<float>(rp);
    float* mx = cv.take<float>(rp);

    q_pairs(static_cast<const uint16_t*>(a.q) + b * rows * d, d, rows, d, dp, rp, qv);
    std::fill(o, o + rp * dvp, 0.0f);
    float* m = part.m;
    float* l = part.l;
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.0f);
    const float c = a.scale * kLog2e;
    const int32_t* table = a.table + b * a.max_blocks;
    const int64_t len = a.seqlens[b], first_limit = len - a.sq, tend = std::min(t1, len);
    const uint16_t* cache = static_cast<const uint16_t*>(a.cache);

    auto row_of = [&](int64_t j) {
      return cache + (static_cast<int64_t>(table[j / a.block_size]) * a.block_size + j % a.block_size) * d;
    };
    Ops::begin();
    for (int64_t k0 = t0; k0 < tend; k0 += kTile) {
      const int64_t bk = std::min(kTile, tend - k0);
      // A whole tile inside one cache block, rows a multiple of 32 wide: the tile products read
      // the cache rows where they are; otherwise they are gathered (and zero-padded) into kb.
      const bool direct = bk == kTile && d == dp && a.block_size % kTile == 0;
      const uint16_t* kt = direct ? row_of(k0) : kb;
      if (!direct)
        for (int64_t t = 0; t < kTile; ++t) key_row(t < bk ? row_of(k0 + t) : nullptr, d, dp, kb + t * dp);
      // The cache is read once, from DRAM: the next tile's rows are requested (into L2) a quarter
      // at a time between this tile's steps, so that the reads overlap the products and the
      // softmax instead of stalling on full fill buffers.
      auto prefetch = [&](int64_t quarter) {
        const int64_t j0 = k0 + kTile + quarter * (kTile / 4);
        for (int64_t j = j0; j < std::min(j0 + kTile / 4, tend); ++j) {
          const char* row = reinterpret_cast<const char*>(row_of(j));
          for (int64_t off = 0; off < d * 2; off += 64) _mm_prefetch(row + off, _MM_HINT_T1);
        }
      };
      prefetch(0);
      Ops::st(kt, dp, qv, rp, rp, s, rp);
      prefetch(1);
      if (a.causal && k0 + bk - 1 > first_limit) mask_tile(s, rp, bk, rows, k0, first_limit, a.h);
      softmax_step(s, rp, bk, rows, c, m, l, alpha, mx);
      rescale_rows(o, dvp, rows, dv, alpha);
      p_rows(s, rp, bk, rows, rp, pb);
      prefetch(2);
      v_pairs(kt, dp, bk, dv, dvp, vv);
      Ops::pv(pb, rp, vv, dvp, o);
      prefetch(3);
    }
    Ops::end();
    for (int64_t r = 0; r < rows; ++r) std::memcpy(part.o + r * dv, o + r * dvp, dv * 4);
  }

  // ---- training forward --------------------------------------------------------------------
  // The AVX-512 kernel's algorithm (mla_impl.h) with both products on tiles: per 64 keys,
  // S^T = K Q^T (A: the key rows, B: the query block's Q^T pairs, built once per task), the
  // online softmax in fp32, then O += P V (A: P rounded to bf16, B: V rows in token pairs).
  static size_t fwd_scratch(const AttnArgs& a) {
    if (a.dtype != DType::kBF16) return Ops::fallback().fwd_scratch(a);
    const int64_t dp = align32(a.dqk), dvp = align16(a.dv), bq = kMlaBlockQ;
    const int64_t halves = dp * bq + kTile * dp + kTile * dvp + bq * kTile;
    const int64_t floats = kTile * bq + bq * dvp + 4 * bq;
    return static_cast<size_t>(halves * 2 + floats * 4) + 64 * 10;
  }

  static void fwd_task(const AttnFwdArgs& a, int64_t seq, int64_t head, int64_t q0, int64_t q1,
                    void* scratch) {
    if (a.dtype != DType::kBF16) return Ops::fallback().fwd_task(a, seq, head, q0, q1, scratch);
    static_assert(kMlaBlockQ == 64, "the tile loops assume 64-query blocks");
    constexpr int64_t BQ = kMlaBlockQ;
    const int64_t start = a.cu[seq], len = a.cu[seq + 1] - start, bq = q1 - q0;
    const int64_t h = a.h, dqk = a.dqk, dv = a.dv, dp = align32(dqk), dvp = align16(dv);
    Carve cv{static_cast<char*>(scratch)};
    uint32_t* qv = cv.take<uint32_t>(dp * BQ / 2);
    uint16_t* kb = cv.take<uint16_t>(kTile * dp);
    uint32_t* vv = cv.take<uint32_t>(kTile * dvp / 2);
    uint16_t* pb = cv.take<uint16_t>(BQ * kTile);
    float* s = cv.take<float>(kTile * BQ);
    float* o = cv.take<float>(BQ * dvp);
    float* m = cv.take<float>(BQ);
    float* l = cv.take<float>(BQ);
    float* alpha = cv.take<float>(BQ);
    float* mx = cv.take<float>(BQ);

    const uint16_t* q = static_cast<const uint16_t*>(a.q);
    const uint16_t* k = static_cast<const uint16_t*>(a.k);
    const uint16_t* v = static_cast<const uint16_t*>(a.v);
    q_pairs(q + ((start + q0) * h + head) * dqk, h * dqk, bq, dqk, dp, BQ, qv);
    std::fill(o, o + BQ * dvp, 0.0f);
    std::fill(m, m + bq, kNegInf);
    std::fill(l, l + bq, 0.0f);
    const float c = a.scale * kLog2e;
    const int64_t kend = a.causal ? q1 : len;
    Ops::begin();
    for (int64_t k0 = 0; k0 < kend; k0 += kTile) {
      const int64_t bk = std::min(kTile, kend - k0);
      for (int64_t t = 0; t < kTile; ++t)
        key_row(t < bk ? k + ((start + k0 + t) * h + head) * dqk : nullptr, dqk, dp, kb + t * dp);
      Ops::st(kb, dp, qv, BQ, align16(bq), s, BQ);
      if (a.causal && k0 + bk - 1 > q0) mask_tile(s, BQ, bk, bq, k0, q0, 1);
      softmax_step(s, BQ, bk, bq, c, m, l, alpha, mx);
      rescale_rows(o, dvp, bq, dv, alpha);
      p_rows(s, BQ, bk, bq, align16(bq), pb);
      v_pairs(v + ((start + k0) * h + head) * dv, h * dv, bk, dv, dvp, vv);
      Ops::pv(pb, align16(bq), vv, dvp, o);
    }
    Ops::end();
    finish_rows(a, start, q0, bq, head, o, dvp, m, l);
  }

  // ---- training backward -------------------------------------------------------------------
  // The AVX-512 kernel's loop order (mla_impl.h: per key block, over the query blocks that see
  // it), all five products on tiles. Per (sequence, head) the query-side operands are laid out
  // once: Q^T and dO^T in pairs of feature columns (B of S^T = K Q^T and dP^T = V dO^T), Q and dO
  // in pairs of queries (B of dK += dS^T Q and dV += P^T dO); per key block K in pairs of keys
  // (B of dQ += dS K). P^T and dS^T are rounded to bf16 as the A operands, as FlashAttention's
  // backward does on GPUs.
  static size_t bwd_scratch(const AttnArgs& a, int64_t max_len) {
    if (a.dtype != DType::kBF16) return Ops::fallback().bwd_scratch(a, max_len);
    const BwdDims z = bwd_dims(a, max_len);
    const int64_t halves = z.dqp * z.lp + z.lp * z.dqp + z.lp * z.dvp + z.dvk * z.lp  // per task
                           + kTile * z.dqp + kTile * z.dvk + kTile * z.dqp            // per key block
                           + 3 * kTile * kTile;                                        // P^T, dS^T, dS
    const int64_t floats = z.lp * z.dqp + 2 * z.lp + 2 * kTile * kTile + kTile * z.dvp +
                           kTile * z.dqp + z.dvp;
    return static_cast<size_t>(halves * 2 + floats * 4) + 64 * 20;
  }

  static void bwd_task(const AttnBwdArgs& a, int64_t seq, int64_t head, void* scratch) {
    if (a.dtype != DType::kBF16) return Ops::fallback().bwd_task(a, seq, head, scratch);
    const int64_t start = a.cu[seq], len = a.cu[seq + 1] - start;
    if (len == 0) return;
    const int64_t h = a.h, dqk = a.dqk, dv = a.dv;
    const BwdDims z = bwd_dims(a, len);
    const int64_t lp = z.lp, dqp = z.dqp, dvp = z.dvp, dvk = z.dvk;
    Carve cv{static_cast<char*>(scratch)};
    uint32_t* qt = cv.take<uint32_t>(dqp * lp / 2);   // [dqp/2][lp]
    uint32_t* qq = cv.take<uint32_t>(lp * dqp / 2);   // [lp/2][dqp]
    uint32_t* dop = cv.take<uint32_t>(lp * dvp / 2);  // [lp/2][dvp]
    uint32_t* dot = cv.take<uint32_t>(dvk * lp / 2);  // [dvk/2][lp]
    uint16_t* kb = cv.take<uint16_t>(kTile * dqp);
    uint16_t* vb = cv.take<uint16_t>(kTile * dvk);
    uint32_t* kk = cv.take<uint32_t>(kTile * dqp / 2);  // [32][dqp]
    uint16_t* ptb = cv.take<uint16_t>(kTile * kTile);
    uint16_t* dstb = cv.take<uint16_t>(kTile * kTile);
    uint16_t* dsb = cv.take<uint16_t>(kTile * kTile);
    float* dq = cv.take<float>(lp * dqp);
    float* lse2 = cv.take<float>(lp);
    float* delta = cv.take<float>(lp);
    float* pt = cv.take<float>(kTile * kTile);
    float* dpt = cv.take<float>(kTile * kTile);
    float* dva = cv.take<float>(kTile * dvp);
    float* dka = cv.take<float>(kTile * dqp);
    float* orow = cv.take<float>(dvp);

    const uint16_t* q = static_cast<const uint16_t*>(a.q) + (start * h + head) * dqk;
    const uint16_t* k = static_cast<const uint16_t*>(a.k) + (start * h + head) * dqk;
    const uint16_t* v = static_cast<const uint16_t*>(a.v) + (start * h + head) * dv;
    const uint16_t* go = static_cast<const uint16_t*>(a.grad_out) + (start * h + head) * dv;
    q_pairs(q, h * dqk, len, dqk, dqp, lp, qt);
    v_pairs(q, h * dqk, len, dqk, dqp, qq, lp / 2);
    v_pairs(go, h * dv, len, dv, dvp, dop, lp / 2);
    q_pairs(go, h * dv, len, dv, dvk, lp, dot);
    for (int64_t r = 0; r < len; ++r) {
      const int64_t row = start + r;
      load_rows(offset(a.out, (row * h + head) * dv, a.dtype), a.dtype, dv, 1, dv, orow, dv);
      const uint16_t* g = go + r * h * dv;
      float acc = 0.0f;
      for (int64_t j = 0; j < dv; ++j) acc += bits_f32(static_cast<uint32_t>(g[j]) << 16) * orow[j];
      const float lse = a.lse[head * a.t + row];
      delta[r] = acc - (a.grad_lse != nullptr ? a.grad_lse[head * a.t + row] : 0.0f);
      lse2[r] = lse == kNegInf ? std::numeric_limits<float>::infinity() : lse * kLog2e;
    }
    std::fill(lse2 + len, lse2 + lp, std::numeric_limits<float>::infinity());
    std::fill(delta + len, delta + lp, 0.0f);
    std::fill(dq, dq + lp * dqp, 0.0f);
    const float c = a.scale * kLog2e;

    Ops::begin();
    for (int64_t k0 = 0; k0 < len; k0 += kTile) {
      const int64_t bk = std::min(kTile, len - k0);
      for (int64_t t = 0; t < kTile; ++t) {
        key_row(t < bk ? k + (k0 + t) * h * dqk : nullptr, dqk, dqp, kb + t * dqp);
        key_row(t < bk ? v + (k0 + t) * h * dv : nullptr, dv, dvk, vb + t * dvk);
      }
      v_pairs(kb, dqp, bk, dqk, dqp, kk);
      std::fill(dva, dva + kTile * dvp, 0.0f);
      std::fill(dka, dka + kTile * dqp, 0.0f);
      for (int64_t q0 = a.causal ? k0 / kTile * kTile : 0; q0 < len; q0 += kTile) {
        const int64_t bq = std::min(kTile, len - q0);
        Ops::st(kb, dqp, qt + q0, lp, kTile, pt, kTile);       // S^T
        Ops::st(vb, dvk, dot + q0, lp, kTile, dpt, kTile);     // dP^T
        const bool mask = a.causal && k0 + bk - 1 > q0;
        for (int64_t t = 0; t < kTile; ++t) {
          float* pr = pt + t * kTile;
          float* dr = dpt + t * kTile;
          // (queries past bq have lse2 = +inf: P = 0; keys past bk have zero rows: P = 2^-lse2,
          // zeroed here so that they add nothing to dQ)
          for (int64_t r = 0; r < kTile; ++r) {
            float pv = exp2_neg(pr[r] * c - lse2[q0 + r]);
            pv = (mask && k0 + t > q0 + r) || t >= bk ? 0.0f : pv;
            pr[r] = pv;
            dr[r] = pv * (dr[r] - delta[q0 + r]) * a.scale;
          }
        }
        (void)bq;
        to_bf16(pt, kTile * kTile, ptb);
        to_bf16(dpt, kTile * kTile, dstb);
        p_rows(dpt, kTile, kTile, kTile, kTile, dsb);           // dS = (dS^T)^T
        Ops::pv(ptb, kTile, dop + (q0 / 2) * dvp, dvp, dva);   // dV += P^T dO
        Ops::pv(dstb, kTile, qq + (q0 / 2) * dqp, dqp, dka);   // dK += dS^T Q
        Ops::pv(dsb, kTile, kk, dqp, dq + q0 * dqp);           // dQ += dS K
      }
      for (int64_t t = 0; t < bk; ++t) {
        const int64_t row = start + k0 + t;
        store_row(dka + t * dqp, dqk, a.dtype, offset(a.grad_k, (row * h + head) * dqk, a.dtype));
        store_row(dva + t * dvp, dv, a.dtype, offset(a.grad_v, (row * h + head) * dv, a.dtype));
      }
    }
    Ops::end();
    for (int64_t r = 0; r < len; ++r)
      store_row(dq + r * dqp, dqk, a.dtype, offset(a.grad_q, ((start + r) * h + head) * dqk, a.dtype));
  }

  static MlaKernels table(Isa isa) {
    MlaKernels t = Ops::fallback();
    t.isa = isa;
    t.decode_scratch = decode_scratch;
    t.decode_task = decode_task;
    t.fwd_scratch = fwd_scratch;
    t.fwd_task = fwd_task;
    t.bwd_scratch = bwd_scratch;
    t.bwd_task = bwd_task;
    return t;
  }
};

}  // namespace
}  // namespace r1x::cpu
