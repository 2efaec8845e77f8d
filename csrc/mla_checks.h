// Argument checks of the Multi-head Latent Attention op family (DESIGN.md 3.4), shared by the CPU
// and CUDA glue. Every message names the op and the argument, and says what was expected. The
// Python fakes (python/r1x/ops/mla.py) repeat them with the same wording.
#pragma once

#include <cmath>
#include <optional>

#include "fp8_checks.h"

namespace r1x {

struct AttentionShape {
  int64_t t, h, dqk, dv, batch;
  float scale;  // softmax scale, resolved (default dqk ** -0.5)
};

inline float resolve_scale(const char* op, std::optional<double> softmax_scale, int64_t d) {
  if (!softmax_scale.has_value()) return static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  R1X_CHECK_VALUE(std::isfinite(*softmax_scale), op,
                    ": `softmax_scale` must be finite (or None for the default), got ",
                    *softmax_scale);
  return static_cast<float>(*softmax_scale);
}

// q [T, H, Dqk], k [T, H, Dqk], v [T, H, Dv] of one float dtype; cu_seqlens int32 [B + 1].
inline AttentionShape check_mla_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& cu_seqlens,
                                          std::optional<double> softmax_scale) {
  check_float_input(op, "q", q);
  check_dim(op, "q", q, 3);
  check_dim(op, "k", k, 3);
  check_dim(op, "v", v, 3);
  R1X_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": `k` must have the dtype of `q` (",
                   q.scalar_type(), "), got ", k.scalar_type());
  R1X_CHECK_TYPE(v.scalar_type() == q.scalar_type(), op, ": `v` must have the dtype of `q` (",
                   q.scalar_type(), "), got ", v.scalar_type());
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  check_same_device(op, "cu_seqlens", cu_seqlens, "q", q);
  const int64_t t = q.size(0), h = q.size(1), dqk = q.size(2);
  R1X_CHECK_VALUE(h >= 1 && dqk >= 1, op, ": `q` must be [T, H, Dqk] with H >= 1 and Dqk >= 1, ",
                    "got shape ", q.sizes());
  check_shape(op, "k", k, {t, h, dqk}, "[T, H, Dqk], the shape of `q`");
  const int64_t dv = v.size(2);
  R1X_CHECK_VALUE(v.size(0) == t && v.size(1) == h && dv >= 1, op,
                    ": `v` must be [T, H, Dv] with the T and H of `q` (", t, ", ", h,
                    ") and Dv >= 1, got shape ", v.sizes());
  check_dtype(op, "cu_seqlens", cu_seqlens, {at::kInt}, "int32");
  check_dim(op, "cu_seqlens", cu_seqlens, 1);
  R1X_CHECK_VALUE(cu_seqlens.size(0) >= 1, op,
                    ": `cu_seqlens` must be [B + 1] (cumulative sequence starts, beginning with 0),"
                    " got an empty tensor");
  return {t, h, dqk, dv, cu_seqlens.size(0) - 1, resolve_scale(op, softmax_scale, dqk)};
}

// Where the offsets are on the host: cu_seqlens[0] = 0, nondecreasing, cu_seqlens[B] = T.
inline void check_cu_seqlens_values(const char* op, const int32_t* cu, int64_t batch, int64_t t) {
  R1X_CHECK_VALUE(cu[0] == 0, op, ": `cu_seqlens` must start at 0, got cu_seqlens[0] = ", cu[0]);
  for (int64_t b = 1; b <= batch; ++b)
    R1X_CHECK_VALUE(cu[b] >= cu[b - 1], op, ": `cu_seqlens` must be nondecreasing, got cu_seqlens[",
                      b, "] = ", cu[b], " after cu_seqlens[", b - 1, "] = ", cu[b - 1]);
  R1X_CHECK_VALUE(cu[batch] == t, op, ": `cu_seqlens` must end at T = ", t,
                    " (the rows of `q`), got cu_seqlens[", batch, "] = ", cu[batch]);
}

