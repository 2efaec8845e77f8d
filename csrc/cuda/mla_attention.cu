// Packed variable-length attention, forward and backward (mla_launch.h's mla_attention_*),
// FlashAttention-2 style: online softmax over key tiles, lse saved, the backward recomputes
// P = exp(scores - lse) and never materialises a T x T matrix.
//
// Work mapping: one CTA per (tile of rows of one sequence, head). cu_seqlens stays on the device,
// so the grid covers floor(T / tile) + B tile indices and every CTA finds its sequence by binary
// search (mla_common.cuh's find_tile); CTAs past their sequence's end exit. The grid runs tile
// indices backwards so that, under a causal mask, the long tiles at sequence ends start first.
//
// bf16/fp16 forward with Dqk <= 192 and Dv <= 128, both multiples of 8: the sm_90a wgmma kernel
// of mla_attention_sm90.cu. Everything else below.
// bf16/fp16 (tensor cores, 4 warps of 16 query or key rows each, mma.sync m16n8k16):
//   forward  64 queries x 64-key tiles, K/V double-buffered with cp.async. Scores and
//            probabilities stay in registers (C fragments re-packed as A fragments).
//   dQ pass  64 queries x key tiles: S = Q K^T, dP = dO V^T, dS = P (dP - Delta), dQ += dS K.
//   dKdV     64 keys x query tiles: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
//            dK and dV live in registers; for head dims above 192/128 they would not fit
//            together, so the pass runs twice, once for each.
//   Register arrays are sized by a head-dim ceiling (a template parameter); the actual dims are
//   runtime values (the k-loops run to round16(d), products past the ceiling columns are skipped,
//   padded rows and columns of every shared tile are zero).
// float32 (and every dtype under R1X_MLA_SIMT=1): the same three kernels on CUDA cores, 32 x 32
//   tiles, 8 threads per row.

#include "cuda/mla_launch.h"

#include "cuda/common.cuh"
#include "cuda/mla_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace r1x::cuda {
namespace {

using namespace mla;

constexpr int kMaxHeadDim = 256;
constexpr int kMaxHeads = 65535;  // gridDim.y

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const float* lse;
  const float* delta;
  void* dq;
  void* dk;
  void* dv;
  const int32_t* cu;
  int batch;
  int64_t t;
  int h, dqk, dvd;  // dvd: the V head dim
  bool causal;
  float scale, scale_log2;
};

// lse (natural log) -> base 2 for exp2(s * scale_log2 - lse2). A row that saw no key has
// lse = -inf and P = 0: +inf gives exactly that (and no inf - inf).
__device__ __forceinline__ float lse_to_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// ============================================================================================
// Tensor-core kernels (bf16 / fp16)
// ============================================================================================
constexpr int kTcThreads = 128;
constexpr int kTcRows = 64;  // query rows per forward / dQ CTA, key rows per dKdV CTA

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, int col, int cols, float a, float b) {
  if (col < cols) dst[col] = from_float<T>(a);
  if (col + 1 < cols) dst[col + 1] = from_float<T>(b);
}

