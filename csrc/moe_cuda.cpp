// MoE op family, CUDA: argument checks (moe_checks.h, as on the CPU), output and workspace
// allocation (caching allocator, current stream), and calls into the torch-free kernels of
// csrc/cuda (moe_launch.h). The group offsets are never read on the host: no op here
// synchronises with the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "cuda/moe_launch.h"
#include "cuda_glue.h"
#include "moe_checks.h"

namespace r1x {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Output rows of `esize`-byte elements padded to a multiple of 16 bytes (TMA-stored outputs).
int64_t padded_ld(int64_t n, int64_t esize) { return ceil_div(n * esize, 16) * 16 / esize; }

at::Tensor unpad(const at::Tensor& out, int64_t n) {
  return out.size(1) == n ? out : out.narrow(1, 0, n).contiguous();
}

std::tuple<at::Tensor, at::Tensor> moe_topk_route_cuda(const at::Tensor& logits, int64_t top_k,
                                                       const std::optional<at::Tensor>& bias,
                                                       int64_t n_group, int64_t topk_group,
                                                       c10::string_view score_func,
                                                       bool norm_topk_prob,
                                                       double routed_scaling_factor) {
  constexpr const char* op = "moe_topk_route";
  const RouteParams p = check_moe_topk_route(logits, top_k, bias, n_group, topk_group, score_func);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t t = logits.size(0), e = logits.size(1);
  at::Tensor weights = at::empty({t, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({t, top_k}, logits.options().dtype(at::kInt));
  if (t == 0) return {weights, ids};
  R1X_CHECK_VALUE(e <= cuda::moe_route_max_experts(), op, ": the CUDA kernel takes at most ",
                    cuda::moe_route_max_experts(), " experts, got ", e);
  const at::Tensor lc = dense(logits);
  at::Tensor bc;
  if (bias.has_value()) bc = dense(*bias);
  cuda::MoeRouteParams rp;
  rp.top_k = p.top_k;
  rp.n_group = p.n_group;
  rp.topk_group = p.topk_group;
  rp.softmax = p.softmax;
  rp.norm_topk_prob = norm_topk_prob;
  rp.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  check_launch(cuda::moe_topk_route(lc.data_ptr(), cuda_dtype(lc.scalar_type()),
                                    bc.defined() ? bc.data_ptr() : nullptr,
                                    bc.defined() ? cuda_dtype(bc.scalar_type())
                                                 : cuda::DType::kFloat32,
                                    t, e, rp, weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                    current_stream()),
               op);
  return {weights, ids};
}

// Out-of-range ids cannot be reported without a host sync: on CUDA their rows sort after every
// expert, counted by no entry of offs (moe_launch.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cuda(const at::Tensor& x,
                                                                 const at::Tensor& ids,
                                                                 int64_t num_experts) {
  constexpr const char* op = "moe_dispatch";
  check_moe_dispatch(x, ids, num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t t = x.size(0), k = ids.size(1), rows = t * k, h = x.size(1);
  R1X_CHECK_VALUE(rows <= INT_MAX, op, ": T * top_k must fit in int32 (`perm` is int32), got ",
                    rows);
  R1X_CHECK_VALUE(num_experts < INT_MAX, op, ": `num_experts` must fit in int32, got ",
                    num_experts);
  at::Tensor x_sorted = at::empty({rows, h}, x.options());
  at::Tensor offs = at::empty({num_experts}, ids.options().dtype(at::kInt));
  at::Tensor perm = at::empty({rows}, ids.options().dtype(at::kInt));
  const at::Tensor ic = dense(ids);
  const at::Tensor xc = rows > 0 && h > 0 ? dense(x) : x;
  const Workspace ws = make_workspace(cuda::moe_dispatch_workspace_bytes(t, k, num_experts), x);
  const int64_t row_bytes = rows > 0 ? h * x.element_size() : 0;
  check_launch(cuda::moe_dispatch(row_bytes > 0 ? xc.data_ptr() : nullptr, row_bytes,
                                  rows > 0 ? ic.data_ptr() : nullptr,
                                  ic.scalar_type() == at::kLong, t, k, num_experts,
                                  row_bytes > 0 ? x_sorted.data_ptr() : nullptr,
                                  offs.data_ptr<int32_t>(),
                                  rows > 0 ? perm.data_ptr<int32_t>() : nullptr, ws.ptr, ws.bytes,
                                  current_stream()),
               op);
  return {x_sorted, offs, perm};
}

at::Tensor moe_combine_cuda(const at::Tensor& y_sorted, const at::Tensor& weights,
                            const at::Tensor& perm, int64_t num_tokens) {
  constexpr const char* op = "moe_combine";
  check_moe_combine(y_sorted, weights, perm, num_tokens);
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t k = weights.size(1), h = y_sorted.size(1);
  R1X_CHECK_VALUE(num_tokens * k <= INT_MAX, op,
                    ": num_tokens * top_k must fit in int32 (`perm` is int32), got ",
                    num_tokens * k);
  at::Tensor out = at::empty({num_tokens, h}, y_sorted.options());
  if (num_tokens == 0 || h == 0) return out;
  const bool any = k > 0;
  const at::Tensor yc = any ? dense(y_sorted) : y_sorted;
  const at::Tensor wc = any ? dense(weights) : weights;
  const at::Tensor pc = any ? dense(perm) : perm;
  const Workspace ws = make_workspace(cuda::moe_combine_workspace_bytes(num_tokens, k), y_sorted);
  check_launch(cuda::moe_combine(any ? yc.data_ptr() : nullptr, cuda_dtype(y_sorted.scalar_type()),
                                 any ? wc.data_ptr() : nullptr, cuda_dtype(weights.scalar_type()),
                                 any ? pc.data_ptr<int32_t>() : nullptr, num_tokens, k, h,
                                 out.data_ptr(), ws.ptr, ws.bytes, current_stream()),
               op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward_cuda(const at::Tensor& grad_out,
                                                             const at::Tensor& y_sorted,
                                                             const at::Tensor& weights,
                                                             const at::Tensor& perm) {
  constexpr const char* op = "moe_combine_backward";
  check_moe_combine_backward(grad_out, y_sorted, weights, perm);
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t t = weights.size(0), k = weights.size(1), h = y_sorted.size(1);
  R1X_CHECK_VALUE(t * k <= INT_MAX, op, ": num_tokens * top_k must fit in int32, got ", t * k);
  at::Tensor grad_y = at::empty({t * k, h}, y_sorted.options());
  at::Tensor grad_w = at::empty({t, k}, weights.options().dtype(at::kFloat));
  if (t * k == 0) return {grad_y, grad_w.to(weights.scalar_type())};
  const at::Tensor gc = dense(grad_out), yc = dense(y_sorted), wc = dense(weights), pc = dense(perm);
  const Workspace ws = make_workspace(cuda::moe_combine_workspace_bytes(t, k), y_sorted);
  check_launch(cuda::moe_combine_backward(gc.data_ptr(), yc.data_ptr(), cuda_dtype(y_sorted.scalar_type()),
                                          wc.data_ptr(), cuda_dtype(weights.scalar_type()),
                                          pc.data_ptr<int32_t>(), t, k, h, grad_y.data_ptr(),
                                          grad_w.data_ptr<float>(), ws.ptr, ws.bytes, current_stream()),
               op);
  return {grad_y, grad_w.to(weights.scalar_type())};
}

at::Tensor grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  constexpr const char* op = "grouped_gemm";
  check_grouped_gemm(a, b, offs);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1), groups = b.size(0);
  if (m == 0 || n == 0) return at::empty({m, n}, a.options());
  if (groups == 0 || k == 0) return at::zeros({m, n}, a.options());
  R1X_CHECK_VALUE(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && groups <= INT_MAX, op,
                    ": M, N, K and E must fit in int32, got a ", a.sizes(), " and b ", b.sizes());
  const at::Tensor ac = dense(a), bc = dense(b), oc = dense(offs);
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  // The CUTLASS (TMA) path stores rows 16-byte aligned: pad the row pitch when it can run.
  const int64_t ldo = bf16 && k % 8 == 0 ? padded_ld(n, 2) : n;
  at::Tensor out = at::empty({m, ldo}, a.options());
  const cuda::DType dt = cuda_dtype(a.scalar_type());
  const Workspace ws = make_workspace(cuda::grouped_gemm_workspace_bytes(m, n, k, groups, dt), a);
  check_launch(cuda::grouped_gemm(ac.data_ptr(), bc.data_ptr(), oc.data_ptr<int32_t>(),
                                  out.data_ptr(), dt, m, n, k, groups, ldo, ws.ptr, ws.bytes,
                                  current_stream()),
               op);
  return unpad(out, n);
}

at::Tensor grouped_gemm_grad_a_cuda(const at::Tensor& grad, const at::Tensor& b,
                                    const at::Tensor& offs) {
  constexpr const char* op = "grouped_gemm_grad_a";
  check_grouped_gemm_grad_a(grad, b, offs);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t m = grad.size(0), n = b.size(1), k = b.size(2), groups = b.size(0);
  if (m == 0 || k == 0) return at::empty({m, k}, grad.options());
  if (groups == 0 || n == 0) return at::zeros({m, k}, grad.options());
  R1X_CHECK_VALUE(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && groups <= INT_MAX, op,
                    ": M, N, K and E must fit in int32, got grad ", grad.sizes(), " and b ",
                    b.sizes());
  const at::Tensor gc = dense(grad), bc = dense(b), oc = dense(offs);
  at::Tensor out = at::empty({m, k}, grad.options());
  const cuda::DType dt = cuda_dtype(grad.scalar_type());
  const Workspace ws =
      make_workspace(cuda::grouped_gemm_grad_workspace_bytes(m, n, k, groups, dt), grad);
  check_launch(cuda::grouped_gemm_grad_a(gc.data_ptr(), bc.data_ptr(), oc.data_ptr<int32_t>(),
                                         out.data_ptr(), dt, m, n, k, groups, ws.ptr, ws.bytes,
                                         current_stream()),
               op);
  return out;
}

at::Tensor grouped_gemm_grad_b_cuda(const at::Tensor& grad, const at::Tensor& a,
                                    const at::Tensor& offs, int64_t num_groups) {
  constexpr const char* op = "grouped_gemm_grad_b";
  check_grouped_gemm_grad_b(grad, a, offs, num_groups);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t m = grad.size(0), n = grad.size(1), k = a.size(1);
  at::Tensor out = at::empty({num_groups, n, k}, grad.options());
  if (out.numel() == 0) return out;
  if (m == 0) return out.zero_();
  R1X_CHECK_VALUE(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && num_groups <= INT_MAX, op,
                    ": M, N, K and num_groups must fit in int32, got grad ", grad.sizes(),
                    " and a ", a.sizes());
  const at::Tensor gc = dense(grad), ac = dense(a), oc = dense(offs);
  const cuda::DType dt = cuda_dtype(grad.scalar_type());
  const Workspace ws =
      make_workspace(cuda::grouped_gemm_grad_workspace_bytes(m, n, k, num_groups, dt), grad);
  check_launch(cuda::grouped_gemm_grad_b(gc.data_ptr(), ac.data_ptr(), oc.data_ptr<int32_t>(),
                                         out.data_ptr(), dt, m, n, k, num_groups, ws.ptr,
                                         ws.bytes, current_stream()),
               op);
  return out;
}

at::Tensor fp8_grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale,
                                 const at::Tensor& b, const at::Tensor& b_scale,
                                 const at::Tensor& offs, std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "fp8_grouped_gemm";
  const at::ScalarType odt = gemm_out_dtype(out_dtype, "fp8_grouped_gemm");
  check_fp8_grouped_gemm(a, a_scale, b, b_scale, offs);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1), groups = b.size(0);
  if (m == 0 || n == 0) return at::empty({m, n}, a.options().dtype(odt));
  if (groups == 0 || k == 0) return at::zeros({m, n}, a.options().dtype(odt));
  const int64_t kb = k / 128;
  R1X_CHECK_VALUE(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && groups <= INT_MAX &&
                        m * kb <= INT_MAX && groups * kb * ceil_div(n, 128) <= INT_MAX,
                    op, ": the problem is too large for the kernel's 32-bit sizes, got a ",
                    a.sizes(), " and b ", b.sizes());
  const at::Tensor ac = dense(a), bc = dense(b), asc = dense(a_scale), bsc = dense(b_scale);
  const at::Tensor oc = dense(offs);
  // The epilogue stores rows with TMA: the row pitch must be a multiple of 16 bytes.
  const int64_t ldo = padded_ld(n, odt == at::kFloat ? 4 : 2);
  at::Tensor out = at::empty({m, ldo}, a.options().dtype(odt));
  const cuda::DType cdt = odt == at::kFloat ? cuda::DType::kFloat32 : cuda::DType::kBFloat16;
  const Workspace ws =
      make_workspace(cuda::fp8_grouped_gemm_workspace_bytes(m, n, k, groups, cdt), a);
  check_launch(cuda::fp8_grouped_gemm(static_cast<const uint8_t*>(ac.data_ptr()),
                                      asc.data_ptr<float>(),
                                      static_cast<const uint8_t*>(bc.data_ptr()),
                                      bsc.data_ptr<float>(), oc.data_ptr<int32_t>(),
                                      out.data_ptr(), cdt, m, n, k, groups, ldo, ws.ptr, ws.bytes,
                                      current_stream()),
               op);
  return unpad(out, n);
}

}  // namespace

TORCH_LIBRARY_IMPL(r1x, CUDA, m) {
  m.impl("moe_topk_route", &moe_topk_route_cuda);
  m.impl("moe_dispatch", &moe_dispatch_cuda);
  m.impl("moe_combine", &moe_combine_cuda);
  m.impl("moe_combine_backward", &moe_combine_backward_cuda);
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_grad_a", &grouped_gemm_grad_a_cuda);
  m.impl("grouped_gemm_grad_b", &grouped_gemm_grad_b_cuda);
  m.impl("fp8_grouped_gemm", &fp8_grouped_gemm_cuda);
}

}  // namespace r1x
