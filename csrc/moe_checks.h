// Argument checks of the MoE op family (DESIGN.md 3.3), shared by the CPU and CUDA glue.
// Every message names the op and the argument, and says what was expected. The Python fakes
// (python/r1x/ops/moe.py) repeat them with the same wording.
#pragma once

#include <string>

#include "fp8_checks.h"

namespace r1x {

inline void check_index_dtype(const char* op, const char* arg, const at::Tensor& t) {
  check_dtype(op, arg, t, {at::kInt, at::kLong}, "int32 or int64");
}

// offs: int32 [num_groups], cumulative end offsets of the groups (torch._grouped_mm's layout).
inline void check_offs(const char* op, const at::Tensor& offs, int64_t num_groups,
                       const at::Tensor& ref, const char* ref_arg) {
  check_dtype(op, "offs", offs, {at::kInt}, "int32");
  check_same_device(op, "offs", offs, ref_arg, ref);
  check_shape(op, "offs", offs, {num_groups}, "one cumulative end offset per group");
}

// On the CPU the offsets are read anyway: they must be nondecreasing and within [0, rows].
// (On CUDA they stay on the device; reading them would cost a host sync.)
inline void check_offs_values(const char* op, const int32_t* offs, int64_t num_groups,
                              int64_t rows) {
  int64_t prev = 0;
  for (int64_t e = 0; e < num_groups; ++e) {
    R1X_CHECK_VALUE(offs[e] >= prev && offs[e] <= rows, op,
                      ": `offs` must be nondecreasing cumulative end offsets within [0, ", rows,
                      "] (the rows of `a`), got offs[", e, "] = ", offs[e],
                      e > 0 ? " after offs[" + std::to_string(e - 1) + "] = " + std::to_string(prev)
                            : std::string());
    prev = offs[e];
  }
}

struct RouteParams {
  int64_t top_k, n_group, topk_group;
  bool softmax;
};

inline RouteParams check_moe_topk_route(const at::Tensor& logits, int64_t top_k,
                                        const std::optional<at::Tensor>& bias, int64_t n_group,
                                        int64_t topk_group, c10::string_view score_func) {
  constexpr const char* op = "moe_topk_route";
  check_float_input(op, "logits", logits);
  check_dim(op, "logits", logits, 2);
  const int64_t e = logits.size(1);
  R1X_CHECK_VALUE(e >= 1, op, ": `logits` must have at least one expert column, got shape ",
                    logits.sizes());
  R1X_CHECK_VALUE(score_func == "sigmoid" || score_func == "softmax", op,
                    ": `score_func` must be \"sigmoid\" or \"softmax\", got \"", score_func, "\"");
  R1X_CHECK_VALUE(n_group >= 1 && e % n_group == 0, op, ": `n_group` (", n_group,
                    ") must be positive and divide the number of experts (", e, ")");
  R1X_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, op, ": `topk_group` must be in [1, ",
                    "n_group = ", n_group, "], got ", topk_group);
  const int64_t eligible = topk_group * (e / n_group);
  R1X_CHECK_VALUE(top_k >= 1 && top_k <= eligible, op, ": `top_k` must be in [1, ", eligible,
                    "] (the experts of the `topk_group` best groups), got ", top_k);
  if (bias.has_value()) {
    check_float_input(op, "bias", *bias);
    check_same_device(op, "bias", *bias, "logits", logits);
    check_shape(op, "bias", *bias, {e}, "one correction per expert");
  }
  return {top_k, n_group, topk_group, score_func == "softmax"};
}

inline void check_moe_dispatch(const at::Tensor& x, const at::Tensor& ids, int64_t num_experts) {
  constexpr const char* op = "moe_dispatch";
  check_dtype(op, "x", x, {at::kFloat, at::kBFloat16, at::kHalf, at::kFloat8_e4m3fn},
              "float32, bfloat16, float16 or float8_e4m3fn");
  check_dim(op, "x", x, 2);
  check_index_dtype(op, "ids", ids);
  check_dim(op, "ids", ids, 2);
  check_same_device(op, "ids", ids, "x", x);
  R1X_CHECK_VALUE(ids.size(0) == x.size(0), op, ": `ids` must be [T, top_k] with the T of `x` (",
                    x.size(0), "), got shape ", ids.sizes());
  R1X_CHECK_VALUE(num_experts >= 1, op, ": `num_experts` must be positive, got ", num_experts);
}