// s[NT][4] (+)= rows of `a_rows` (16 rows of this warp, k contiguous, pitch la) times the
// n-rows of `b_rows` (NT * 8 rows, k contiguous, pitch lb), over k in [0, 16 * ksteps).
template <typename T, int NT>
__device__ __forceinline__ void mma_abt(float (&s)[NT][4], const T* a_rows, int la,
                                        const T* b_rows, int lb, int ksteps, int lane) {
  const T* a_ptr = a_rows + (lane & 15) * la + (lane >> 4) * 8;
  const T* b_ptr = b_rows + ((lane & 7) + ((lane >> 4) << 3)) * lb + ((lane >> 3) & 1) * 8;
  for (int kk = 0; kk < ksteps; ++kk) {
    uint32_t a[4];
    ldsm_x4(a_ptr + kk * 16, a);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4(b_ptr + np * 16 * lb + kk * 16, b);
      mma16816<T>(s[2 * np], a, b[0], b[1]);
      mma16816<T>(s[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[DT][4] += P (this warp's 16 rows x 16 * KS columns, C fragments p[2 * KS][4]) times the
// tile `b_rows` (16 * KS rows, n contiguous, pitch lb); only n-columns below `ncols` (rounded to
// 16) are computed.
template <typename T, int KS, int DT>
__device__ __forceinline__ void mma_pb(float (&acc)[DT][4], const float (&p)[2 * KS][4],
                                       const T* b_rows, int lb, int ncols, int lane) {
  const T* b_ptr = b_rows + ((lane & 7) + ((lane >> 3) & 1) * 8) * lb + (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[4];
    c_pair_to_a<T>(p[2 * kk], p[2 * kk + 1], a);
#pragma unroll
    for (int np = 0; np < DT / 2; ++np) {
      if (np * 16 < ncols) {
        uint32_t b[4];
        ldsm_x4_trans(b_ptr + kk * 16 * lb + np * 16, b);
        mma16816<T>(acc[2 * np], a, b[0], b[1]);
        mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
}

template <int DT>
__device__ __forceinline__ void zero(float (&acc)[DT][4]) {
#pragma unroll
  for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
}

// Writes a warp's 16 x (8 * DT) accumulator tile times `mul[half]` to dst rows (pitch ld):
// rows below `rows`, columns below `cols`.
template <typename T, int DT>
__device__ __forceinline__ void store_acc(const float (&acc)[DT][4], T* dst, int64_t ld, int rows,
                                          int cols, const float (&mul)[2], int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = g + half * 8;
    if (r >= rows) continue;
    T* row = dst + r * ld;
#pragma unroll
    for (int nt = 0; nt < DT; ++nt) {
      store_pair(row, nt * 8 + 2 * c, cols, acc[nt][2 * half] * mul[half],
                 acc[nt][2 * half + 1] * mul[half]);
    }
  }
}

template <int kDv>
size_t fwd_tc_smem(int dqk, int dv, size_t esize) {
  const int lq = tile_pitch(dqk), lv = tile_pitch(dv);
  return static_cast<size_t>(kTcRows * lq + 2 * 64 * (lq + lv)) * esize;
}

template <typename T, int kDv>
__global__ void __launch_bounds__(kTcThreads) attn_fwd_tc(const FwdParams p) {
  constexpr int BM = kTcRows, BN = 64, NT = BN / 8, DT = kDv / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SeqRange seq;
  int64_t row0;
  if (!find_tile(p.cu, p.batch, p.t, BM, gridDim.x - 1 - blockIdx.x, seq, row0)) return;
  const int head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int len = static_cast<int>(seq.len), r0 = static_cast<int>(row0);
  const int lq = tile_pitch(p.dqk), lv = tile_pitch(p.dv);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * lq;
  T* sV = sK + 2 * BN * lq;
  const int64_t ldqk = static_cast<int64_t>(p.h) * p.dqk, ldv = static_cast<int64_t>(p.h) * p.dv;
  const T* qg = static_cast<const T*>(p.q) + (seq.start + r0) * ldqk + int64_t{head} * p.dqk;
  const T* kg = static_cast<const T*>(p.k) + seq.start * ldqk + int64_t{head} * p.dqk;
  const T* vg = static_cast<const T*>(p.v) + seq.start * ldv + int64_t{head} * p.dv;
  const bool vec = p.dqk % 8 == 0 && p.dv % 8 == 0;

  const int kend = p.causal ? min(len, r0 + BM) : len;  // keys any row of the tile can see
  const int ntiles = (kend + BN - 1) / BN;
  auto load_kv = [&](int it) {
    const int n0 = it * BN, nvalid = min(BN, len - n0);
    load_tile<T, kTcThreads>(sK + (it & 1) * BN * lq, lq, BN, nvalid, p.dqk, vec,
                             [&](int r) { return kg + (n0 + r) * ldqk; });
    load_tile<T, kTcThreads>(sV + (it & 1) * BN * lv, lv, BN, nvalid, p.dv, vec,
                             [&](int r) { return vg + (n0 + r) * ldv; });
  };
  load_tile<T, kTcThreads>(sQ, lq, BM, min(BM, len - r0), p.dqk, vec,
                           [&](int r) { return qg + r * ldqk; });
  load_kv(0);
  cp_async_commit();

  float o[DT][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this thread's partial sums
  const int ksteps = round16(p.dqk) / 16;
  const T* q_warp = sQ + warp * 16 * lq;

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<0>();
    __syncthreads();  // tile `it` landed; everyone is done with tile it - 1's stage
    if (it + 1 < ntiles) load_kv(it + 1);
    cp_async_commit();
    const T* ks = sK + (it & 1) * BN * lq;
    const T* vs = sV + (it & 1) * BN * lv;

    float s[NT][4];
    zero(s);
    mma_abt<T, NT>(s, q_warp, lq, ks, lq, ksteps, lane);

    const int n0 = it * BN;
    const bool need_mask = n0 + BN > len || (p.causal && n0 + BN - 1 > r0);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (need_mask) {
          const int key = n0 + nt * 8 + 2 * c + (e & 1);
          const int qry = r0 + warp * 16 + g + (e >> 1) * 8;
          if (key >= len || (p.causal && key > qry)) x = -INFINITY;
        }
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(kFull, mx[half], 1));
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(kFull, mx[half], 2));
      const float m_new = fmaxf(m[half], mx[half]);
      // Nothing seen yet: any finite reference keeps exp2(-inf - ref) = 0 instead of NaN.
      m_use[half] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[half] = exp2f(m[half] - m_use[half]);
      m[half] = m_new;
    }
    float rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[nt][e] - m_use[e >> 1]);
        s[nt][e] = pe;
        rs[e >> 1] += pe;
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) l[half] = l[half] * alpha[half] + rs[half];
#pragma unroll
    for (int nt = 0; nt < DT; ++nt) {
      o[nt][0] *= alpha[0];
      o[nt][1] *= alpha[0];
      o[nt][2] *= alpha[1];
      o[nt][3] *= alpha[1];
    }
    mma_pb<T, BN / 16, DT>(o, s, vs, lv, p.dv, lane);
  }

  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    l[half] += __shfl_xor_sync(kFull, l[half], 1);
    l[half] += __shfl_xor_sync(kFull, l[half], 2);
    inv[half] = l[half] > 0.0f ? 1.0f / l[half] : 0.0f;
  }
  const int row_w = r0 + warp * 16;  // this warp's first row in the sequence
  T* og = static_cast<T*>(p.out) + (seq.start + row_w) * ldv + int64_t{head} * p.dv;
  store_acc<T, DT>(o, og, ldv, len - row_w, p.dv, inv, lane);
  if (c == 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = row_w + g + half * 8;
      if (r < len) {
        p.lse[int64_t{head} * p.t + seq.start + r] =
            l[half] > 0.0f ? (m[half] + log2f(l[half])) * kLn2 : -INFINITY;
      }
    }
  }
}

template <int kDqk, int BN>
size_t dq_tc_smem(int dqk, int dv, size_t esize) {
  const int lq = tile_pitch(dqk), lv = tile_pitch(dv);
  return static_cast<size_t>(kTcRows * (lq + lv) + 2 * BN * (lq + lv)) * esize;
}

