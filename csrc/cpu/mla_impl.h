// The MLA CPU algorithms (mla.h), written once over an ISA's tile product `Gemm::run` and
// included by each mla_<isa>.cpp, whose flags also vectorise the elementwise loops here.
// Include only from those files: everything has internal linkage.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/fp8_scalar.h"
#include "cpu/mla.h"

namespace r1x::cpu {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

// 2^y for y <= 0 (what softmax needs; small positive y is fine too) to ~2 ulp, branch-free so
// the loops over it vectorise: 2^y = 2^i * 2^f with i = round(y), f in [-0.5, 0.5], 2^f by a
// degree-6 Taylor polynomial of e^(f ln 2). y is clamped to -127, whose biased exponent 0
// makes the result exactly 0 (so -inf gives 0); NaN stays NaN.
inline float exp2_neg(float y) {
  const float yc = std::max(y, -127.0f);
  const int32_t e = static_cast<int32_t>(yc + 127.5f);  // i + 127, in [0, 254]; trunc = floor
  const float x = (yc - static_cast<float>(e - 127)) * kLn2;
  float p = 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  p = p * x + 1.0f;
  p = p * x + 1.0f;
  return p * bits_f32(static_cast<uint32_t>(e) << 23);
}

// rows x cols of `dtype` (row stride `rs` elements) -> fp32 rows of `ld`.
inline void load_rows(const void* src, DType dtype, int64_t rs, int64_t rows, int64_t cols,
                      float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = dst + r * ld;
    if (dtype == DType::kF32) {
      std::memcpy(o, static_cast<const float*>(src) + r * rs, cols * sizeof(float));
    } else {
      const uint16_t* s = static_cast<const uint16_t*>(src) + r * rs;
      if (dtype == DType::kBF16) {
        for (int64_t c = 0; c < cols; ++c) o[c] = bits_f32(static_cast<uint32_t>(s[c]) << 16);
      } else {
        for (int64_t c = 0; c < cols; ++c) o[c] = f16_to_f32(s[c]);
      }
    }
  }
}

// The transpose: rows x cols of `dtype` (row stride rs) -> fp32 dst[c * ld + r].
inline void load_rows_t(const void* src, DType dtype, int64_t rs, int64_t rows, int64_t cols,
                        float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = load_as_f32(src, static_cast<int>(dtype), r * rs + c);
}

inline void store_row(const float* v, int64_t n, DType dtype, void* out) {
  if (dtype == DType::kF32) {
    std::memcpy(out, v, n * sizeof(float));
  } else if (dtype == DType::kBF16) {
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t j = 0; j < n; ++j) o[j] = f32_to_bf16(v[j]);
  } else {
    Float16* o = static_cast<Float16*>(out);
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<Float16>(v[j]);
  }
}

inline size_t esize(DType d) { return d == DType::kF32 ? 4 : 2; }
inline const void* offset(const void* p, int64_t elems, DType d) {
  return static_cast<const char*>(p) + elems * static_cast<int64_t>(esize(d));
}
inline void* offset(void* p, int64_t elems, DType d) {
  return static_cast<char*>(p) + elems * static_cast<int64_t>(esize(d));
}

// One online-softmax step over the score tile s[bk, ld] (rows: keys, columns: queries; raw
// dot products, masked entries -inf): s becomes P = 2^(s * c - m_new), m and l are updated and
// alpha[q] = 2^(m_old - m_new) is what the running output rows must be rescaled by. c is
// scale * log2(e); m lives in the log2 domain.
inline void softmax_step(float* s, int64_t ld, int64_t bk, int64_t bq, float c, float* m,
                         float* l, float* alpha, float* mx) {
  for (int64_t q = 0; q < bq; ++q) mx[q] = m[q];
  for (int64_t t = 0; t < bk; ++t) {
    float* row = s + t * ld;
    for (int64_t q = 0; q < bq; ++q) {
      row[q] *= c;
      mx[q] = std::max(mx[q], row[q]);
    }
  }
  for (int64_t q = 0; q < bq; ++q) {
    // a column that saw only -inf keeps m = -inf; subtracting 0 then keeps every P at 0
    const float use = mx[q] == kNegInf ? 0.0f : mx[q];
    alpha[q] = exp2_neg(m[q] - use);
    m[q] = mx[q];
    mx[q] = use;
    l[q] *= alpha[q];
  }
  for (int64_t t = 0; t < bk; ++t) {
    float* row = s + t * ld;
    for (int64_t q = 0; q < bq; ++q) {
      row[q] = exp2_neg(row[q] - mx[q]);
      l[q] += row[q];
    }
  }
}

