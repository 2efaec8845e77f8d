// Argument checks and output shapes of the FP8 op family, shared by the CPU and CUDA glue.
// Every message names the op and the argument, and says what was expected.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "check.h"

namespace r1x {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed, const char* expected) {
  bool ok = false;
  for (auto d : allowed) ok = ok || t.scalar_type() == d;
  R1X_CHECK_TYPE(ok, op, ": `", arg, "` must be ", expected, ", got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  R1X_CHECK_VALUE(t.dim() == dim, op, ": `", arg, "` must be ", dim, "-D, got shape ",
                    t.sizes());
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                              const char* ref_arg, const at::Tensor& ref) {
  R1X_CHECK_VALUE(t.device() == ref.device(), op, ": `", arg, "` is on ", t.device(), " but `",
                    ref_arg, "` is on ", ref.device(), "; all tensors must be on one device");
}

inline void check_shape(const char* op, const char* arg, const at::Tensor& t,
                        at::IntArrayRef expected, const char* why) {
  R1X_CHECK_VALUE(t.sizes() == expected, op, ": `", arg, "` must have shape ", expected, " (",
                    why, "), got ", t.sizes());
}

inline void check_float_input(const char* op, const char* arg, const at::Tensor& t) {
  check_dtype(op, arg, t, {at::kFloat, at::kBFloat16, at::kHalf}, "float32, bfloat16 or float16");
}

// quant_fp8_per_token_group: returns the scale's shape.
inline std::vector<int64_t> check_quant_per_token_group(const at::Tensor& x, int64_t group_size) {
  constexpr const char* op = "quant_fp8_per_token_group";
  check_float_input(op, "x", x);
  R1X_CHECK_VALUE(x.dim() >= 1, op, ": `x` must have at least 1 dimension, got a scalar");
  R1X_CHECK_VALUE(group_size > 0, op, ": `group_size` must be positive, got ", group_size);
  R1X_CHECK_VALUE(x.size(-1) % group_size == 0, op, ": the last dimension of `x` (", x.size(-1),
                    ") must be a multiple of `group_size` (", group_size, ")");
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = x.size(-1) / group_size;
  return s;
}

inline std::vector<int64_t> check_quant_per_block(const at::Tensor& w, int64_t block_size) {
  constexpr const char* op = "quant_fp8_per_block";
  check_float_input(op, "w", w);
  check_dim(op, "w", w, 2);
  R1X_CHECK_VALUE(block_size > 0, op, ": `block_size` must be positive, got ", block_size);
  return {ceil_div(w.size(0), block_size), ceil_div(w.size(1), block_size)};
}

inline void check_dequant(const at::Tensor& q, const at::Tensor& scale, at::IntArrayRef block) {
  constexpr const char* op = "dequant_fp8";
  check_dtype(op, "q", q, {at::kFloat8_e4m3fn}, "float8_e4m3fn");
  check_dtype(op, "scale", scale, {at::kFloat}, "float32");
  check_same_device(op, "scale", scale, "q", q);
  R1X_CHECK_VALUE(q.dim() >= 1, op, ": `q` must have at least 1 dimension, got a scalar");
  R1X_CHECK_VALUE(block.size() == 2 && block[0] >= 1 && block[1] >= 1, op,
                    ": `block` must be two positive sizes (rows, cols), got ", block);
  std::vector<int64_t> expected(q.sizes().begin(), q.sizes().end());
  expected.back() = ceil_div(q.size(-1), block[1]);
  if (q.dim() >= 2) expected[q.dim() - 2] = ceil_div(q.size(-2), block[0]);
  check_shape(op, "scale", scale, expected, "one scale per block of `q`");
}

// The output dtype of the FP8 GEMMs (bf16 when not given).
inline at::ScalarType gemm_out_dtype(std::optional<at::ScalarType> out_dtype,
                                     const char* op = "fp8_gemm") {
  const at::ScalarType d = out_dtype.value_or(at::kBFloat16);
  R1X_CHECK_VALUE(d == at::kBFloat16 || d == at::kFloat, op,
                    ": `out_dtype` must be torch.bfloat16 or torch.float32, got ", d);
  return d;
}

// What the FP8 GEMMs share: e4m3 a [M, K] and b (`b_layout`, rank b_dim, K last), float32
// scales, one device, K % 128 == 0. Returns K.
inline int64_t check_fp8_gemm_operands(const char* op, const at::Tensor& a,
                                       const at::Tensor& a_scale, const at::Tensor& b,
                                       const at::Tensor& b_scale, int64_t b_dim,
                                       const char* b_layout) {
  check_dtype(op, "a", a, {at::kFloat8_e4m3fn}, "float8_e4m3fn");
  check_dtype(op, "b", b, {at::kFloat8_e4m3fn}, "float8_e4m3fn");
  check_dtype(op, "a_scale", a_scale, {at::kFloat}, "float32");
  check_dtype(op, "b_scale", b_scale, {at::kFloat}, "float32");
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, b_dim);
  check_same_device(op, "a_scale", a_scale, "a", a);
  check_same_device(op, "b", b, "a", a);
  check_same_device(op, "b_scale", b_scale, "a", a);
  const int64_t k = a.size(1);
  R1X_CHECK_VALUE(b.size(-1) == k, op, ": `b` must be ", b_layout, " with the K of `a` (", k,
                    "), got shape ", b.sizes());
  R1X_CHECK_VALUE(k % 128 == 0, op, ": K (the last dimension of `a` and `b`) must be a multiple "
                    "of 128, got ", k);
  check_shape(op, "a_scale", a_scale, {a.size(0), k / 128}, "[M, K/128]: one scale per 1x128 group");
  return k;
}

inline void check_fp8_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale) {
  const int64_t k = check_fp8_gemm_operands("fp8_gemm", a, a_scale, b, b_scale, 2, "[N, K]");
  check_shape("fp8_gemm", "b_scale", b_scale, {ceil_div(b.size(0), 128), k / 128},
              "[ceil(N/128), K/128]: one scale per 128x128 block");
}

}  // namespace r1x
