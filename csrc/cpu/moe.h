// CPU entry points of the MoE op family (threaded drivers): raw pointers and sizes, the same
// shape as the CUDA launch API (csrc/cuda/moe_launch.h).
#pragma once

#include <cstdint>

#include "cpu/fgemm.h"
#include "cpu/kernels.h"

namespace r1x::cpu {

struct RouteOptions {
  int64_t top_k, n_group, topk_group;
  bool softmax, norm_topk_prob;
  float routed_scaling_factor;
};

// logits [t, e] (dtype), bias [e] (bias_dtype) or null -> weights [t, top_k], ids [t, top_k].
void moe_topk_route(const void* logits, DType dtype, int64_t t, int64_t e, const void* bias,
                    DType bias_dtype, const RouteOptions& opt, float* weights, int32_t* ids);

// ids [t, k] (int32, or int64 if ids64) -> offs [e] (cumulative end offsets) and perm [t * k]
// (the flat (token, slot) index of each sorted row, stable). Returns the flat index of the
// first id outside [0, e), or -1.
int64_t moe_dispatch_index(const void* ids, bool ids64, int64_t t, int64_t k, int64_t e,
                           int32_t* offs, int32_t* perm);
// out[r] = x[perm[r] / k], rows of row_bytes bytes.
void moe_gather_rows(const void* x, int64_t row_bytes, const int32_t* perm, int64_t rows,
                     int64_t k, void* out);

// out[t] = sum_j w[t, j] * y[inv[t * k + j]] in fp32; y and out of dtype (kF32 or kBF16),
// w of w_dtype.
// Returns the first r whose perm[r] is out of range or repeated, or -1.
int64_t moe_combine(const void* y, DType dtype, const void* w, DType w_dtype,
                    const int32_t* perm, int64_t t, int64_t k, int64_t h, void* out);

// The backward of moe_combine: grad_y[inv[s]] = w[s] * g[s / k] and grad_w[s] = dot(g[s / k],
// y[inv[s]]) (fp32); g, y and grad_y of dtype (kF32 or kBF16), w of w_dtype, grad_w fp32.
// Returns the first r whose perm[r] is out of range or repeated, or -1.
int64_t moe_combine_backward(const void* g, const void* y, DType dtype, const void* w,
                             DType w_dtype, const int32_t* perm, int64_t t, int64_t k, int64_t h,
                             void* grad_y, float* grad_w);

// Per group g (rows offs[g-1]:offs[g]): out rows = a rows @ b[g].T (fp32 accumulation).
void grouped_gemm(const void* a, const void* b, const int32_t* offs, int64_t groups, int64_t n,
                  int64_t k, DType dtype, void* out);
// grad_a rows = grad rows @ b[g]   (grad [m, n], b [groups, n, k], grad_a [m, k]).
void grouped_gemm_grad_a(const void* grad, const void* b, const int32_t* offs, int64_t groups,
                         int64_t n, int64_t k, DType dtype, void* grad_a);
// grad_b[g] = grad rows.T @ a rows   (grad [m, n], a [m, k], grad_b [groups, n, k]).
void grouped_gemm_grad_b(const void* grad, const void* a, const int32_t* offs, int64_t groups,
                         int64_t n, int64_t k, DType dtype, void* grad_b);
// fp8_gemm per group: a [m, k] e4m3 + a_scale [m, k/128], b [groups, n, k] e4m3 +
// b_scale [groups, ceil(n/128), k/128]; k % 128 == 0, k > 0.
void fp8_grouped_gemm(const uint8_t* a, const float* a_scale, const uint8_t* b,
                      const float* b_scale, const int32_t* offs, int64_t groups, int64_t n,
                      int64_t k, DType out_dtype, void* out);

}  // namespace r1x::cpu