// dQ of a tile of 64 queries: loops over the key tiles the queries can see.
template <typename T, int kDqk, int BN>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dq_tc(const BwdParams p) {
  constexpr int BM = kTcRows, NT = BN / 8, DT = kDqk / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SeqRange seq;
  int64_t row0;
  if (!find_tile(p.cu, p.batch, p.t, BM, gridDim.x - 1 - blockIdx.x, seq, row0)) return;
  const int head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int len = static_cast<int>(seq.len), r0 = static_cast<int>(row0);
  const int lq = tile_pitch(p.dqk), lv = tile_pitch(p.dvd);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sO = sQ + BM * lq;  // dO
  T* sK = sO + BM * lv;
  T* sV = sK + 2 * BN * lq;
  const int64_t ldqk = static_cast<int64_t>(p.h) * p.dqk, ldv = static_cast<int64_t>(p.h) * p.dvd;
  const int64_t qoff = int64_t{head} * p.dqk, voff = int64_t{head} * p.dvd;
  const T* qg = static_cast<const T*>(p.q) + (seq.start + r0) * ldqk + qoff;
  const T* og = static_cast<const T*>(p.dout) + (seq.start + r0) * ldv + voff;
  const T* kg = static_cast<const T*>(p.k) + seq.start * ldqk + qoff;
  const T* vg = static_cast<const T*>(p.v) + seq.start * ldv + voff;
  const bool vec = p.dqk % 8 == 0 && p.dvd % 8 == 0;

  const int kend = p.causal ? min(len, r0 + BM) : len;
  const int ntiles = (kend + BN - 1) / BN;
  auto load_kv = [&](int it) {
    const int n0 = it * BN, nvalid = min(BN, len - n0);
    load_tile<T, kTcThreads>(sK + (it & 1) * BN * lq, lq, BN, nvalid, p.dqk, vec,
                             [&](int r) { return kg + (n0 + r) * ldqk; });
    load_tile<T, kTcThreads>(sV + (it & 1) * BN * lv, lv, BN, nvalid, p.dvd, vec,
                             [&](int r) { return vg + (n0 + r) * ldv; });
  };
  const int qvalid = min(BM, len - r0);
  load_tile<T, kTcThreads>(sQ, lq, BM, qvalid, p.dqk, vec, [&](int r) { return qg + r * ldqk; });
  load_tile<T, kTcThreads>(sO, lv, BM, qvalid, p.dvd, vec, [&](int r) { return og + r * ldv; });
  load_kv(0);
  cp_async_commit();

  float lse2[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + warp * 16 + g + half * 8;
    const int64_t i = int64_t{head} * p.t + seq.start + r;
    lse2[half] = r < len ? lse_to_log2(p.lse[i]) : INFINITY;
    delta[half] = r < len ? p.delta[i] : 0.0f;
  }
  float dq[DT][4];
  zero(dq);
  const int kq = round16(p.dqk) / 16, kv = round16(p.dvd) / 16;

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < ntiles) load_kv(it + 1);
    cp_async_commit();
    const T* ks = sK + (it & 1) * BN * lq;
    const T* vs = sV + (it & 1) * BN * lv;

    float s[NT][4], dp[NT][4];
    zero(s);
    zero(dp);
    mma_abt<T, NT>(s, sQ + warp * 16 * lq, lq, ks, lq, kq, lane);
    mma_abt<T, NT>(dp, sO + warp * 16 * lv, lv, vs, lv, kv, lane);

    const int n0 = it * BN;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + nt * 8 + 2 * c + (e & 1);
        const int qry = r0 + warp * 16 + g + (e >> 1) * 8;
        const bool masked = key >= len || (p.causal && key > qry);
        const float pe = masked ? 0.0f : exp2f(s[nt][e] * p.scale_log2 - lse2[e >> 1]);
        s[nt][e] = pe * (dp[nt][e] - delta[e >> 1]);  // dS
      }
    }
    mma_pb<T, BN / 16, DT>(dq, s, ks, lq, p.dqk, lane);
  }

  const int row_w = r0 + warp * 16;
  const float mul[2] = {p.scale, p.scale};
  T* dqg = static_cast<T*>(p.dq) + (seq.start + row_w) * ldqk + qoff;
  store_acc<T, DT>(dq, dqg, ldqk, len - row_w, p.dqk, mul, lane);
}

template <int BMq>
size_t dkdv_tc_smem(int dqk, int dv, size_t esize) {
  const int lq = tile_pitch(dqk), lv = tile_pitch(dv);
  return static_cast<size_t>(kTcRows * (lq + lv) + 2 * BMq * (lq + lv)) * esize +
         2 * 2 * BMq * sizeof(float);
}