inline void check_moe_combine(const at::Tensor& y, const at::Tensor& weights,
                              const at::Tensor& perm, int64_t num_tokens) {
  constexpr const char* op = "moe_combine";
  check_float_input(op, "y_sorted", y);
  check_float_input(op, "weights", weights);
  check_dtype(op, "perm", perm, {at::kInt}, "int32");
  check_dim(op, "y_sorted", y, 2);
  check_dim(op, "weights", weights, 2);
  check_same_device(op, "weights", weights, "y_sorted", y);
  check_same_device(op, "perm", perm, "y_sorted", y);
  R1X_CHECK_VALUE(num_tokens >= 0, op, ": `num_tokens` must be >= 0, got ", num_tokens);
  R1X_CHECK_VALUE(weights.size(0) == num_tokens, op,
                    ": `weights` must be [num_tokens, top_k] with num_tokens = ", num_tokens,
                    ", got shape ", weights.sizes());
  const int64_t rows = num_tokens * weights.size(1);
  check_shape(op, "perm", perm, {rows}, "one entry per (token, slot)");
  R1X_CHECK_VALUE(y.size(0) == rows, op, ": `y_sorted` must have num_tokens * top_k = ", rows,
                    " rows, got shape ", y.sizes());
}

inline void check_moe_combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                       const at::Tensor& weights, const at::Tensor& perm) {
  constexpr const char* op = "moe_combine_backward";
  check_moe_combine(y, weights, perm, weights.dim() == 2 ? weights.size(0) : 0);
  R1X_CHECK_TYPE(grad_out.scalar_type() == y.scalar_type(), op,
                   ": `grad_out` must have the dtype of `y_sorted` (", y.scalar_type(), "), got ",
                   grad_out.scalar_type());
  check_same_device(op, "grad_out", grad_out, "y_sorted", y);
  check_shape(op, "grad_out", grad_out, {weights.size(0), y.size(1)}, "[num_tokens, H2]");
}

inline void check_grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  constexpr const char* op = "grouped_gemm";
  check_dtype(op, "a", a, {at::kFloat, at::kBFloat16}, "float32 or bfloat16");
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, 3);
  R1X_CHECK_TYPE(b.scalar_type() == a.scalar_type(), op, ": `b` must have the dtype of `a` (",
                   a.scalar_type(), "), got ", b.scalar_type());
  check_same_device(op, "b", b, "a", a);
  R1X_CHECK_VALUE(b.size(2) == a.size(1), op, ": `b` must be [E, N, K] with the K of `a` (",
                    a.size(1), "), got shape ", b.sizes());
  check_offs(op, offs, b.size(0), a, "a");
}

// grad [M, N] with b [E, N, K] (grad_a) or a [M, K] (grad_b).
inline void check_grouped_gemm_grad(const char* op, const at::Tensor& grad, const char* arg,
                                    const at::Tensor& t, const at::Tensor& offs,
                                    int64_t num_groups) {
  check_dtype(op, "grad", grad, {at::kFloat, at::kBFloat16}, "float32 or bfloat16");
  check_dim(op, "grad", grad, 2);
  R1X_CHECK_TYPE(t.scalar_type() == grad.scalar_type(), op, ": `", arg,
                   "` must have the dtype of `grad` (", grad.scalar_type(), "), got ",
                   t.scalar_type());
  check_same_device(op, arg, t, "grad", grad);
  check_offs(op, offs, num_groups, grad, "grad");
}

inline void check_grouped_gemm_grad_a(const at::Tensor& grad, const at::Tensor& b,
                                      const at::Tensor& offs) {
  constexpr const char* op = "grouped_gemm_grad_a";
  check_dim(op, "b", b, 3);
  check_grouped_gemm_grad(op, grad, "b", b, offs, b.size(0));
  R1X_CHECK_VALUE(b.size(1) == grad.size(1), op, ": `b` must be [E, N, K] with the N of `grad` (",
                    grad.size(1), "), got shape ", b.sizes());
}

inline void check_grouped_gemm_grad_b(const at::Tensor& grad, const at::Tensor& a,
                                      const at::Tensor& offs, int64_t num_groups) {
  constexpr const char* op = "grouped_gemm_grad_b";
  R1X_CHECK_VALUE(num_groups >= 0, op, ": `num_groups` must be >= 0, got ", num_groups);
  check_dim(op, "a", a, 2);
  check_grouped_gemm_grad(op, grad, "a", a, offs, num_groups);
  R1X_CHECK_VALUE(a.size(0) == grad.size(0), op, ": `a` must have the rows of `grad` (",
                    grad.size(0), "), got shape ", a.sizes());
}

inline void check_fp8_grouped_gemm(const at::Tensor& a, const at::Tensor& a_scale,
                                   const at::Tensor& b, const at::Tensor& b_scale,
                                   const at::Tensor& offs) {
  constexpr const char* op = "fp8_grouped_gemm";
  const int64_t k = check_fp8_gemm_operands(op, a, a_scale, b, b_scale, 3, "[E, N, K]");
  check_shape(op, "b_scale", b_scale, {b.size(0), ceil_div(b.size(1), 128), k / 128},
              "[E, ceil(N/128), K/128]: one scale per 128x128 block of each expert");
  check_offs(op, offs, b.size(0), a, "a");
}

}  // namespace r1x