// The backward also takes out [T, H, Dv] (q's dtype), lse [H, T] fp32, grad_out like out, and an
// optional grad_lse like lse.
inline AttentionShape check_mla_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens, std::optional<double> softmax_scale) {
  constexpr const char* op = "mla_attention_backward";
  const AttentionShape s = check_mla_attention(op, q, k, v, cu_seqlens, softmax_scale);
  for (const auto& [arg, x] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out},
                               {"out", &out}}) {
    R1X_CHECK_TYPE(x->scalar_type() == q.scalar_type(), op, ": `", arg,
                     "` must have the dtype of `q` (", q.scalar_type(), "), got ", x->scalar_type());
    check_same_device(op, arg, *x, "q", q);
    check_shape(op, arg, *x, {s.t, s.h, s.dv}, "[T, H, Dv], the shape of the forward's output");
  }
  check_dtype(op, "lse", lse, {at::kFloat}, "float32");
  check_same_device(op, "lse", lse, "q", q);
  check_shape(op, "lse", lse, {s.h, s.t}, "[H, T], as mla_attention_forward returns it");
  if (grad_lse.has_value()) {
    check_dtype(op, "grad_lse", *grad_lse, {at::kFloat}, "float32");
    check_same_device(op, "grad_lse", *grad_lse, "q", q);
    check_shape(op, "grad_lse", *grad_lse, {s.h, s.t}, "[H, T], the shape of `lse`");
  }
  return s;
}

struct DecodeShape {
  int64_t batch, sq, h, d, dv, num_blocks, block_size, max_blocks;
  float scale;
};

// q [B, Sq, H, D]; kv_cache [num_blocks, block_size, D] of q's dtype; block_table int32
// [B, max_blocks]; cache_seqlens int32 [B]; 1 <= dv <= D.
inline DecodeShape check_mla_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                                    const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                                    int64_t dv, std::optional<double> softmax_scale) {
  constexpr const char* op = "mla_decode";
  check_float_input(op, "q", q);
  check_dim(op, "q", q, 4);
  check_dim(op, "kv_cache", kv_cache, 3);
  R1X_CHECK_TYPE(kv_cache.scalar_type() == q.scalar_type(), op,
                   ": `kv_cache` must have the dtype of `q` (", q.scalar_type(), "), got ",
                   kv_cache.scalar_type());
  check_dtype(op, "block_table", block_table, {at::kInt}, "int32");
  check_dim(op, "block_table", block_table, 2);
  check_dtype(op, "cache_seqlens", cache_seqlens, {at::kInt}, "int32");
  check_dim(op, "cache_seqlens", cache_seqlens, 1);
  check_same_device(op, "kv_cache", kv_cache, "q", q);
  check_same_device(op, "block_table", block_table, "q", q);
  check_same_device(op, "cache_seqlens", cache_seqlens, "q", q);
  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3);
  R1X_CHECK_VALUE(sq >= 1 && h >= 1 && d >= 1, op,
                    ": `q` must be [B, Sq, H, D] with Sq, H, D >= 1, got shape ", q.sizes());
  R1X_CHECK_VALUE(kv_cache.size(2) == d && kv_cache.size(1) >= 1, op,
                    ": `kv_cache` must be [num_blocks, block_size, D] with block_size >= 1 and the D "
                    "of `q` (", d, "), got shape ", kv_cache.sizes());
  R1X_CHECK_VALUE(block_table.size(0) == b, op,
                    ": `block_table` must be [B, max_blocks] with the B of `q` (", b,
                    "), got shape ", block_table.sizes());
  check_shape(op, "cache_seqlens", cache_seqlens, {b}, "one length per sequence");
  R1X_CHECK_VALUE(dv >= 1 && dv <= d, op, ": `dv` must be in [1, D = ", d, "], got ", dv);
  return {b,  sq, h, d, dv, kv_cache.size(0), kv_cache.size(1), block_table.size(1),
          resolve_scale(op, softmax_scale, d)};
}

// Where the lengths and the block table are on the host: 0 <= cache_seqlens[b] <=
// max_blocks * block_size, and the blocks that hold those tokens exist.
inline void check_mla_decode_values(const DecodeShape& s, const int32_t* seqlens,
                                    const int32_t* table) {
  constexpr const char* op = "mla_decode";
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t n = seqlens[b];
    R1X_CHECK_VALUE(n >= 0 && n <= s.max_blocks * s.block_size, op,
                      ": `cache_seqlens` must be in [0, max_blocks * block_size = ",
                      s.max_blocks * s.block_size, "], got cache_seqlens[", b, "] = ", n);
    for (int64_t j = 0; j < ceil_div(n, s.block_size); ++j) {
      const int64_t blk = table[b * s.max_blocks + j];
      R1X_CHECK_VALUE(blk >= 0 && blk < s.num_blocks, op,
                        ": `block_table` entries for the cached tokens must be in [0, num_blocks = ",
                        s.num_blocks, "), got block_table[", b, ", ", j, "] = ", blk);
    }
  }
}

}  // namespace r1x