// dK and/or dV of a tile of 64 keys: loops over the query tiles that can see them.
template <typename T, int kDqk, int kDv, int BMq, bool kDoDK, bool kDoDV>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dkdv_tc(const BwdParams p) {
  constexpr int BN = kTcRows, NQ = BMq / 8, DKT = kDqk / 8, DVT = kDv / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SeqRange seq;
  int64_t row0;
  if (!find_tile(p.cu, p.batch, p.t, BN, gridDim.x - 1 - blockIdx.x, seq, row0)) return;
  const int head = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int len = static_cast<int>(seq.len), n0 = static_cast<int>(row0);
  const int lq = tile_pitch(p.dqk), lv = tile_pitch(p.dvd);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * lq;
  T* sQ = sV + BN * lv;        // 2 stages
  T* sO = sQ + 2 * BMq * lq;   // dO, 2 stages
  float* sL = reinterpret_cast<float*>(sO + 2 * BMq * lv);  // lse (base 2), 2 stages
  float* sD = sL + 2 * BMq;                                 // Delta, 2 stages
  const int64_t ldqk = static_cast<int64_t>(p.h) * p.dqk, ldv = static_cast<int64_t>(p.h) * p.dvd;
  const int64_t qoff = int64_t{head} * p.dqk, voff = int64_t{head} * p.dvd;
  const T* qg = static_cast<const T*>(p.q) + seq.start * ldqk + qoff;
  const T* og = static_cast<const T*>(p.dout) + seq.start * ldv + voff;
  const T* kg = static_cast<const T*>(p.k) + (seq.start + n0) * ldqk + qoff;
  const T* vg = static_cast<const T*>(p.v) + (seq.start + n0) * ldv + voff;
  const float* lse_g = p.lse + int64_t{head} * p.t + seq.start;
  const float* delta_g = p.delta + int64_t{head} * p.t + seq.start;
  const bool vec = p.dqk % 8 == 0 && p.dvd % 8 == 0;

  // Causal: only queries >= n0 see these keys.
  const int m_first = p.causal ? n0 / BMq : 0;
  const int ntiles = (len + BMq - 1) / BMq - m_first;
  auto load_q = [&](int it) {
    const int m0 = (m_first + it) * BMq, nvalid = min(BMq, len - m0), st = it & 1;
    load_tile<T, kTcThreads>(sQ + st * BMq * lq, lq, BMq, nvalid, p.dqk, vec,
                             [&](int r) { return qg + (m0 + r) * ldqk; });
    load_tile<T, kTcThreads>(sO + st * BMq * lv, lv, BMq, nvalid, p.dvd, vec,
                             [&](int r) { return og + (m0 + r) * ldv; });
    for (int i = threadIdx.x; i < BMq; i += kTcThreads) {
      sL[st * BMq + i] = i < nvalid ? lse_to_log2(lse_g[m0 + i]) : INFINITY;
      sD[st * BMq + i] = i < nvalid ? delta_g[m0 + i] : 0.0f;
    }
  };
  const int kvalid = min(BN, len - n0);
  load_tile<T, kTcThreads>(sK, lq, BN, kvalid, p.dqk, vec, [&](int r) { return kg + r * ldqk; });
  load_tile<T, kTcThreads>(sV, lv, BN, kvalid, p.dvd, vec, [&](int r) { return vg + r * ldv; });
  load_q(0);
  cp_async_commit();

  float dk[kDoDK ? DKT : 1][4], dv[kDoDV ? DVT : 1][4];
  zero(dk);
  zero(dv);
  const int kq = round16(p.dqk) / 16, kv = round16(p.dvd) / 16;

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < ntiles) load_q(it + 1);
    cp_async_commit();
    const int st = it & 1;
    const T* qs = sQ + st * BMq * lq;
    const T* os = sO + st * BMq * lv;
    const float* ls = sL + st * BMq;
    const float* ds = sD + st * BMq;

    float s[NQ][4], dp[NQ][4];
    zero(s);
    mma_abt<T, NQ>(s, sK + warp * 16 * lq, lq, qs, lq, kq, lane);
    if constexpr (kDoDK) {
      zero(dp);
      mma_abt<T, NQ>(dp, sV + warp * 16 * lv, lv, os, lv, kv, lane);
    }
    const int m0 = (m_first + it) * BMq;
#pragma unroll
    for (int nt = 0; nt < NQ; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = nt * 8 + 2 * c + (e & 1);
        const int qry = m0 + qi;
        const int key = n0 + warp * 16 + g + (e >> 1) * 8;
        const bool masked = qry >= len || key >= len || (p.causal && key > qry);
        const float pe = masked ? 0.0f : exp2f(s[nt][e] * p.scale_log2 - ls[qi]);
        s[nt][e] = pe;
        if constexpr (kDoDK) dp[nt][e] = pe * (dp[nt][e] - ds[qi]);  // dS^T
      }
    }
    if constexpr (kDoDV) mma_pb<T, BMq / 16, DVT>(dv, s, os, lv, p.dvd, lane);
    if constexpr (kDoDK) mma_pb<T, BMq / 16, DKT>(dk, dp, qs, lq, p.dqk, lane);
  }

  const int row_w = n0 + warp * 16;
  if constexpr (kDoDK) {
    const float mul[2] = {p.scale, p.scale};
    T* dst = static_cast<T*>(p.dk) + (seq.start + row_w) * ldqk + qoff;
    store_acc<T, DKT>(dk, dst, ldqk, len - row_w, p.dqk, mul, lane);
  }
  if constexpr (kDoDV) {
    const float mul[2] = {1.0f, 1.0f};
    T* dst = static_cast<T*>(p.dv) + (seq.start + row_w) * ldv + voff;
    store_acc<T, DVT>(dv, dst, ldv, len - row_w, p.dvd, mul, lane);
  }
}

// ============================================================================================
// CUDA-core kernels (float32; any dtype under R1X_MLA_SIMT=1)
// ============================================================================================
// 32 x 32 tiles, 256 threads: thread i owns row r = i / 8 of the tile and columns sub + 8 j
// (sub = i % 8) of the 32-wide score tile and of the output accumulators; the 8 threads of a row
// are 8 consecutive lanes of one warp, so row reductions are shuffles and each row's
// probabilities need only __syncwarp before the row's own threads read them back.
constexpr int kSimtThreads = 256;
constexpr int kSB = 32;
constexpr int kSimtCols = kMaxHeadDim / 8;  // accumulator columns per thread at the ceiling

// Shared pitch (floats) of a row of d values: odd (rows in distinct banks for the dot products)
// and >= round8(d), the columns the accumulator loops read (those past d are zero).
__host__ __device__ __forceinline__ int simt_pitch(int d) { return (d + 7) / 8 * 8 + 1; }

template <typename T>
__device__ __forceinline__ void simt_load(float* smem, int pitch, int rows, int nvalid, int cols,
                                          const T* src, int64_t ld) {
  for (int i = threadIdx.x; i < rows * pitch; i += kSimtThreads) {
    const int r = i / pitch, col = i - r * pitch;
    smem[i] = (r < nvalid && col < cols) ? to_float(src[r * ld + col]) : 0.0f;
  }
}

