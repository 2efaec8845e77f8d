// Torch-free launch API of r1x's Multi-head Latent Attention CUDA kernels (DESIGN.md 3.4).
//
// Same conventions as launch.h: raw device pointers, sizes and a stream; dense row-major tensors;
// every function returns cudaSuccess or the first CUDA error (cudaErrorInvalidValue for arguments
// it cannot take) and never aborts. Nothing here reads device memory on the host or synchronises:
// cu_seqlens, cache_seqlens and block_table stay on the device.
//
// Numerics: fp32 accumulation; lse is the natural-log log-sum-exp of the scaled scores, fp32.
// A query row that sees no key gets out = 0 and lse = -inf. bf16/fp16 inputs run tensor-core
// kernels (mma.sync m16n8k16; sm_90a wgmma for the attention forward with Dqk <= 192, Dv <= 128
// and for decode tiles of the DeepSeek shape) whose probabilities P (and, in the backward, dS)
// are rounded to the input dtype before the second product, as FlashAttention does; float32 runs
// CUDA-core kernels in fp32 throughout.
//
// Debugging: with the environment variable R1X_MLA_SIMT=1 every dtype takes the CUDA-core
// kernels (a second, independent implementation to compare the tensor-core ones against);
// R1X_MLA_NO_SM90=1 replaces the sm_90a wgmma attention forward by the mma.sync one.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/launch.h"

namespace r1x::cuda {

// ---- packed variable-length attention (training / prefill) ---------------------------------
// Sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1]) of q, k, v (cu_seqlens int32 [batch + 1]
// on the device: starts at 0, nondecreasing, ends at t). Offsets that break this are clamped into
// [0, t] on the device: the result is then unspecified (rows no sequence owns are not written)
// but nothing is read or written out of bounds.
// Largest Dqk and Dv the attention kernels take; larger gives cudaErrorInvalidValue.
int64_t mla_attention_max_head_dim();
// Largest H (the heads are a grid dimension); larger gives cudaErrorInvalidValue.
int64_t mla_attention_max_heads();

// q, k [t, h, dqk], v [t, h, dv] (one dtype) -> out [t, h, dv] (same dtype), lse [h, t] fp32.
// Row i of sequence b: scores_j = scale * q_i . k_j over keys j of the same sequence (j <= i when
// causal: top-left alignment), lse_i = logsumexp_j scores_j, out_i = sum_j exp(scores_j - lse_i)
// v_j. Requirements: t >= 1, batch >= 1, 1 <= dqk, dv <= mla_attention_max_head_dim(),
// 1 <= h <= mla_attention_max_heads().
cudaError_t mla_attention_forward(const void* q, const void* k, const void* v, DType dtype,
                                  const int32_t* cu_seqlens, int64_t batch, int64_t t, int64_t h,
                                  int64_t dqk, int64_t dv, bool causal, float scale, void* out,
                                  float* lse, cudaStream_t stream);

// The backward of mla_attention_forward: grad_out, out [t, h, dv] and lse [h, t] (fp32, as the
// forward returned them), grad_lse [h, t] fp32 or null -> grad_q, grad_k [t, h, dqk], grad_v
// [t, h, dv] in q's dtype. With P = exp(scores - lse): dV = P^T dO, dP = dO V^T,
// dS = P * (dP - Delta) with Delta_i = dO_i . out_i - grad_lse_i, dQ = scale dS K,
// dK = scale dS^T Q. Deterministic (no atomics): one pass per key tile computes dK and dV, one per
// query tile computes dQ. Same requirements as the forward; the workspace (fp32 Delta [h, t]) is
// mla_attention_backward_workspace_bytes(t, h) bytes, 256-byte aligned.
size_t mla_attention_backward_workspace_bytes(int64_t t, int64_t h);
cudaError_t mla_attention_backward(const void* grad_out, const void* q, const void* k,
                                   const void* v, const void* out, const float* lse,
                                   const float* grad_lse, DType dtype, const int32_t* cu_seqlens,
                                   int64_t batch, int64_t t, int64_t h, int64_t dqk, int64_t dv,
                                   bool causal, float scale, void* grad_q, void* grad_k,
                                   void* grad_v, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream);

// ---- absorbed decode over a paged latent cache (FlashMLA semantics) ------------------------
struct MlaDecodeShape {
  int64_t batch = 0;       // B
  int64_t sq = 0;          // queries per sequence (the last sq positions)
  int64_t heads = 0;       // H
  int64_t d = 0;           // K width: the whole cache row
  int64_t dv = 0;          // V width: the first dv columns of the row, 1 <= dv <= d
  int64_t num_blocks = 0;  // kv_cache [num_blocks, block_size, d]
  int64_t block_size = 0;
  int64_t max_blocks = 0;  // block_table [batch, max_blocks]
};

// q [batch, sq, heads, d], kv_cache [num_blocks, block_size, d] (q's dtype), block_table int32
// [batch, max_blocks], cache_seqlens int32 [batch] -> out [batch, sq, heads, dv] (q's dtype), lse
// [batch, heads, sq] fp32. Token j of sequence b is row kv_cache[block_table[b, j / block_size],
// j % block_size]; with L = cache_seqlens[b], query s sees tokens j < L, and j <= L - sq + s when
// causal. Only the L valid tokens of a sequence are read (other slots may hold NaN, table entries
// past them may be garbage). L is clamped into [0, max_blocks * block_size] and table entries into
// [0, num_blocks) on the device (out of range: result unspecified, nothing read out of bounds);
// num_blocks == 0 reads nothing (every sequence counts as empty).
//
// Split-KV: each sequence's tokens are cut into num_splits equal ranges of its actual L, each
// range is attended separately into a workspace (partial out and lse, fp32), and a combine kernel
// merges them. num_splits comes from mla_decode_num_splits (host-only: shapes and the SM count,
// never cache_seqlens), and the workspace, mla_decode_workspace_bytes(shape, num_splits) bytes,
// must be 256-byte aligned. Any block_size >= 1, any d and dv; bf16/fp16 with d <= 576 and
// dv <= 512 run tensor cores (wgmma when sq * heads > 32, d in (384, 576] and dv in (256, 512],
// both multiples of 8, q and kv_cache 16-byte aligned; mma.sync otherwise, with 16-byte row
// copies only when d % 8 == 0 and both are aligned), the rest CUDA cores. Requirements: batch, sq, heads,
// d, block_size >= 1, 1 <= dv <= d, 1 <= num_splits <= 64.
int mla_decode_num_splits(const MlaDecodeShape& shape, DType dtype);
size_t mla_decode_workspace_bytes(const MlaDecodeShape& shape, int num_splits);
cudaError_t mla_decode(const void* q, const void* kv_cache, DType dtype,
                       const int32_t* block_table, const int32_t* cache_seqlens,
                       const MlaDecodeShape& shape, bool causal, float scale, int num_splits,
                       void* out, float* lse, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

}  // namespace r1x::cuda
