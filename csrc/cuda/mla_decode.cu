// Absorbed MLA decode over a paged latent cache (mla_launch.h's mla_decode), FlashMLA semantics.
//
// The sq * heads query rows of a sequence share every K/V row (K = the whole cache row, V its
// first dv columns), so a CTA takes a tile of those rows (row = s * heads + h, q's own layout)
// and streams the sequence's cache rows once for all of them. cache_seqlens never reaches the
// host: the host picks a number of splits from the shapes alone, and CTA (b, row tile, split)
// attends its share [split * chunk, (split + 1) * chunk) of the actual L, chunk =
// round_up(ceil(L / splits), tile). With splits > 1 the CTAs write a normalised partial out and
// its lse (fp32) to the workspace and a combine kernel merges them:
//   lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s
// (an empty split has lse_s = -inf and weight 0; a row with nothing visible anywhere gets 0 and
// -inf). Cache rows are only read for tokens < L, through clamped block-table entries.
//
// bf16/fp16, more than 32 rows, d in (384, 576], dv in (256, 512] (DeepSeek: 576 / 512): the
//   sm_90a wgmma kernel below, 64-row tiles, 64-token K tiles.
// Other bf16/fp16 with d <= 576, dv <= 512: tensor cores (mma.sync m16n8k16), 8 warps, row tiles
//   of 16, 32 or 64 rows (chosen from sq * heads), 32-token K tiles multi-buffered with cp.async.
//   Per tile: S = Q K^T (each warp a 16 x 16 block of S over a share of the d columns; partial
//   sums meet in shared memory), the online softmax by row in shared memory, then O += P V with
//   O's 512 columns split across the warps of each 16-row group (O stays in registers).
// Everything else (float32, larger dims, R1X_MLA_SIMT=1): CUDA cores, 16 rows x 32 tokens,
//   d streamed in 64-column chunks, dv in 256-column chunks (one per grid z index).

#include "cuda/mla_launch.h"