__device__ __forceinline__ float row_max8(float v) {
  v = fmaxf(v, __shfl_xor_sync(kFull, v, 1));
  v = fmaxf(v, __shfl_xor_sync(kFull, v, 2));
  return fmaxf(v, __shfl_xor_sync(kFull, v, 4));
}
__device__ __forceinline__ float row_sum8(float v) {
  v += __shfl_xor_sync(kFull, v, 1);
  v += __shfl_xor_sync(kFull, v, 2);
  return v + __shfl_xor_sync(kFull, v, 4);
}

// acc[j] += sum_k w[k] * b[k * pitch + sub + 8 j] over k < 32, for the columns j < ncols8.
__device__ __forceinline__ void simt_accumulate(float (&acc)[kSimtCols], const float* w,
                                                const float* b, int pitch, int sub, int ncols8) {
  for (int k = 0; k < kSB; ++k) {
    const float wk = w[k];
    const float* brow = b + k * pitch + sub;
#pragma unroll
    for (int j = 0; j < kSimtCols; ++j) {
      if (j < ncols8) acc[j] += wk * brow[8 * j];
    }
  }
}

template <typename T>
__device__ __forceinline__ void simt_store(const float (&acc)[kSimtCols], float mul, T* dst,
                                           int cols, int sub) {
#pragma unroll
  for (int j = 0; j < kSimtCols; ++j) {
    const int col = sub + 8 * j;
    if (col < cols) dst[col] = from_float<T>(acc[j] * mul);
  }
}

size_t fwd_simt_smem(int dqk, int dv) {
  return static_cast<size_t>(2 * kSB * simt_pitch(dqk) + kSB * simt_pitch(dv) + kSB * (kSB + 1)) *
         sizeof(float);
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) attn_fwd_simt(const FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SeqRange seq;
  int64_t row0;
  if (!find_tile(p.cu, p.batch, p.t, kSB, gridDim.x - 1 - blockIdx.x, seq, row0)) return;
  const int head = blockIdx.y;
  const int r = threadIdx.x / 8, sub = threadIdx.x % 8;
  const int len = static_cast<int>(seq.len), r0 = static_cast<int>(row0);
  const int pq = simt_pitch(p.dqk), pv = simt_pitch(p.dv);
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sK = sQ + kSB * pq;
  float* sV = sK + kSB * pq;
  float* sP = sV + kSB * pv;
  const int64_t ldqk = static_cast<int64_t>(p.h) * p.dqk, ldv = static_cast<int64_t>(p.h) * p.dv;
  const T* qg = static_cast<const T*>(p.q) + seq.start * ldqk + int64_t{head} * p.dqk;
  const T* kg = static_cast<const T*>(p.k) + seq.start * ldqk + int64_t{head} * p.dqk;
  const T* vg = static_cast<const T*>(p.v) + seq.start * ldv + int64_t{head} * p.dv;
  simt_load(sQ, pq, kSB, min(kSB, len - r0), p.dqk, qg + r0 * ldqk, ldqk);

  const int kend = p.causal ? min(len, r0 + kSB) : len;
  const int ntiles = (kend + kSB - 1) / kSB;
  const int qry = r0 + r, ncols8 = (p.dv + 7) / 8;
  float o[kSimtCols] = {};
  float m = -INFINITY, l = 0.0f;
  for (int it = 0; it < ntiles; ++it) {
    const int n0 = it * kSB, nvalid = min(kSB, len - n0);
    __syncthreads();  // the previous tile's K, V, P are no longer read
    simt_load(sK, pq, kSB, nvalid, p.dqk, kg + n0 * ldqk, ldqk);
    simt_load(sV, pv, kSB, nvalid, p.dv, vg + n0 * ldv, ldv);
    __syncthreads();
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float* qrow = sQ + r * pq;
    for (int d = 0; d < p.dqk; ++d) {
      const float qd = qrow[d];
#pragma unroll
      for (int j = 0; j < 4; ++j) s[j] += qd * sK[(sub + 8 * j) * pq + d];
    }
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int key = n0 + sub + 8 * j;
      s[j] = (key >= len || (p.causal && key > qry)) ? -INFINITY : s[j] * p.scale_log2;
      mx = fmaxf(mx, s[j]);
    }
    const float m_new = fmaxf(m, row_max8(mx));
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m - m_use);
    m = m_new;
    float rs = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float pe = exp2f(s[j] - m_use);
      sP[r * (kSB + 1) + sub + 8 * j] = pe;
      rs += pe;
    }
    l = l * alpha + rs;