// The running output rows (o[r * ld], n wide) times the softmax step's alpha[r].
inline void rescale_rows(float* o, int64_t ld, int64_t rows, int64_t n, const float* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    if (alpha[r] == 1.0f) continue;
    float* row = o + r * ld;
    for (int64_t j = 0; j < n; ++j) row[j] *= alpha[r];
  }
}

// Causal mask of an S^T tile (keys k0 + t, query columns c): key k0 + t is hidden from column c
// when it lies past limit0 + c / per (per = 1 in training; the H heads of one query in decode).
inline void mask_tile(float* s, int64_t ld, int64_t bk, int64_t cols, int64_t k0, int64_t limit0,
                      int64_t per) {
  for (int64_t t = 0; t < bk; ++t)
    for (int64_t c = 0; c < cols; ++c)
      s[t * ld + c] = k0 + t > limit0 + c / per ? kNegInf : s[t * ld + c];
}

// The forward's end for rows q0 + r, r < bq, of sequence `start`: out = o / l, lse = m + log l.
inline void finish_rows(const AttnFwdArgs& a, int64_t start, int64_t q0, int64_t bq,
                        int64_t head, float* o, int64_t ld, const float* m, const float* l) {
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t row = start + q0 + r;
    float* orow = o + r * ld;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t j = 0; j < a.dv; ++j) orow[j] *= inv;
    store_row(orow, a.dv, a.dtype, offset(a.out, (row * a.h + head) * a.dv, a.dtype));
    a.lse[head * a.t + row] = l[r] > 0.0f ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
  }
}

// Scratch carving: bump allocation of 64-byte-aligned arrays.
struct Carve {
  char* p;
  template <class T = float>
  T* take(int64_t n) {
    T* r = reinterpret_cast<T*>(p);
    p += (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
    return r;
  }
};

template <class Gemm>
struct Mla {
  static constexpr int64_t BQ = kMlaBlockQ, BK = kMlaBlockK;

  // ---- forward ----------------------------------------------------------------------------
  static size_t fwd_scratch(const AttnArgs& a) {
    const int64_t f = a.dqk * BQ + BQ * a.dv + BK * BQ + BK * a.dqk + BK * a.dv + 5 * BQ;
    return static_cast<size_t>(f) * 4 + 64 * 10;
  }

  static void fwd_task(const AttnFwdArgs& a, int64_t seq, int64_t head, int64_t q0, int64_t q1,
                       void* scratch) {
    const int64_t start = a.cu[seq], len = a.cu[seq + 1] - start, bq = q1 - q0;
    const int64_t h = a.h, dqk = a.dqk, dv = a.dv;
    Carve cv{static_cast<char*>(scratch)};
    float* qt = cv.take(dqk * BQ);
    float* o = cv.take(BQ * dv);
    float* s = cv.take(BK * BQ);
    float* kf = cv.take(BK * dqk);
    float* vf = cv.take(BK * dv);
    float* m = cv.take(BQ);
    float* l = cv.take(BQ);
    float* alpha = cv.take(BQ);
    float* mx = cv.take(BQ);

    load_rows_t(offset(a.q, ((start + q0) * h + head) * dqk, a.dtype), a.dtype, h * dqk, bq, dqk,
                qt, BQ);
    std::fill(o, o + bq * dv, 0.0f);
    std::fill(m, m + bq, kNegInf);
    std::fill(l, l + bq, 0.0f);
    const float c = a.scale * kLog2e;
    const int64_t kend = a.causal ? q1 : len;
    for (int64_t k0 = 0; k0 < kend; k0 += BK) {
      const int64_t bk = std::min(BK, kend - k0);
      // (widened even from fp32: contiguous rows beat rows H heads apart)
      load_rows(offset(a.k, ((start + k0) * h + head) * dqk, a.dtype), a.dtype, h * dqk, bk, dqk,
                kf, dqk);
      load_rows(offset(a.v, ((start + k0) * h + head) * dv, a.dtype), a.dtype, h * dv, bk, dv, vf,
                dv);
      Gemm::run(bk, bq, dqk, kf, dqk, 1, qt, BQ, s, BQ, false);
      if (a.causal && k0 + bk - 1 > q0) mask_tile(s, BQ, bk, bq, k0, q0, 1);
      softmax_step(s, BQ, bk, bq, c, m, l, alpha, mx);
      rescale_rows(o, dv, bq, dv, alpha);
      Gemm::run(bq, dv, bk, s, 1, BQ, vf, dv, o, dv, true);
    }
    finish_rows(a, start, q0, bq, head, o, dv, m, l);
  }