#include "cuda/common.cuh"
#include "cuda/mla_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace r1x::cuda {
namespace {

using namespace mla;

constexpr int kMaxSplits = 64;
constexpr int kThreads = 256;
constexpr int kTcMaxD = 576;
constexpr int kTcMaxDv = 512;

struct DecodeParams {
  const void* q;
  const void* kv;
  const int32_t* table;
  const int32_t* seqlens;
  void* out;
  float* lse;
  float* o_part;    // [splits, batch, rows, dv] when splits > 1
  float* lse_part;  // [splits, batch, rows]
  int batch, sq, h, d, dv, rows;
  int block_size, max_blocks, num_blocks;
  int block_shift;  // log2(block_size) when it is a power of two, else -1
  int cap;  // tokens a sequence can hold (0: nothing can be read)
  int row_tiles, splits;
  bool causal;
  bool vec;  // d % 8 == 0 and q, kv_cache 16-byte aligned: 16-byte cp.async row loads
  float scale_log2;
};

struct TokenRange {
  int begin, end;
};

__device__ __forceinline__ int seq_len(const DecodeParams& p, int b) {
  const int L = p.seqlens[b];
  return L < 0 ? 0 : (L > p.cap ? p.cap : L);
}

// Tokens of split `split` that rows [m0, m0 + mrows) may see. Causal: row r (query s = r / h)
// sees j <= L - sq + s, so nothing past the tile's last query's limit is needed.
__device__ __forceinline__ TokenRange split_range(const DecodeParams& p, int L, int split, int m0,
                                                  int mrows, int tile) {
  const int per = (L + p.splits - 1) / p.splits;
  const int chunk = (per + tile - 1) / tile * tile;
  const int64_t begin = static_cast<int64_t>(split) * chunk;
  int64_t end = begin + chunk < L ? begin + chunk : L;
  if (p.causal) {
    const int64_t lim = static_cast<int64_t>(L) - p.sq + (m0 + mrows - 1) / p.h + 1;
    end = end < lim ? end : lim;
  }
  if (begin >= end) return {0, 0};
  return {static_cast<int>(begin), static_cast<int>(end)};
}

// Exclusive end of the tokens row `row` (< rows) sees.
__device__ __forceinline__ int visible_end(const DecodeParams& p, int L, int row) {
  if (row >= p.rows) return 0;
  return p.causal ? L - p.sq + row / p.h + 1 : L;
}

// Element offset of token j's cache row (j < L <= cap, so the table index is in range; the
// entry itself is clamped).
__device__ __forceinline__ int64_t token_offset(const DecodeParams& p, int b, int j) {
  // (Shifts for the usual power-of-two block sizes: a division per cache row is not free.)
  const int page = p.block_shift >= 0 ? j >> p.block_shift : j / p.block_size;
  const int slot = p.block_shift >= 0 ? j & (p.block_size - 1) : j - page * p.block_size;
  int64_t blk = p.table[static_cast<int64_t>(b) * p.max_blocks + page];
  blk = blk < 0 ? 0 : (blk >= p.num_blocks ? p.num_blocks - 1 : blk);
  return (blk * p.block_size + slot) * static_cast<int64_t>(p.d);
}

// Result of one (row, column) pair / one row, final or partial.
template <typename T>
__device__ __forceinline__ void put_out(const DecodeParams& p, int b, int split, int row, int col,
                                        float v) {
  if (p.splits == 1) {
    static_cast<T*>(p.out)[(static_cast<int64_t>(b) * p.rows + row) * p.dv + col] =
        from_float<T>(v);
  } else {
    p.o_part[((static_cast<int64_t>(split) * p.batch + b) * p.rows + row) * p.dv + col] = v;
  }
}
__device__ __forceinline__ void put_lse(const DecodeParams& p, int b, int split, int row,
                                        float v) {
  if (p.splits == 1) {
    const int s = row / p.h, hd = row - s * p.h;
    p.lse[(static_cast<int64_t>(b) * p.h + hd) * p.sq + s] = v;
  } else {
    p.lse_part[(static_cast<int64_t>(split) * p.batch + b) * p.rows + row] = v;
  }
}

// Nothing visible to rows [m0, m0 + mrows) in this split: out 0 (columns [c0, c1)), lse -inf.
template <typename T>
__device__ void put_empty(const DecodeParams& p, int b, int split, int m0, int mrows, int c0,
                          int c1, bool with_lse) {
  const int cols = c1 - c0;
  for (int i = threadIdx.x; i < mrows * cols; i += blockDim.x) {
    const int r = i / cols;
    put_out<T>(p, b, split, m0 + r, c0 + (i - r * cols), 0.0f);
  }
  if (with_lse) {
    for (int r = threadIdx.x; r < mrows; r += blockDim.x) put_lse(p, b, split, m0 + r, -INFINITY);
  }
}

// ============================================================================================
// Tensor-core kernel
// ============================================================================================
template <int BM, int BN, int STAGES>
struct TcConfig {
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kMt = BM / 16;                 // 16-row groups
  static constexpr int kUnits = kMt * (BN / 16);      // 16 x 16 blocks of S per tile
  static constexpr int kSplitK = kWarps / kUnits;     // warps sharing one block (over d)
  static constexpr int kWarpsPerMt = kWarps / kMt;    // warps sharing a row group's O
  static constexpr int kNtw = kTcMaxDv / 8 / kWarpsPerMt;  // O's n8 tiles per warp
  static constexpr int kTpr = kThreads / BM;          // softmax threads per row
  static constexpr int kCpt = BN / kTpr;              // softmax columns per thread
  static constexpr int kPitchP = BN + 8;              // sP pitch (16-bit elements)
  static constexpr int kPitchS = BN + 8;              // sS pitch (floats)
  static_assert(kWarps % kUnits == 0 && kWarps % kMt == 0 && kNtw % 2 == 0, "tile shape");
  static_assert(kTpr <= 32 && BN % kTpr == 0, "softmax rows must stay inside a warp");