#pragma unroll
    for (int j = 0; j < kSimtCols; ++j) o[j] *= alpha;
    __syncwarp();
    simt_accumulate(o, sP + r * (kSB + 1), sV, pv, sub, ncols8);
  }
  l = row_sum8(l);
  if (qry < len) {
    simt_store(o, l > 0.0f ? 1.0f / l : 0.0f,
               static_cast<T*>(p.out) + (seq.start + qry) * ldv + int64_t{head} * p.dv, p.dv, sub);
    if (sub == 0) {
      p.lse[int64_t{head} * p.t + seq.start + qry] =
          l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

size_t dq_simt_smem(int dqk, int dv) {
  return static_cast<size_t>(2 * kSB * (simt_pitch(dqk) + simt_pitch(dv)) + kSB * (kSB + 1)) *
         sizeof(float);
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) attn_bwd_dq_simt(const BwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SeqRange seq;
  int64_t row0;
  if (!find_tile(p.cu, p.batch, p.t, kSB, gridDim.x - 1 - blockIdx.x, seq, row0)) return;
  const int head = blockIdx.y;
  const int r = threadIdx.x / 8, sub = threadIdx.x % 8;
  const int len = static_cast<int>(seq.len), r0 = static_cast<int>(row0);
  const int pq = simt_pitch(p.dqk), pv = simt_pitch(p.dvd);
  float* sQ = reinterpret_cast<float*>(smem_raw);
  float* sO = sQ + kSB * pq;
  float* sK = sO + kSB * pv;
  float* sV = sK + kSB * pq;
  float* sS = sV + kSB * pv;
  const int64_t ldqk = static_cast<int64_t>(p.h) * p.dqk, ldv = static_cast<int64_t>(p.h) * p.dvd;
  const int64_t qoff = int64_t{head} * p.dqk, voff = int64_t{head} * p.dvd;
  const T* qg = static_cast<const T*>(p.q) + seq.start * ldqk + qoff;
  const T* og = static_cast<const T*>(p.dout) + seq.start * ldv + voff;
  const T* kg = static_cast<const T*>(p.k) + seq.start * ldqk + qoff;
  const T* vg = static_cast<const T*>(p.v) + seq.start * ldv + voff;
  const int qvalid = min(kSB, len - r0);
  simt_load(sQ, pq, kSB, qvalid, p.dqk, qg + r0 * ldqk, ldqk);
  simt_load(sO, pv, kSB, qvalid, p.dvd, og + r0 * ldv, ldv);

  const int qry = r0 + r;
  const int64_t stat = int64_t{head} * p.t + seq.start + qry;
  const float lse2 = qry < len ? lse_to_log2(p.lse[stat]) : INFINITY;
  const float delta = qry < len ? p.delta[stat] : 0.0f;
  const int kend = p.causal ? min(len, r0 + kSB) : len;
  const int ntiles = (kend + kSB - 1) / kSB;
  const int ncols8 = (p.dqk + 7) / 8;
  float dq[kSimtCols] = {};
  for (int it = 0; it < ntiles; ++it) {
    const int n0 = it * kSB, nvalid = min(kSB, len - n0);
    __syncthreads();
    simt_load(sK, pq, kSB, nvalid, p.dqk, kg + n0 * ldqk, ldqk);
    simt_load(sV, pv, kSB, nvalid, p.dvd, vg + n0 * ldv, ldv);
    __syncthreads();
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int d = 0; d < p.dqk; ++d) {
      const float x = sQ[r * pq + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) s[j] += x * sK[(sub + 8 * j) * pq + d];
    }
    for (int d = 0; d < p.dvd; ++d) {
      const float x = sO[r * pv + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) dp[j] += x * sV[(sub + 8 * j) * pv + d];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int key = n0 + sub + 8 * j;
      const bool masked = key >= len || (p.causal && key > qry);
      const float pe = masked ? 0.0f : exp2f(s[j] * p.scale_log2 - lse2);
      sS[r * (kSB + 1) + sub + 8 * j] = pe * (dp[j] - delta);
    }
    __syncwarp();
    simt_accumulate(dq, sS + r * (kSB + 1), sK, pq, sub, ncols8);
  }
  if (qry < len) {
    simt_store(dq, p.scale, static_cast<T*>(p.dq) + (seq.start + qry) * ldqk + qoff, p.dqk, sub);
  }
}

size_t dkdv_simt_smem(int dqk, int dv) {
  return static_cast<size_t>(2 * kSB * (simt_pitch(dqk) + simt_pitch(dv)) +
                             2 * kSB * (kSB + 1) + 2 * kSB) *
         sizeof(float);
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) attn_bwd_dkdv_simt(const BwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SeqRange seq;
  int64_t row0;
  if (!find_tile(p.cu, p.batch, p.t, kSB, gridDim.x - 1 - blockIdx.x, seq, row0)) return;
  const int head = blockIdx.y;
  const int r = threadIdx.x / 8, sub = threadIdx.x % 8;
  const int len = static_cast<int>(seq.len), n0 = static_cast<int>(row0);
  const int pq = simt_pitch(p.dqk), pv = simt_pitch(p.dvd);
  float* sK = reinterpret_cast<float*>(smem_raw);
  float* sV = sK + kSB * pq;
  float* sQ = sV + kSB * pv;
  float* sO = sQ + kSB * pq;
  float* sP = sO + kSB * pv;
  float* sS = sP + kSB * (kSB + 1);
  float* sL = sS + kSB * (kSB + 1);
  float* sD = sL + kSB;
  const int64_t ldqk = static_cast<int64_t>(p.h) * p.dqk, ldv = static_cast<int64_t>(p.h) * p.dvd;
  const int64_t qoff = int64_t{head} * p.dqk, voff = int64_t{head} * p.dvd;
  const T* qg = static_cast<const T*>(p.q) + seq.start * ldqk + qoff;
  const T* og = static_cast<const T*>(p.dout) + seq.start * ldv + voff;
  const T* kg = static_cast<const T*>(p.k) + seq.start * ldqk + qoff;
  const T* vg = static_cast<const T*>(p.v) + seq.start * ldv + voff;
  const float* lse_g = p.lse + int64_t{head} * p.t + seq.start;
  const float* delta_g = p.delta + int64_t{head} * p.t + seq.start;
  const int kvalid = min(kSB, len - n0);
  simt_load(sK, pq, kSB, kvalid, p.dqk, kg + n0 * ldqk, ldqk);
  simt_load(sV, pv, kSB, kvalid, p.dvd, vg + n0 * ldv, ldv);

  const int key = n0 + r;
  const int m_first = p.causal ? n0 / kSB : 0;
  const int ntiles = (len + kSB - 1) / kSB - m_first;
  const int ncq8 = (p.dqk + 7) / 8, ncv8 = (p.dvd + 7) / 8;
  float dk[kSimtCols] = {}, dv[kSimtCols] = {};
  for (int it = 0; it < ntiles; ++it) {
    const int m0 = (m_first + it) * kSB, nvalid = min(kSB, len - m0);
    __syncthreads();
    simt_load(sQ, pq, kSB, nvalid, p.dqk, qg + m0 * ldqk, ldqk);
    simt_load(sO, pv, kSB, nvalid, p.dvd, og + m0 * ldv, ldv);
    if (threadIdx.x < kSB) {
      const int i = threadIdx.x;
      sL[i] = i < nvalid ? lse_to_log2(lse_g[m0 + i]) : INFINITY;
      sD[i] = i < nvalid ? delta_g[m0 + i] : 0.0f;
    }
    __syncthreads();
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int d = 0; d < p.dqk; ++d) {
      const float x = sK[r * pq + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) s[j] += x * sQ[(sub + 8 * j) * pq + d];
    }
    for (int d = 0; d < p.dvd; ++d) {
      const float x = sV[r * pv + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) dp[j] += x * sO[(sub + 8 * j) * pv + d];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int qi = sub + 8 * j, qry = m0 + qi;
      const bool masked = qry >= len || key >= len || (p.causal && key > qry);
      const float pe = masked ? 0.0f : exp2f(s[j] * p.scale_log2 - sL[qi]);
      sP[r * (kSB + 1) + qi] = pe;
      sS[r * (kSB + 1) + qi] = pe * (dp[j] - sD[qi]);
    }
    __syncwarp();
    simt_accumulate(dv, sP + r * (kSB + 1), sO, pv, sub, ncv8);
    simt_accumulate(dk, sS + r * (kSB + 1), sQ, pq, sub, ncq8);
  }
  if (key < len) {
    simt_store(dk, p.scale, static_cast<T*>(p.dk) + (seq.start + key) * ldqk + qoff, p.dqk, sub);
    simt_store(dv, 1.0f, static_cast<T*>(p.dv) + (seq.start + key) * ldv + voff, p.dvd, sub);
  }
}