  // ---- backward ---------------------------------------------------------------------------
  // Per (sequence, head): Q^T and dO^T of the whole sequence, dQ accumulated in fp32, and per
  // key block dK, dV accumulated over the query blocks that see it (FlashAttention-2's loop
  // order; dQ needs no atomics because one task owns the whole sequence of its head).
  static size_t bwd_scratch(const AttnArgs& a, int64_t max_len) {
    const int64_t lp = align16(std::max<int64_t>(max_len, 1));
    const int64_t f = lp * (2 * a.dqk + 2 * a.dv + a.dqk + 2) + 2 * BK * BQ + BK * a.dqk +
                      BK * a.dv + BK * a.dqk + BK * a.dv;
    return static_cast<size_t>(f) * 4 + 64 * 13;
  }

  static void bwd_task(const AttnBwdArgs& a, int64_t seq, int64_t head, void* scratch) {
    const int64_t start = a.cu[seq], len = a.cu[seq + 1] - start;
    if (len == 0) return;
    const int64_t h = a.h, dqk = a.dqk, dv = a.dv, lp = align16(len);
    Carve cv{static_cast<char*>(scratch)};
    float* qf = cv.take(lp * dqk);   // Q rows
    float* qt = cv.take(dqk * lp);   // Q^T
    float* dof = cv.take(lp * dv);   // dO rows
    float* dot = cv.take(dv * lp);   // dO^T
    float* dq = cv.take(lp * dqk);   // dQ accumulator
    float* lse2 = cv.take(lp);       // lse in the log2 domain
    float* delta = cv.take(lp);      // rowsum(dO * O) - grad_lse
    float* pt = cv.take(BK * BQ);
    float* dpt = cv.take(BK * BQ);
    float* kf = cv.take(BK * dqk);
    float* vf = cv.take(BK * dv);
    float* dk = cv.take(BK * dqk);
    float* dvacc = cv.take(BK * dv);

    const void* q0p = offset(a.q, (start * h + head) * dqk, a.dtype);
    const void* do0p = offset(a.grad_out, (start * h + head) * dv, a.dtype);
    load_rows(q0p, a.dtype, h * dqk, len, dqk, qf, dqk);
    load_rows(do0p, a.dtype, h * dv, len, dv, dof, dv);
    for (int64_t r = 0; r < len; ++r) {
      for (int64_t j = 0; j < dqk; ++j) qt[j * lp + r] = qf[r * dqk + j];
      for (int64_t j = 0; j < dv; ++j) dot[j * lp + r] = dof[r * dv + j];
    }
    for (int64_t r = 0; r < len; ++r) {
      const int64_t row = start + r;
      load_rows(offset(a.out, (row * h + head) * dv, a.dtype), a.dtype, dv, 1, dv, dvacc, dv);
      float acc = 0.0f;
      for (int64_t j = 0; j < dv; ++j) acc += dof[r * dv + j] * dvacc[j];
      const float lse = a.lse[head * a.t + row];
      delta[r] = acc - (a.grad_lse != nullptr ? a.grad_lse[head * a.t + row] : 0.0f);
      // a row that saw no key (lse = -inf) has P = 0: +inf here makes every 2^(s - lse2) 0
      lse2[r] = lse == kNegInf ? std::numeric_limits<float>::infinity() : lse * kLog2e;
    }
    std::fill(dq, dq + len * dqk, 0.0f);
    const float c = a.scale * kLog2e;

    for (int64_t k0 = 0; k0 < len; k0 += BK) {
      const int64_t bk = std::min(BK, len - k0);
      load_rows(offset(a.k, ((start + k0) * h + head) * dqk, a.dtype), a.dtype, h * dqk, bk, dqk,
                kf, dqk);
      load_rows(offset(a.v, ((start + k0) * h + head) * dv, a.dtype), a.dtype, h * dv, bk, dv, vf,
                dv);
      std::fill(dk, dk + bk * dqk, 0.0f);
      std::fill(dvacc, dvacc + bk * dv, 0.0f);
      for (int64_t q0 = a.causal ? k0 / BQ * BQ : 0; q0 < len; q0 += BQ) {
        const int64_t bq = std::min(BQ, len - q0);
        Gemm::run(bk, bq, dqk, kf, dqk, 1, qt + q0, lp, pt, BQ, false);
        const bool mask = a.causal && k0 + bk - 1 > q0;
        for (int64_t t = 0; t < bk; ++t) {
          float* row = pt + t * BQ;
          for (int64_t q = 0; q < bq; ++q) row[q] = exp2_neg(row[q] * c - lse2[q0 + q]);
          if (mask)
            for (int64_t q = 0; q < bq; ++q) row[q] = k0 + t > q0 + q ? 0.0f : row[q];
        }
        Gemm::run(bk, dv, bq, pt, BQ, 1, dof + q0 * dv, dv, dvacc, dv, true);
        Gemm::run(bk, bq, dv, vf, dv, 1, dot + q0, lp, dpt, BQ, false);
        for (int64_t t = 0; t < bk; ++t) {
          float* ds = dpt + t * BQ;
          const float* p = pt + t * BQ;
          for (int64_t q = 0; q < bq; ++q) ds[q] = p[q] * (ds[q] - delta[q0 + q]) * a.scale;
        }
        Gemm::run(bk, dqk, bq, dpt, BQ, 1, qf + q0 * dqk, dqk, dk, dqk, true);
        Gemm::run(bq, dqk, bk, dpt, 1, BQ, kf, dqk, dq + q0 * dqk, dqk, true);
      }
      for (int64_t t = 0; t < bk; ++t) {
        const int64_t row = start + k0 + t;
        store_row(dk + t * dqk, dqk, a.dtype, offset(a.grad_k, (row * h + head) * dqk, a.dtype));
        store_row(dvacc + t * dv, dv, a.dtype, offset(a.grad_v, (row * h + head) * dv, a.dtype));
      }
    }
    for (int64_t r = 0; r < len; ++r)
      store_row(dq + r * dqk, dqk, a.dtype,
                offset(a.grad_q, ((start + r) * h + head) * dqk, a.dtype));
  }