  static size_t smem_bytes(int d, size_t esize) {
    const int ld = tile_pitch(d);
    return static_cast<size_t>(BM * ld + STAGES * BN * ld + BM * kPitchP) * esize +
           static_cast<size_t>(kSplitK * BM * kPitchS + 3 * BM) * sizeof(float);
  }
};

template <typename T, int BM, int BN, int STAGES>
__global__ void __launch_bounds__(kThreads, 1) decode_tc(const DecodeParams p) {
  using C = TcConfig<BM, BN, STAGES>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int b = blockIdx.x / p.row_tiles, rt = blockIdx.x - b * p.row_tiles;
  const int split = blockIdx.y;
  const int m0 = rt * BM, mrows = min(BM, p.rows - m0);
  const int L = seq_len(p, b);
  const TokenRange rg = split_range(p, L, split, m0, mrows, BN);
  if (rg.end <= rg.begin) {
    put_empty<T>(p, b, split, m0, mrows, 0, p.dv, true);
    return;
  }
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
  const int ld = tile_pitch(p.d);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * ld;
  T* sP = sK + STAGES * BN * ld;
  float* sS = reinterpret_cast<float*>(sP + BM * C::kPitchP);
  float* sM = sS + C::kSplitK * BM * C::kPitchS;  // running max (base 2), per row
  float* sL = sM + BM;                            // running sum
  float* sA = sL + BM;                            // this tile's rescale factor

  const T* kv = static_cast<const T*>(p.kv);
  const T* qg = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.rows + m0) * p.d;
  const bool vec = p.vec;
  const int ntiles = (rg.end - rg.begin + BN - 1) / BN;
  auto load_k = [&](int it) {
    const int t0 = rg.begin + it * BN;
    load_tile<T, kThreads>(sK + (it % STAGES) * BN * ld, ld, BN, min(BN, rg.end - t0), p.d, vec,
                           [&](int r) { return kv + token_offset(p, b, t0 + r); });
  };
  load_tile<T, kThreads>(sQ, ld, BM, mrows, p.d, vec,
                         [&](int r) { return qg + static_cast<int64_t>(r) * p.d; });
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) load_k(s);
    cp_async_commit();  // (empty groups keep the group count uniform)
  }
  if (tid < BM) {
    sM[tid] = -INFINITY;
    sL[tid] = 0.0f;
  }

  // S phase: block (smt, snp) of S, d steps [kb, ke).
  const int unit = warp % C::kUnits, kpart = warp / C::kUnits;
  const int smt = unit % C::kMt, snp = unit / C::kMt;
  const int ksteps = round16(p.d) / 16;
  const int kb = ksteps * kpart / C::kSplitK, ke = ksteps * (kpart + 1) / C::kSplitK;
  const T* s_a = sQ + (smt * 16 + (lane & 15)) * ld + (lane >> 4) * 8;
  const int s_b = (snp * 16 + (lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8;
  float* s_out = sS + kpart * BM * C::kPitchS;
  // Softmax phase: row sr, columns sub + kTpr * i.
  const int sr = tid / C::kTpr, sub = tid % C::kTpr;
  const int vis_end = visible_end(p, L, m0 + sr);
  // PV phase: rows of group pmt, O columns [col0, col0 + 8 * kNtw).
  const int pmt = warp % C::kMt, col0 = (warp / C::kMt) * C::kNtw * 8;
  const T* pv_a = sP + (pmt * 16 + (lane & 15)) * C::kPitchP + (lane >> 4) * 8;
  const int pv_b = ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + col0 + (lane >> 4) * 8;
  float o[C::kNtw][4];
#pragma unroll
  for (int i = 0; i < C::kNtw; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile `it` landed; tile it - 1 is no longer read
    if (it + STAGES - 1 < ntiles) load_k(it + STAGES - 1);
    cp_async_commit();
    const T* ks = sK + (it % STAGES) * BN * ld;
    const int t0 = rg.begin + it * BN;

    {
      float acc[2][4] = {};
      for (int kk = kb; kk < ke; ++kk) {
        uint32_t a[4], bf[4];
        ldsm_x4(s_a + kk * 16, a);
        ldsm_x4(ks + s_b + kk * 16, bf);
        mma16816<T>(acc[0], a, bf[0], bf[1]);
        mma16816<T>(acc[1], a, bf[2], bf[3]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = smt * 16 + g + half * 8, col = snp * 16 + j * 8 + 2 * c;
          *reinterpret_cast<float2*>(s_out + row * C::kPitchS + col) =
              make_float2(acc[j][2 * half], acc[j][2 * half + 1]);
        }
      }
    }
    __syncthreads();

    {
      float x[C::kCpt];
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < C::kCpt; ++i) {
        const int col = sub + C::kTpr * i, tok = t0 + col;
        float v = 0.0f;
#pragma unroll
        for (int kp = 0; kp < C::kSplitK; ++kp) v += sS[(kp * BM + sr) * C::kPitchS + col];
        x[i] = (tok < rg.end && tok < vis_end) ? v * p.scale_log2 : -INFINITY;
        mx = fmaxf(mx, x[i]);
      }
#pragma unroll
      for (int off = C::kTpr / 2; off > 0; off >>= 1) {
        mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
      }
      const float m_old = sM[sr];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // no NaN from -inf - -inf
      const float alpha = exp2f(m_old - m_use);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < C::kCpt; ++i) {
        const float pe = exp2f(x[i] - m_use);
        sP[sr * C::kPitchP + sub + C::kTpr * i] = from_float<T>(pe);
        sum += pe;
      }
#pragma unroll
      for (int off = C::kTpr / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
      __syncwarp();  // every thread of the row has read sM[sr]
      if (sub == 0) {
        sM[sr] = m_new;
        sL[sr] = sL[sr] * alpha + sum;
        sA[sr] = alpha;
      }
    }
    __syncthreads();

    {
      const float a0 = sA[pmt * 16 + g], a1 = sA[pmt * 16 + g + 8];
#pragma unroll
      for (int nt = 0; nt < C::kNtw; ++nt) {
        o[nt][0] *= a0;
        o[nt][1] *= a0;
        o[nt][2] *= a1;
        o[nt][3] *= a1;
      }
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(pv_a + kk * 16, a);
#pragma unroll
        for (int np = 0; np < C::kNtw / 2; ++np) {
          if (col0 + np * 16 < p.dv) {
            uint32_t bf[4];
            ldsm_x4_trans(ks + pv_b + kk * 16 * ld + np * 16, bf);
            mma16816<T>(o[2 * np], a, bf[0], bf[1]);
            mma16816<T>(o[2 * np + 1], a, bf[2], bf[3]);
          }
        }
      }
    }
  }
  __syncthreads();  // final sM, sL

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = pmt * 16 + g + half * 8;
    if (r >= mrows) continue;
    const float l = sL[r], inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int nt = 0; nt < C::kNtw; ++nt) {
      const int col = col0 + nt * 8 + 2 * c;
      if (col < p.dv) put_out<T>(p, b, split, m0 + r, col, o[nt][2 * half] * inv);
      if (col + 1 < p.dv) put_out<T>(p, b, split, m0 + r, col + 1, o[nt][2 * half + 1] * inv);
    }
  }
  if (tid < mrows) {
    const float l = sL[tid];
    put_lse(p, b, split, m0 + tid, l > 0.0f ? (sM[tid] + log2f(l)) * kLn2 : -INFINITY);
  }
}