// ============================================================================================
// Delta = rowsum(dO * O) - grad_lse, fp32 [h, t]: one warp per (token, head) row.
// ============================================================================================
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_delta(const T* __restrict__ dout,
                                                      const T* __restrict__ out,
                                                      const float* __restrict__ grad_lse,
                                                      float* __restrict__ delta, int64_t t, int h,
                                                      int dv) {
  const int lane = threadIdx.x & 31;
  const int64_t rows = t * h;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
       row < rows; row += static_cast<int64_t>(gridDim.x) * blockDim.x / 32) {
    const T* a = dout + row * dv;
    const T* b = out + row * dv;
    float acc = 0.0f;
    for (int i = lane; i < dv; i += 32) acc += to_float(a[i]) * to_float(b[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
    if (lane == 0) {
      const int64_t tok = row / h, hd = row - tok * h;
      const int64_t i = hd * t + tok;
      delta[i] = acc - (grad_lse != nullptr ? grad_lse[i] : 0.0f);
    }
  }
}

// ============================================================================================
// Host side
// ============================================================================================
bool force_simt() {
  const char* e = std::getenv("R1X_MLA_SIMT");
  return e != nullptr && e[0] == '1';
}

template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, int64_t tiles, int h, int threads, size_t smem,
                   cudaStream_t stream, const Params& p) {
  if (tiles > INT_MAX) return cudaErrorInvalidValue;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(h));
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

bool valid_shape(int64_t batch, int64_t t, int64_t h, int64_t dqk, int64_t dv) {
  return batch >= 1 && batch < INT_MAX && t >= 1 && t <= INT_MAX - 2 * kTcRows && h >= 1 &&
         h <= kMaxHeads && dqk >= 1 && dqk <= kMaxHeadDim && dv >= 1 && dv <= kMaxHeadDim;
}

bool force_mma_sync() {
  const char* e = std::getenv("R1X_MLA_NO_SM90");
  return e != nullptr && e[0] == '1';
}

template <typename T>
cudaError_t forward_tc(const FwdParams& p, cudaStream_t stream) {
  if (attention_forward_sm90_takes(p.dqk, p.dv) && !force_mma_sync()) {
    return attention_forward_sm90<T>(p, stream);
  }
  const int64_t tiles = num_tiles(p.t, p.batch, kTcRows);
  const size_t es = sizeof(T);
  if (p.dv <= 64) {
    return launch(attn_fwd_tc<T, 64>, tiles, p.h, kTcThreads, fwd_tc_smem<64>(p.dqk, p.dv, es),
                  stream, p);
  }
  if (p.dv <= 128) {
    return launch(attn_fwd_tc<T, 128>, tiles, p.h, kTcThreads, fwd_tc_smem<128>(p.dqk, p.dv, es),
                  stream, p);
  }
  return launch(attn_fwd_tc<T, 256>, tiles, p.h, kTcThreads, fwd_tc_smem<256>(p.dqk, p.dv, es),
                stream, p);
}

template <typename T>
cudaError_t forward_simt(const FwdParams& p, cudaStream_t stream) {
  return launch(attn_fwd_simt<T>, num_tiles(p.t, p.batch, kSB), p.h, kSimtThreads,
                fwd_simt_smem(p.dqk, p.dv), stream, p);
}

template <typename T, int kDqk, int BN>
cudaError_t launch_dq_tc(const BwdParams& p, cudaStream_t stream) {
  return launch(attn_bwd_dq_tc<T, kDqk, BN>, num_tiles(p.t, p.batch, kTcRows), p.h, kTcThreads,
                dq_tc_smem<kDqk, BN>(p.dqk, p.dvd, sizeof(T)), stream, p);
}

template <typename T, int kDqk, int kDv, int BMq, bool kDK, bool kDV>
cudaError_t launch_dkdv_tc(const BwdParams& p, cudaStream_t stream) {
  return launch(attn_bwd_dkdv_tc<T, kDqk, kDv, BMq, kDK, kDV>, num_tiles(p.t, p.batch, kTcRows),
                p.h, kTcThreads, dkdv_tc_smem<BMq>(p.dqk, p.dvd, sizeof(T)), stream, p);
}

