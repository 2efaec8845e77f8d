// The sm_90a forward of mla_attention (bf16/fp16): warpgroup MMA (wgmma), FlashAttention-3
// style but without TMA or warp specialisation.
//
// A CTA takes 128 query rows of one sequence and head: two warpgroups of 64 rows each, 128-key
// tiles. Q, K and V tiles sit in shared memory in 128-byte-swizzled atoms (mla_common.cuh), loaded
// by all 256 threads with cp.async, K and V double-buffered. Per key tile j a warpgroup computes
// S = Q K^T (wgmma, both operands in shared memory), the online softmax in registers, and
// O += P V (wgmma with P from registers, V read MN-major). S_{j+1} is issued before the softmax of
// tile j so that the tensor cores work while the softmax runs. Head dims are padded with zeros to
// the template ceilings (64, 128, 192 for Dqk; 64, 128 for Dv).
//
// Stage bookkeeping: tile j's K lives in stage j % 2, its V in stage j % 2. Iteration j issues
// S_{j+1} (reads K_{j+1}) and P_j V_j, and loads K_{j+2} into K_j's stage (S_j finished in
// iteration j - 1) and V_{j+1} into V_{j-1}'s stage (finished in iteration j - 1); the barrier at
// the top of each iteration makes those reads complete for both warpgroups before the overwrite.

#include "cuda/mla_launch.h"

#include "cuda/common.cuh"
#include "cuda/mla_common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace r1x::cuda::mla {
namespace {

constexpr int kBM = 128, kBN = 128, kThreads = 256;

template <int kDqk, int kDv>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(kBM * kDqk + 2 * kBN * kDqk + 2 * kBN * kDv) * 2 + 1024;
}

template <typename T, int kDqk, int kDv>
__global__ void __launch_bounds__(kThreads, 1) attn_fwd_sm90(const FwdParams p) {
  constexpr int NT = kBN / 8, DT = kDv / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // The swizzle works on absolute addresses: atoms must be 1024-byte aligned.
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  unsigned char* sQ = smem;
  unsigned char* sK = sQ + kBM * kDqk * 2;  // 2 stages
  unsigned char* sV = sK + 2 * kBN * kDqk * 2;  // 2 stages
  constexpr int kStageK = kBN * kDqk * 2, kStageV = kBN * kDv * 2;

  SeqRange seq;
  int64_t row0;
  if (!find_tile(p.cu, p.batch, p.t, kBM, gridDim.x - 1 - blockIdx.x, seq, row0)) return;
  const int head = blockIdx.y;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, c = lane & 3;
  const int len = static_cast<int>(seq.len), r0 = static_cast<int>(row0);
  const int64_t ldqk = static_cast<int64_t>(p.h) * p.dqk, ldv = static_cast<int64_t>(p.h) * p.dv;
  // (Row pointers are rebuilt from the kernel parameters at each load: fewer live registers.)
  const int64_t base_k = seq.start * ldqk + int64_t{head} * p.dqk;
  const int64_t base_v = seq.start * ldv + int64_t{head} * p.dv;

  const int kend = p.causal ? min(len, r0 + kBM) : len;
  const int ntiles = (kend + kBN - 1) / kBN;
  auto load_k = [&](int j) {
    const int n0 = j * kBN;
    const int nvalid = min(kBN, len - n0);
    load_sw128<T, kDqk, kThreads>(sK + (j & 1) * kStageK, kBN, nvalid, p.dqk, [&](int r) {
      return static_cast<const T*>(p.k) + base_k + (n0 + r) * ldqk;
    });
  };
  auto load_v = [&](int j) {
    const int n0 = j * kBN;
    const int nvalid = min(kBN, len - n0);
    load_sw128<T, kDv, kThreads>(sV + (j & 1) * kStageV, kBN, nvalid, p.dv, [&](int r) {
      return static_cast<const T*>(p.v) + base_v + (n0 + r) * ldv;
    });
  };
  load_sw128<T, kDqk, kThreads>(sQ, kBM, min(kBM, len - r0), p.dqk, [&](int r) {
    return static_cast<const T*>(p.q) + base_k + (r0 + r) * ldqk;
  });
  load_k(0);
  if (ntiles > 1) load_k(1);
  load_v(0);
  cp_async_commit();

  // S = Q K^T: A = this warpgroup's 64 rows of the Q tile, B = the whole K tile, both K-major.
  // P V: B = the V tile with n = its (contiguous) columns, MN-major (mla_smem.h).
  auto issue_s = [&](float (&acc)[kBN / 2], int j) {
    const unsigned char* k_stage = sK + (j & 1) * kStageK;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDqk / 16; ++kk) {
      wgmma_ss<T, kBN>(acc, smem::k_major_desc<kBM, kDqk, 64>(sQ, wg, kk),
                       smem::k_major_desc<kBN, kDqk, kBN>(k_stage, 0, kk), kk > 0);
    }
    wgmma_commit();
  };

  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  float s_cur[kBN / 2], s_next[kBN / 2];
  issue_s(s_cur, 0);
  wgmma_wait<0>();
  fence_regs(s_cur);

  float o[DT * 4];