// ============================================================================================
// sm_90a kernel (wgmma) for 64-row tiles of the DeepSeek shape (d <= 576, dv <= 512)
// ============================================================================================
// Two warpgroups share the 64 rows: warpgroup w computes S for tokens [32 w, 32 w + 32) of each
// 64-token tile (S = Q K^T, both operands in shared memory), the warpgroups swap row maxima
// through shared memory, write P (bf16/fp16) to shared memory, and each then accumulates O for
// V columns [256 w, 256 w + 256) (P V with V read MN-major from the same K tile). Q and the K
// tiles are 128-byte-swizzled (mla_common.cuh); K tiles are double-buffered with cp.async, one
// row per token through the block table.
constexpr int kWgD = 576, kWgDv = 512, kWgBM = 64, kWgBN = 64;

size_t sm90_smem_bytes() {
  return static_cast<size_t>(kWgBM * kWgD + 2 * kWgBN * kWgD + kWgBM * kWgBN) * 2 +
         2 * kWgBM * sizeof(float) + 1024;
}

bool sm90_takes(const MlaDecodeShape& s) {
  return s.d % 8 == 0 && s.dv % 8 == 0 && s.d > 384 && s.d <= kWgD && s.dv > 256 &&
         s.dv <= kWgDv && s.sq * s.heads > 32;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_sm90(const DecodeParams p) {
  constexpr int BM = kWgBM, BN = kWgBN, D = kWgD;
  constexpr int kStageK = BN * D * 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* sQ = smem;
  unsigned char* sK = sQ + BM * D * 2;     // 2 stages
  unsigned char* sP = sK + 2 * kStageK;    // P: 64 rows x 64 tokens, one swizzled atom column
  float* sRed = reinterpret_cast<float*>(sP + BM * BN * 2);  // [2][64]: per-warpgroup row values

  const int b = blockIdx.x / p.row_tiles, rt = blockIdx.x - b * p.row_tiles;
  const int split = blockIdx.y;
  const int m0 = rt * BM, mrows = min(BM, p.rows - m0);
  const int L = seq_len(p, b);
  const TokenRange rg = split_range(p, L, split, m0, mrows, BN);
  if (rg.end <= rg.begin) {
    put_empty<T>(p, b, split, m0, mrows, 0, p.dv, true);
    return;
  }
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, c = lane & 3;
  const T* kv = static_cast<const T*>(p.kv);
  const T* qg = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.rows + m0) * p.d;
  const int ntiles = (rg.end - rg.begin + BN - 1) / BN;
  auto load_k = [&](int it) {
    const int t0 = rg.begin + it * BN;
    load_sw128<T, D, kThreads>(sK + (it & 1) * kStageK, BN, min(BN, rg.end - t0), p.d,
                               [&](int r) { return kv + token_offset(p, b, t0 + r); });
  };
  load_sw128<T, D, kThreads>(sQ, BM, mrows, p.d,
                             [&](int r) { return qg + static_cast<int64_t>(r) * p.d; });
  load_k(0);
  cp_async_commit();

  // S: A = Q (64 rows), B = this warpgroup's 32 tokens (rows 32 wg of the K tile), K-major.
  // P V: A = P (K-major, 64 tokens), B = V columns [256 wg, 256 wg + 256) of the K tile,
  // MN-major (mla_smem.h; the first 512 of its 576 columns, laid out as a 512-column tile).

  int rloc[2], vis_end[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    rloc[half] = warp * 16 + g + half * 8;
    vis_end[half] = visible_end(p, L, m0 + rloc[half]);
  }
  float o[kWgDv / 4];  // 64 x 256 per warpgroup
#pragma unroll
  for (int i = 0; i < kWgDv / 4; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: partial, this thread's tokens

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // tile it landed; tile it - 1 (its P and V) is no longer read
    if (it + 1 < ntiles) load_k(it + 1);
    cp_async_commit();
    const unsigned char* k_stage = sK + (it & 1) * kStageK;

    float s[16];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wgmma_ss<T, 32>(s, smem::k_major_desc<BM, D, BM>(sQ, 0, kk),
                      smem::k_major_desc<BN, D, 32>(k_stage, wg, kk), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(s);

    const int t0 = rg.begin + it * BN + wg * 32;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int half = (i >> 1) & 1, tok = t0 + (i >> 2) * 8 + 2 * c + (i & 1);
      s[i] = (tok < rg.end && tok < vis_end[half]) ? s[i] * p.scale_log2 : -INFINITY;
      mx[half] = fmaxf(mx[half], s[i]);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(kFull, mx[half], 1));
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(kFull, mx[half], 2));
      if (c == 0) sRed[wg * BM + rloc[half]] = mx[half];
    }
    __syncthreads();  // both warpgroups' maxima
    float alpha[2], m_use[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float m_new =
          fmaxf(m[half], fmaxf(sRed[rloc[half]], sRed[BM + rloc[half]]));
      m_use[half] = m_new == -INFINITY ? 0.0f : m_new;  // no NaN from -inf - -inf
      alpha[half] = exp2f(m[half] - m_use[half]);
      m[half] = m_new;
    }
    float rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float p0 = exp2f(s[4 * nt + 2 * half] - m_use[half]);
        const float p1 = exp2f(s[4 * nt + 2 * half + 1] - m_use[half]);
        rs[half] += p0 + p1;
        const int r = rloc[half], kc = wg * 4 + nt;  // 16-byte chunk of the token pair
        *reinterpret_cast<uint32_t*>(sP + sw128_offset(BM, r, kc) + c * 4) = pack2<T>(p0, p1);
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) l[half] = l[half] * alpha[half] + rs[half];
#pragma unroll
    for (int i = 0; i < kWgDv / 4; ++i) o[i] *= alpha[(i >> 1) & 1];
    fence_proxy_async();
    __syncthreads();  // P complete

    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      wgmma_sst<T, 256>(o, smem::k_major_desc<BM, BN, BM>(sP, 0, kk),
                        smem::mn_major_desc<BN, kWgDv, 256>(k_stage, wg, kk), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
  }

  // Row sums: each warpgroup saw half of every tile.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    l[half] += __shfl_xor_sync(kFull, l[half], 1);
    l[half] += __shfl_xor_sync(kFull, l[half], 2);
  }
  __syncthreads();  // the last maxima are read
  if (c == 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) sRed[wg * BM + rloc[half]] = l[half];
  }
  __syncthreads();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = rloc[half];
    if (r >= mrows) continue;
    const float lt = sRed[r] + sRed[BM + r], inv = lt > 0.0f ? 1.0f / lt : 0.0f;