template <typename T>
cudaError_t backward_tc(const BwdParams& p, cudaStream_t stream) {
  cudaError_t err;
  if (p.dqk <= 64) err = launch_dq_tc<T, 64, 64>(p, stream);
  else if (p.dqk <= 128) err = launch_dq_tc<T, 128, 64>(p, stream);
  else if (p.dqk <= 192) err = launch_dq_tc<T, 192, 64>(p, stream);
  else err = launch_dq_tc<T, 256, 32>(p, stream);
  if (err != cudaSuccess) return err;
  // dK and dV together while both accumulators fit in registers, else one pass each.
  if (p.dqk <= 64 && p.dvd <= 64) return launch_dkdv_tc<T, 64, 64, 64, true, true>(p, stream);
  if (p.dqk <= 128 && p.dvd <= 128) return launch_dkdv_tc<T, 128, 128, 32, true, true>(p, stream);
  if (p.dqk <= 192 && p.dvd <= 128) return launch_dkdv_tc<T, 192, 128, 32, true, true>(p, stream);
  err = launch_dkdv_tc<T, 256, 16, 32, true, false>(p, stream);
  if (err != cudaSuccess) return err;
  return launch_dkdv_tc<T, 16, 256, 32, false, true>(p, stream);
}

template <typename T>
cudaError_t backward_simt(const BwdParams& p, cudaStream_t stream) {
  const int64_t tiles = num_tiles(p.t, p.batch, kSB);
  cudaError_t err = launch(attn_bwd_dq_simt<T>, tiles, p.h, kSimtThreads,
                           dq_simt_smem(p.dqk, p.dvd), stream, p);
  if (err != cudaSuccess) return err;
  return launch(attn_bwd_dkdv_simt<T>, tiles, p.h, kSimtThreads, dkdv_simt_smem(p.dqk, p.dvd),
                stream, p);
}

template <typename T>
cudaError_t backward_typed(const BwdParams& p, const void* out, const float* grad_lse,
                           float* delta, bool tc, cudaStream_t stream) {
  attn_bwd_delta<T><<<grid_for(p.t * p.h, 8), 256, 0, stream>>>(
      static_cast<const T*>(p.dout), static_cast<const T*>(out), grad_lse, delta, p.t, p.h,
      p.dvd);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  BwdParams with_delta = p;
  with_delta.delta = delta;
  if constexpr (!std::is_same_v<T, float>) {
    if (tc) return backward_tc<T>(with_delta, stream);
  }
  return backward_simt<T>(with_delta, stream);
}

}  // namespace

int64_t mla_attention_max_head_dim() { return kMaxHeadDim; }
int64_t mla_attention_max_heads() { return kMaxHeads; }

cudaError_t mla_attention_forward(const void* q, const void* k, const void* v, DType dtype,
                                  const int32_t* cu_seqlens, int64_t batch, int64_t t, int64_t h,
                                  int64_t dqk, int64_t dv, bool causal, float scale, void* out,
                                  float* lse, cudaStream_t stream) {
  if (!valid_shape(batch, t, h, dqk, dv)) return cudaErrorInvalidValue;
  FwdParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.cu = cu_seqlens;
  p.batch = static_cast<int>(batch);
  p.t = t;
  p.h = static_cast<int>(h);
  p.dqk = static_cast<int>(dqk);
  p.dv = static_cast<int>(dv);
  p.causal = causal;
  p.scale_log2 = scale * kLog2e;
  const bool simt = dtype == DType::kFloat32 || force_simt();
  switch (dtype) {
    case DType::kFloat32: return forward_simt<float>(p, stream);
    case DType::kBFloat16:
      return simt ? forward_simt<__nv_bfloat16>(p, stream) : forward_tc<__nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return simt ? forward_simt<__half>(p, stream) : forward_tc<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

size_t mla_attention_backward_workspace_bytes(int64_t t, int64_t h) {
  return static_cast<size_t>(t > 0 ? t : 0) * static_cast<size_t>(h > 0 ? h : 0) * sizeof(float);
}

cudaError_t mla_attention_backward(const void* grad_out, const void* q, const void* k,
                                   const void* v, const void* out, const float* lse,
                                   const float* grad_lse, DType dtype, const int32_t* cu_seqlens,
                                   int64_t batch, int64_t t, int64_t h, int64_t dqk, int64_t dv,
                                   bool causal, float scale, void* grad_q, void* grad_k,
                                   void* grad_v, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream) {
  if (!valid_shape(batch, t, h, dqk, dv)) return cudaErrorInvalidValue;
  if (workspace == nullptr || workspace_bytes < mla_attention_backward_workspace_bytes(t, h)) {
    return cudaErrorInvalidValue;
  }
  BwdParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.dout = grad_out;
  p.lse = lse;
  p.delta = nullptr;
  p.dq = grad_q;
  p.dk = grad_k;
  p.dv = grad_v;
  p.cu = cu_seqlens;
  p.batch = static_cast<int>(batch);
  p.t = t;
  p.h = static_cast<int>(h);
  p.dqk = static_cast<int>(dqk);
  p.dvd = static_cast<int>(dv);
  p.causal = causal;
  p.scale = scale;
  p.scale_log2 = scale * kLog2e;
  float* delta = static_cast<float*>(workspace);
  const bool tc = dtype != DType::kFloat32 && !force_simt();
  switch (dtype) {
    case DType::kFloat32: return backward_typed<float>(p, out, grad_lse, delta, false, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(p, out, grad_lse, delta, tc, stream);
    case DType::kFloat16: return backward_typed<__half>(p, out, grad_lse, delta, tc, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace r1x::cuda