  // ---- decode -----------------------------------------------------------------------------
  // Rows r = s * H + head of the Sq * H queries form the columns of S^T = K Q^T, so every
  // cached token is widened once per task and multiplied against all heads at once.
  // (keys per tile: small enough that a tile of fp32 latent rows stays in L1 for both products)
  static constexpr int64_t DK = 32;
  static int64_t decode_ld(const DecodeArgs& a) { return align16(a.sq * a.h); }

  static size_t decode_scratch(const DecodeArgs& a) {
    const int64_t r = decode_ld(a);
    const int64_t f = a.d * r + DK * r + DK * a.d + 2 * r;
    return static_cast<size_t>(f) * 4 + 64 * 6;
  }

  static void decode_task(const DecodeArgs& a, int64_t b, int64_t t0, int64_t t1,
                          DecodePartial part, void* scratch) {
    const int64_t rows = a.sq * a.h, ld = decode_ld(a), d = a.d, dv = a.dv;
    const int64_t len = a.seqlens[b];
    Carve cv{static_cast<char*>(scratch)};
    float* qt = cv.take(d * ld);
    float* s = cv.take(DK * ld);
    float* kf = cv.take(DK * d);
    float* alpha = cv.take(ld);
    float* mx = cv.take(ld);
    load_rows_t(offset(a.q, b * rows * d, a.dtype), a.dtype, d, rows, d, qt, ld);
    float* o = part.o;
    float* m = part.m;
    float* l = part.l;
    std::fill(o, o + rows * dv, 0.0f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.0f);
    const float c = a.scale * kLog2e;
    const int32_t* table = a.table + b * a.max_blocks;
    // query s sees tokens j <= len - sq + s (causal)
    const int64_t first_limit = len - a.sq;
    const int64_t tend = std::min(t1, len);
    for (int64_t k0 = t0; k0 < tend;) {
      int64_t bk = std::min(DK, tend - k0);
      const float* kt = kf;
      const int64_t in0 = k0 % a.block_size;
      if (a.dtype == DType::kF32 && a.block_size >= DK) {
        // fp32 rows are used where they are: the tile stops at the end of its cache block
        bk = std::min(bk, a.block_size - in0);
        kt = static_cast<const float*>(a.cache) +
             (static_cast<int64_t>(table[k0 / a.block_size]) * a.block_size + in0) * d;
      } else {
        for (int64_t t = 0; t < bk;) {
          // a run of tokens inside one cache block is one strided copy
          const int64_t j = k0 + t, blk = table[j / a.block_size], in = j % a.block_size;
          const int64_t run = std::min(bk - t, a.block_size - in);
          load_rows(offset(a.cache, (blk * a.block_size + in) * d, a.dtype), a.dtype, d, run, d,
                    kf + t * d, d);
          t += run;
        }
      }
      Gemm::run(bk, rows, d, kt, d, 1, qt, ld, s, ld, false);
      if (a.causal && k0 + bk - 1 > first_limit) mask_tile(s, ld, bk, rows, k0, first_limit, a.h);
      softmax_step(s, ld, bk, rows, c, m, l, alpha, mx);
      rescale_rows(o, dv, rows, dv, alpha);
      Gemm::run(rows, dv, bk, s, 1, ld, kt, d, o, dv, true);
      k0 += bk;
    }
  }

  static MlaKernels table(Isa isa) {
    return {isa, fwd_scratch, bwd_scratch, decode_scratch, fwd_task, bwd_task, decode_task};
  }
};

}  // namespace
}  // namespace r1x::cpu