#pragma unroll
    for (int nt = 0; nt < kWgDv / 16; ++nt) {
      const int col = wg * 256 + nt * 8 + 2 * c;
      if (col < p.dv) put_out<T>(p, b, split, m0 + r, col, o[4 * nt + 2 * half] * inv);
      if (col + 1 < p.dv) put_out<T>(p, b, split, m0 + r, col + 1, o[4 * nt + 2 * half + 1] * inv);
    }
    if (wg == 0 && c == 0) {
      put_lse(p, b, split, m0 + r, lt > 0.0f ? (m[half] + log2f(lt)) * kLn2 : -INFINITY);
    }
  }
}

// ============================================================================================
// CUDA-core kernel (any dtype, any d and dv)
// ============================================================================================
constexpr int kSR = 16;    // rows per CTA
constexpr int kST = 32;    // tokens per tile
constexpr int kSDC = 64;   // d columns per chunk of the score product
constexpr int kSDV = 256;  // dv columns per CTA (grid z)
constexpr int kSTpr = kThreads / kSR;  // 16 threads per row

size_t simt_smem_bytes() {
  return static_cast<size_t>(kSR * (kSDC + 1) + kST * (kSDC + 1) + kSR * (kST + 1) + kST * kSDV) *
             sizeof(float) +
         kST * sizeof(int64_t);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) decode_simt(const DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int b = blockIdx.x / p.row_tiles, rt = blockIdx.x - b * p.row_tiles;
  const int split = blockIdx.y;
  const int c0 = blockIdx.z * kSDV, ccols = min(kSDV, p.dv - c0);
  const int m0 = rt * kSR, mrows = min(kSR, p.rows - m0);
  const int L = seq_len(p, b);
  const TokenRange rg = split_range(p, L, split, m0, mrows, kST);
  if (rg.end <= rg.begin) {
    put_empty<T>(p, b, split, m0, mrows, c0, c0 + ccols, blockIdx.z == 0);
    return;
  }
  int64_t* sRow = reinterpret_cast<int64_t*>(smem_raw);
  float* sQ = reinterpret_cast<float*>(sRow + kST);
  float* sK = sQ + kSR * (kSDC + 1);
  float* sP = sK + kST * (kSDC + 1);
  float* sV = sP + kSR * (kST + 1);
  const int tid = threadIdx.x, r = tid / kSTpr, sub = tid % kSTpr;
  const T* kv = static_cast<const T*>(p.kv);
  const T* qg = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.rows + m0) * p.d;
  const int vis_end = visible_end(p, L, m0 + r);

  float o[kSDV / kSTpr] = {};
  float m = -INFINITY, l = 0.0f;  // l: this thread's partial sum
  for (int t0 = rg.begin; t0 < rg.end; t0 += kST) {
    const int nvalid = min(kST, rg.end - t0);
    __syncthreads();  // the previous tile's sRow, sP, sV are no longer read
    if (tid < kST) sRow[tid] = tid < nvalid ? token_offset(p, b, t0 + tid) : 0;
    float s[2] = {0.0f, 0.0f};
    for (int d0 = 0; d0 < p.d; d0 += kSDC) {
      __syncthreads();
      for (int i = tid; i < kSR * kSDC; i += kThreads) {
        const int rr = i / kSDC, cc = i - rr * kSDC;
        sQ[rr * (kSDC + 1) + cc] =
            (rr < mrows && d0 + cc < p.d) ? to_float(qg[static_cast<int64_t>(rr) * p.d + d0 + cc])
                                          : 0.0f;
      }
      for (int i = tid; i < kST * kSDC; i += kThreads) {
        const int rr = i / kSDC, cc = i - rr * kSDC;
        sK[rr * (kSDC + 1) + cc] =
            (rr < nvalid && d0 + cc < p.d) ? to_float(kv[sRow[rr] + d0 + cc]) : 0.0f;
      }
      __syncthreads();
      const float* qrow = sQ + r * (kSDC + 1);
      for (int dd = 0; dd < kSDC; ++dd) {
        const float qd = qrow[dd];
        s[0] += qd * sK[sub * (kSDC + 1) + dd];
        s[1] += qd * sK[(sub + kSTpr) * (kSDC + 1) + dd];
      }
    }
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int tok = t0 + sub + kSTpr * j;
      s[j] = (tok < rg.end && tok < vis_end) ? s[j] * p.scale_log2 : -INFINITY;
      mx = fmaxf(mx, s[j]);
    }