#pragma unroll
  for (int i = 0; i < DT * 4; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this thread's partial sums
  const int row_w = r0 + wg * 64 + warp * 16;                  // this warp's first row

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // K_{it+1}, V_it landed; S_it and P_{it-1} V_{it-1} done in both warpgroups
    if (it + 2 < ntiles) load_k(it + 2);
    if (it + 1 < ntiles) load_v(it + 1);
    cp_async_commit();
    if (it + 1 < ntiles) issue_s(s_next, it + 1);

    const int n0 = it * kBN;
    const bool need_mask = n0 + kBN > len || (p.causal && n0 + kBN - 1 > r0);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s_cur[4 * nt + e] * p.scale_log2;
        if (need_mask) {
          const int key = n0 + nt * 8 + 2 * c + (e & 1);
          const int qry = row_w + g + (e >> 1) * 8;
          if (key >= len || (p.causal && key > qry)) x = -INFINITY;
        }
        s_cur[4 * nt + e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(kFull, mx[half], 1));
      mx[half] = fmaxf(mx[half], __shfl_xor_sync(kFull, mx[half], 2));
      const float m_new = fmaxf(m[half], mx[half]);
      m_use[half] = m_new == -INFINITY ? 0.0f : m_new;  // no NaN from -inf - -inf
      alpha[half] = exp2f(m[half] - m_use[half]);
      m[half] = m_new;
    }
    float rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) {
      const float pe = exp2f(s_cur[i] - m_use[(i >> 1) & 1]);
      s_cur[i] = pe;
      rs[(i >> 1) & 1] += pe;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) l[half] = l[half] * alpha[half] + rs[half];
#pragma unroll
    for (int i = 0; i < DT * 4; ++i) o[i] *= alpha[(i >> 1) & 1];

    // All of P packed before the batch: registers written between wgmmas would make the
    // compiler serialise them.
    uint32_t pa[kBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pa[kk][i] = pack2<T>(s_cur[8 * kk + 2 * i], s_cur[8 * kk + 2 * i + 1]);
      }
    }
    const unsigned char* v_stage = sV + (it & 1) * kStageV;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      wgmma_rs<T, kDv>(o, pa[kk], smem::mn_major_desc<kBN, kDv, kDv>(v_stage, 0, kk), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
    if (it + 1 < ntiles) {
      fence_regs(s_next);
#pragma unroll
      for (int i = 0; i < kBN / 2; ++i) s_cur[i] = s_next[i];
    }
  }

  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    l[half] += __shfl_xor_sync(kFull, l[half], 1);
    l[half] += __shfl_xor_sync(kFull, l[half], 2);
    inv[half] = l[half] > 0.0f ? 1.0f / l[half] : 0.0f;
  }
  T* og = static_cast<T*>(p.out) + (seq.start + row_w) * ldv + int64_t{head} * p.dv;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = g + half * 8;
    if (row_w + r >= len) continue;
    T* row = og + r * ldv;
#pragma unroll
    for (int nt = 0; nt < DT; ++nt) {
      const int col = nt * 8 + 2 * c;
      if (col < p.dv) {  // dv % 8 == 0: col + 1 < dv too
        *reinterpret_cast<uint32_t*>(row + col) =
            pack2<T>(o[4 * nt + 2 * half] * inv[half], o[4 * nt + 2 * half + 1] * inv[half]);
      }
    }
  }
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

template <typename T, int kDqk, int kDv>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<kDqk, kDv>();
  const int64_t tiles = num_tiles(p.t, p.batch, kBM);
  if (tiles > INT_MAX) return cudaErrorInvalidValue;
  const cudaError_t err = cudaFuncSetAttribute(
      attn_fwd_sm90<T, kDqk, kDv>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  attn_fwd_sm90<T, kDqk, kDv>
      <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(p.h)), kThreads, smem, stream>>>(
          p);
  return cudaGetLastError();
}

// (No <64, 128>: it would spill; Dqk <= 64 with Dv > 64 pads Dqk to 128.)
template <typename T>
cudaError_t dispatch(const FwdParams& p, cudaStream_t stream) {
  if (p.dv <= 64) {
    if (p.dqk <= 64) return launch<T, 64, 64>(p, stream);
    if (p.dqk <= 128) return launch<T, 128, 64>(p, stream);
    return launch<T, 192, 64>(p, stream);
  }
  if (p.dqk <= 128) return launch<T, 128, 128>(p, stream);
  return launch<T, 192, 128>(p, stream);
}

}  // namespace

bool attention_forward_sm90_takes(int dqk, int dv) {
  return dqk % 8 == 0 && dv % 8 == 0 && dqk <= 192 && dv <= 128;
}

template <typename T>
cudaError_t attention_forward_sm90(const FwdParams& p, cudaStream_t stream) {
  if (!attention_forward_sm90_takes(p.dqk, p.dv)) return cudaErrorInvalidValue;
  return dispatch<T>(p, stream);
}

template cudaError_t attention_forward_sm90<__nv_bfloat16>(const FwdParams&, cudaStream_t);
template cudaError_t attention_forward_sm90<__half>(const FwdParams&, cudaStream_t);

}  // namespace r1x::cuda::mla
