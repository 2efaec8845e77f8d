// Multi-head Latent Attention CPU kernels (DESIGN.md 3.4): variable-length attention forward and
// backward, and absorbed decode over a paged latent cache.
//
// All three are tiled online-softmax (FlashAttention-2) algorithms in fp32: 16-bit inputs are
// widened one tile at a time, no T x T or L x L matrix exists anywhere, and the per-thread
// scratch grows linearly with the sequence length. Every tile product is one of
//
//   C[m, n] (+)= sum_p A(i, p) * B[p, n],   A(i, p) = a[i * ars + p * acs]
//
// with B's rows contiguous: A is only ever broadcast one element at a time, so transposed
// operands (P^T, dS^T, strided K rows) cost nothing, and the layouts are chosen so that no tile
// is ever transposed (S^T = K Q^T against a Q^T made once per query block). The softmax runs
// down the columns of S^T, i.e. vectorised across queries. The ISA-specific parts (that
// product and nothing else) live in mla_<isa>.cpp; mla.cpp owns the threading.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace r1x::cpu {

// q, k [T, H, dqk], v / out [T, H, dv] dense in `dtype`; lse [H, T] fp32 natural log;
// cu [batch + 1] validated cumulative starts.
struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  DType dtype;
  const int32_t* cu;
  int64_t batch, t, h, dqk, dv;
  float scale;
  bool causal;
};

struct AttnFwdArgs : AttnArgs {
  void* out;
  float* lse;
};

struct AttnBwdArgs : AttnArgs {
  const void* out;
  const void* grad_out;
  const float* lse;
  const float* grad_lse;  // [H, T] or null
  void* grad_q;
  void* grad_k;
  void* grad_v;
};

// q [batch, sq, h, d] dense; cache [num_blocks, block_size, d] dense; table [batch, max_blocks]
// and seqlens [batch] validated; out [batch, sq, h, dv] (q's dtype), lse [batch, h, sq] fp32.
struct DecodeArgs {
  const void* q;
  const void* cache;
  DType dtype;
  const int32_t* table;
  const int32_t* seqlens;
  int64_t batch, sq, h, d, dv, block_size, max_blocks;
  float scale;
  bool causal;
  void* out;
  float* lse;
};

void mla_attention_forward(const AttnFwdArgs& args);
void mla_attention_backward(const AttnBwdArgs& args);
void mla_decode(const DecodeArgs& args);

// ---- per-ISA pieces (mla_<isa>.cpp) ---------------------------------------------------------

// The decode's partial result over one key range of one sequence: rows r = s * h + head of
// o[rows, dv] unnormalised, m[rows] the running max (log2 domain), l[rows] the running sum.
struct DecodePartial {
  float* o;
  float* m;
  float* l;
};

struct MlaKernels {
  Isa isa;
  // bytes of per-thread scratch for the forward and the backward (max_len: the longest sequence)
  size_t (*fwd_scratch)(const AttnArgs& args);
  size_t (*bwd_scratch)(const AttnArgs& args, int64_t max_len);
  size_t (*decode_scratch)(const DecodeArgs& args);
  // forward of queries [q0, q1) (relative to the sequence) of sequence `seq`, head `head`
  void (*fwd_task)(const AttnFwdArgs& args, int64_t seq, int64_t head, int64_t q0, int64_t q1,
                   void* scratch);
  // backward of sequence `seq`, head `head`: writes its rows of grad_q, grad_k, grad_v
  void (*bwd_task)(const AttnBwdArgs& args, int64_t seq, int64_t head, void* scratch);
  // decode of sequence b over its tokens [t0, t1) into `part`
  void (*decode_task)(const DecodeArgs& args, int64_t b, int64_t t0, int64_t t1,
                      DecodePartial part, void* scratch);
};

const MlaKernels& mla_kernels_generic();
const MlaKernels& mla_kernels_avx2();
const MlaKernels& mla_kernels_avx512();
const MlaKernels& mla_kernels_amx();  // the AVX-512 kernels, decode on AMX tiles for bf16

// Tile sizes shared by the driver and the kernels.
constexpr int64_t kMlaBlockQ = 64;
constexpr int64_t kMlaBlockK = 64;

}  // namespace r1x::cpu