#pragma unroll
    for (int off = kSTpr / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
    const float m_new = fmaxf(m, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m - m_use);
    m = m_new;
    float rs = 0.0f;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float pe = exp2f(s[j] - m_use);
      sP[r * (kST + 1) + sub + kSTpr * j] = pe;
      rs += pe;
    }
    l = l * alpha + rs;
#pragma unroll
    for (int i = 0; i < kSDV / kSTpr; ++i) o[i] *= alpha;
    for (int i = tid; i < kST * kSDV; i += kThreads) {
      const int rr = i / kSDV, cc = i - rr * kSDV;
      sV[i] = (rr < nvalid && cc < ccols) ? to_float(kv[sRow[rr] + c0 + cc]) : 0.0f;
    }
    __syncthreads();
    for (int j = 0; j < kST; ++j) {
      const float pj = sP[r * (kST + 1) + j];
      const float* vrow = sV + j * kSDV + sub;
#pragma unroll
      for (int i = 0; i < kSDV / kSTpr; ++i) o[i] += pj * vrow[kSTpr * i];
    }
  }
#pragma unroll
  for (int off = kSTpr / 2; off > 0; off >>= 1) l += __shfl_xor_sync(kFull, l, off);
  if (r < mrows) {
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int i = 0; i < kSDV / kSTpr; ++i) {
      const int cc = sub + kSTpr * i;
      if (cc < ccols) put_out<T>(p, b, split, m0 + r, c0 + cc, o[i] * inv);
    }
    if (blockIdx.z == 0 && sub == 0) {
      put_lse(p, b, split, m0 + r, l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY);
    }
  }
}

// ============================================================================================
// Split combine: one CTA per (sequence, row).
// ============================================================================================
template <typename T>
__global__ void __launch_bounds__(128) decode_combine(const DecodeParams p) {
  __shared__ float weight[kMaxSplits];
  __shared__ float row_lse;
  const int64_t items = static_cast<int64_t>(p.batch) * p.rows;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int b = static_cast<int>(item / p.rows);
    const int row = static_cast<int>(item - int64_t{b} * p.rows);
    if (threadIdx.x < 32) {
      // Lane i holds splits i and i + 32 (kMaxSplits = 64).
      const int lane = threadIdx.x;
      auto part_lse = [&](int s) {
        return s < p.splits ? p.lse_part[static_cast<int64_t>(s) * items + item] : -INFINITY;
      };
      const float v0 = part_lse(lane), v1 = part_lse(lane + 32);
      float mx = fmaxf(v0, v1);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
      const float ref = mx == -INFINITY ? 0.0f : mx;
      const float w0 = expf(v0 - ref), w1 = expf(v1 - ref);
      float sum = w0 + w1;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      weight[lane] = w0 * inv;
      weight[lane + 32] = w1 * inv;
      if (lane == 0) row_lse = sum > 0.0f ? ref + logf(sum) : -INFINITY;
    }
    __syncthreads();
    for (int col = threadIdx.x; col < p.dv; col += blockDim.x) {
      float acc = 0.0f;
      for (int s = 0; s < p.splits; ++s) {
        const float w = weight[s];
        if (w > 0.0f) {
          acc += w * p.o_part[(static_cast<int64_t>(s) * items + item) * p.dv + col];
        }
      }
      static_cast<T*>(p.out)[item * p.dv + col] = from_float<T>(acc);
    }
    if (threadIdx.x == 0) {
      const int s = row / p.h, hd = row - s * p.h;
      p.lse[(static_cast<int64_t>(b) * p.h + hd) * p.sq + s] = row_lse;
    }
    __syncthreads();  // weight and row_lse are rewritten for the next item
  }
}

// ============================================================================================
// Host side
// ============================================================================================
bool force_simt() {
  const char* e = std::getenv("R1X_MLA_SIMT");
  return e != nullptr && e[0] == '1';
}
bool force_mma_sync() {
  const char* e = std::getenv("R1X_MLA_NO_SM90");
  return e != nullptr && e[0] == '1';
}

struct Plan {
  bool sm90;     // the wgmma kernel (64-row tiles, DeepSeek shape)
  bool tc;
  int bm;        // rows per CTA
  int bn;        // tokens per tile
  int chunks;    // grid z (dv chunks of the CUDA-core kernel)
  size_t smem;
};

bool valid_shape(const MlaDecodeShape& s) {
  return s.batch >= 1 && s.sq >= 1 && s.heads >= 1 && s.d >= 1 && s.d < INT_MAX / 2 &&
         s.dv >= 1 && s.dv <= s.d && s.block_size >= 1 && s.block_size <= INT_MAX &&
         s.max_blocks >= 0 && s.max_blocks <= INT_MAX && s.num_blocks >= 0 &&
         s.num_blocks <= INT_MAX && s.sq * s.heads <= INT_MAX / 2 && s.batch <= INT_MAX;
}

// `aligned`: q and kv_cache 16-byte aligned (a cache view at an odd storage offset is not; it
// then takes the mma.sync kernel with element loads instead of being copied).
Plan make_plan(const MlaDecodeShape& s, DType dtype, bool aligned = true) {
  const int64_t rows = s.sq * s.heads;
  Plan pl{};
  pl.tc = dtype != DType::kFloat32 && s.d <= kTcMaxD && s.dv <= kTcMaxDv && !force_simt();
  pl.sm90 = pl.tc && aligned && sm90_takes(s) && !force_mma_sync();
  if (pl.sm90) {
    pl.bm = kWgBM;
    pl.bn = kWgBN;
    pl.chunks = 1;
    pl.smem = sm90_smem_bytes();
  } else if (pl.tc) {
    pl.bm = rows <= 16 ? 16 : (rows <= 32 ? 32 : 64);
    pl.bn = 32;
    pl.chunks = 1;
    const int d = static_cast<int>(s.d);
    pl.smem = pl.bm == 16   ? TcConfig<16, 32, 4>::smem_bytes(d, 2)
              : pl.bm == 32 ? TcConfig<32, 32, 3>::smem_bytes(d, 2)
                            : TcConfig<64, 32, 2>::smem_bytes(d, 2);
  } else {
    pl.bm = kSR;
    pl.bn = kST;
    pl.chunks = static_cast<int>((s.dv + kSDV - 1) / kSDV);
    pl.smem = simt_smem_bytes();
  }
  return pl;
}

int64_t capacity(const MlaDecodeShape& s) {
  if (s.num_blocks <= 0 || s.max_blocks <= 0) return 0;
  const int64_t cap = s.max_blocks * s.block_size;  // both < 2^31: no overflow
  return cap > INT_MAX - 4096 ? INT_MAX - 4096 : cap;
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream,
                   const DecodeParams& p) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const DecodeParams& p, const Plan& pl, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(int64_t{p.batch} * p.row_tiles),
                  static_cast<unsigned>(p.splits), static_cast<unsigned>(pl.chunks));
  cudaError_t err = cudaSuccess;
  if constexpr (!std::is_same_v<T, float>) {
    if (pl.sm90) {
      err = launch(decode_sm90<T>, grid, pl.smem, stream, p);
    } else if (pl.tc) {
      if (pl.bm == 16) err = launch(decode_tc<T, 16, 32, 4>, grid, pl.smem, stream, p);
      else if (pl.bm == 32) err = launch(decode_tc<T, 32, 32, 3>, grid, pl.smem, stream, p);
      else err = launch(decode_tc<T, 64, 32, 2>, grid, pl.smem, stream, p);
    }
  }
  if (!pl.tc) err = launch(decode_simt<T>, grid, pl.smem, stream, p);
  if (err != cudaSuccess || p.splits == 1) return err;
  decode_combine<T><<<grid_for(int64_t{p.batch} * p.rows, 1), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int mla_decode_num_splits(const MlaDecodeShape& s, DType dtype) {
  if (!valid_shape(s)) return 1;
  const int64_t cap = capacity(s);
  const Plan pl = make_plan(s, dtype);
  // At least 4 tiles per split for a full-capacity sequence: fewer would cost more in the
  // combine than the extra parallelism gains.
  const int64_t max_splits = std::min<int64_t>(kMaxSplits, cap / (4 * pl.bn));
  if (max_splits <= 1) return 1;
  int dev = 0, sms = 0, smem_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) !=
          cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();
    return 1;
  }
  const int64_t per_sm = std::max<int64_t>(
      1, std::min<int64_t>(2048 / kThreads, smem_sm / static_cast<int64_t>(pl.smem + 1024)));
  const int64_t slots = sms * per_sm;
  const int64_t rows = s.sq * s.heads;
  const int64_t ctas = s.batch * ((rows + pl.bm - 1) / pl.bm) * pl.chunks;
  if (ctas * 5 >= slots * 4) return 1;  // the grid already nearly fills the GPU
  // FlashAttention's heuristic: the fewest splits whose last wave is nearly as full as the
  // best achievable.
  double best = 0.0;
  double eff[kMaxSplits + 1] = {};
  for (int64_t n = 1; n <= max_splits; ++n) {
    const double waves = static_cast<double>(ctas * n) / static_cast<double>(slots);
    eff[n] = waves / static_cast<double>((ctas * n + slots - 1) / slots);
    best = std::max(best, eff[n]);
  }
  for (int64_t n = 1; n <= max_splits; ++n) {
    if (eff[n] >= 0.85 * best) return static_cast<int>(n);
  }
  return 1;
}

size_t mla_decode_workspace_bytes(const MlaDecodeShape& s, int num_splits) {
  if (num_splits <= 1 || !valid_shape(s)) return 0;
  const size_t rows = static_cast<size_t>(num_splits) * s.batch * s.sq * s.heads;
  return align_up(rows * s.dv * sizeof(float), 256) + rows * sizeof(float);
}

cudaError_t mla_decode(const void* q, const void* kv_cache, DType dtype,
                       const int32_t* block_table, const int32_t* cache_seqlens,
                       const MlaDecodeShape& s, bool causal, float scale, int num_splits,
                       void* out, float* lse, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  if (!valid_shape(s) || num_splits < 1 || num_splits > kMaxSplits) return cudaErrorInvalidValue;
  const size_t ws = mla_decode_workspace_bytes(s, num_splits);
  if (ws > 0 && (workspace == nullptr || workspace_bytes < ws)) return cudaErrorInvalidValue;
  const bool aligned = reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(kv_cache) % 16 == 0;
  const Plan pl = make_plan(s, dtype, aligned);
  const int64_t rows = s.sq * s.heads;
  const int64_t row_tiles = (rows + pl.bm - 1) / pl.bm;
  if (s.batch * row_tiles > INT_MAX || pl.chunks > 65535) return cudaErrorInvalidValue;

  DecodeParams p;
  p.q = q;
  p.kv = kv_cache;
  p.table = block_table;
  p.seqlens = cache_seqlens;
  p.out = out;
  p.lse = lse;
  p.o_part = static_cast<float*>(workspace);
  p.lse_part = ws > 0 ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                                 align_up(static_cast<size_t>(num_splits) *
                                                              s.batch * rows * s.dv *
                                                              sizeof(float),
                                                          256))
                      : nullptr;
  p.batch = static_cast<int>(s.batch);
  p.sq = static_cast<int>(s.sq);
  p.h = static_cast<int>(s.heads);
  p.d = static_cast<int>(s.d);
  p.dv = static_cast<int>(s.dv);
  p.rows = static_cast<int>(rows);
  p.block_size = static_cast<int>(s.block_size);
  p.block_shift = -1;
  for (int sh = 0; sh < 31; ++sh) {
    if ((int64_t{1} << sh) == s.block_size) p.block_shift = sh;
  }
  p.max_blocks = static_cast<int>(s.max_blocks);
  p.num_blocks = static_cast<int>(s.num_blocks);
  p.cap = static_cast<int>(capacity(s));
  p.row_tiles = static_cast<int>(row_tiles);
  p.splits = num_splits;
  p.causal = causal;
  p.vec = aligned && s.d % 8 == 0;
  p.scale_log2 = scale * kLog2e;
  switch (dtype) {
    case DType::kFloat32: return run<float>(p, pl, stream);
    case DType::kBFloat16: return run<__nv_bfloat16>(p, pl, stream);
    case DType::kFloat16: return run<__half>(p, pl, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace r1x::cuda
