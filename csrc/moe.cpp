// MoE op family, CPU: argument checks, output allocation, and calls into csrc/cpu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <climits>

#include "cpu_glue.h"
#include "cpu/moe.h"
#include "moe_checks.h"

namespace r1x {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_topk_route_cpu(const at::Tensor& logits, int64_t top_k,
                                                      const std::optional<at::Tensor>& bias,
                                                      int64_t n_group, int64_t topk_group,
                                                      c10::string_view score_func,
                                                      bool norm_topk_prob,
                                                      double routed_scaling_factor) {
  const RouteParams p = check_moe_topk_route(logits, top_k, bias, n_group, topk_group, score_func);
  const int64_t t = logits.size(0), e = logits.size(1);
  at::Tensor weights = at::empty({t, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({t, top_k}, logits.options().dtype(at::kInt));
  if (t == 0) return {weights, ids};
  const at::Tensor lc = logits.contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->contiguous();
  const cpu::RouteOptions opt{top_k, n_group, topk_group, p.softmax, norm_topk_prob,
                              static_cast<float>(routed_scaling_factor)};
  cpu::moe_topk_route(lc.data_ptr(), cpu_dtype(lc.scalar_type()), t, e,
                      bc.defined() ? bc.data_ptr() : nullptr,
                      bc.defined() ? cpu_dtype(bc.scalar_type()) : cpu::DType::kF32, opt,
                      weights.data_ptr<float>(), ids.data_ptr<int32_t>());
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cpu(const at::Tensor& x,
                                                                const at::Tensor& ids,
                                                                int64_t num_experts) {
  check_moe_dispatch(x, ids, num_experts);
  const int64_t t = x.size(0), k = ids.size(1), rows = t * k;
  R1X_CHECK_VALUE(rows <= INT_MAX, "moe_dispatch: T * top_k must fit in int32 (`perm` is int32), got ",
                    rows);
  const at::Tensor ic = ids.contiguous();
  at::Tensor offs = at::empty({num_experts}, ids.options().dtype(at::kInt));
  at::Tensor perm = at::empty({rows}, ids.options().dtype(at::kInt));
  const int64_t bad = cpu::moe_dispatch_index(ic.data_ptr(), ic.scalar_type() == at::kLong, t, k,
                                              num_experts, offs.data_ptr<int32_t>(),
                                              perm.data_ptr<int32_t>());
  R1X_CHECK_VALUE(bad < 0, "moe_dispatch: `ids` must be expert indices in [0, num_experts = ",
                    num_experts, "), got ", bad < 0 ? 0 : ic.reshape(-1)[bad].item<int64_t>(),
                    " at token ", bad < 0 ? 0 : bad / k, ", slot ", bad < 0 ? 0 : bad % k);
  at::Tensor out = at::empty({rows, x.size(1)}, x.options());
  if (rows > 0 && x.size(1) > 0) {
    const at::Tensor xc = x.contiguous();
    cpu::moe_gather_rows(xc.data_ptr(), x.size(1) * x.element_size(), perm.data_ptr<int32_t>(),
                         rows, k, out.data_ptr());
  }
  return {out, offs, perm};
}

at::Tensor moe_combine_cpu(const at::Tensor& y_sorted, const at::Tensor& weights,
                           const at::Tensor& perm, int64_t num_tokens) {
  check_moe_combine(y_sorted, weights, perm, num_tokens);
  const int64_t k = weights.size(1), h = y_sorted.size(1);
  // float16 is combined in float32 (the kernels read and write fp32 and bf16)
  const bool half = y_sorted.scalar_type() == at::kHalf;
  const at::Tensor yc = half ? y_sorted.to(at::kFloat).contiguous() : y_sorted.contiguous();
  const at::Tensor wc = weights.contiguous(), pc = perm.contiguous();
  at::Tensor out = at::empty({num_tokens, h}, yc.options());
  if (num_tokens > 0 && h > 0 && k == 0) out.zero_();
  if (num_tokens > 0 && k > 0) {
    const int64_t bad = cpu::moe_combine(yc.data_ptr(), cpu_dtype(yc.scalar_type()), wc.data_ptr(),
                                         cpu_dtype(wc.scalar_type()), pc.data_ptr<int32_t>(),
                                         num_tokens, k, h, out.data_ptr());
    R1X_CHECK_VALUE(bad < 0, "moe_combine: `perm` must be a permutation of [0, num_tokens * top_k = ",
                      num_tokens * k, ") (as moe_dispatch returns it); entry ", bad, " is ",
                      bad < 0 ? 0 : pc[bad].item<int64_t>(), " (out of range or repeated)");
  }
  return half ? out.to(at::kHalf) : out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward_cpu(const at::Tensor& grad_out,
                                                            const at::Tensor& y_sorted,
                                                            const at::Tensor& weights,
                                                            const at::Tensor& perm) {
  check_moe_combine_backward(grad_out, y_sorted, weights, perm);
  const int64_t t = weights.size(0), k = weights.size(1), h = y_sorted.size(1);
  const bool half = y_sorted.scalar_type() == at::kHalf;  // computed in float32, as the forward
  const at::Tensor yc = half ? y_sorted.to(at::kFloat).contiguous() : y_sorted.contiguous();
  const at::Tensor gc = half ? grad_out.to(at::kFloat).contiguous() : grad_out.contiguous();
  const at::Tensor wc = weights.contiguous(), pc = perm.contiguous();
  at::Tensor grad_y = at::empty({t * k, h}, yc.options());
  at::Tensor grad_w = at::empty({t, k}, weights.options().dtype(at::kFloat));
  if (t * k > 0) {
    const int64_t bad = cpu::moe_combine_backward(gc.data_ptr(), yc.data_ptr(), cpu_dtype(yc.scalar_type()),
                                                  wc.data_ptr(), cpu_dtype(wc.scalar_type()),
                                                  pc.data_ptr<int32_t>(), t, k, h, grad_y.data_ptr(),
                                                  grad_w.data_ptr<float>());
    R1X_CHECK_VALUE(bad < 0, "moe_combine_backward: `perm` must be a permutation of [0, ", t * k,
                      "); entry ", bad, " is out of range or repeated");
  }
  return {half ? grad_y.to(at::kHalf) : grad_y, grad_w.to(weights.scalar_type())};
}

// rows past the last group's end offset are zero
void zero_tail(at::Tensor& out, const at::Tensor& offs) {
  const int64_t groups = offs.size(0);
  const int64_t end = groups ? offs.data_ptr<int32_t>()[groups - 1] : 0;
  if (end < out.size(0)) out.narrow(0, end, out.size(0) - end).zero_();
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs) {
  check_grouped_gemm(a, b, offs);
  const at::Tensor oc = offs.contiguous();
  check_offs_values("grouped_gemm", oc.data_ptr<int32_t>(), oc.size(0), a.size(0));
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1);
  at::Tensor out = at::empty({m, n}, a.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  cpu::grouped_gemm(ac.data_ptr(), bc.data_ptr(), oc.data_ptr<int32_t>(), b.size(0), n, k,
                    cpu_dtype(a.scalar_type()), out.data_ptr());
  zero_tail(out, oc);
  return out;
}

at::Tensor grouped_gemm_grad_a_cpu(const at::Tensor& grad, const at::Tensor& b,
                                   const at::Tensor& offs) {
  constexpr const char* op = "grouped_gemm_grad_a";
  check_grouped_gemm_grad_a(grad, b, offs);
  const at::Tensor oc = offs.contiguous();
  check_offs_values(op, oc.data_ptr<int32_t>(), oc.size(0), grad.size(0));
  const int64_t m = grad.size(0), n = b.size(1), k = b.size(2);
  at::Tensor out = at::empty({m, k}, grad.options());
  if (m == 0 || k == 0) return out;
  const at::Tensor gc = grad.contiguous(), bc = b.contiguous();
  cpu::grouped_gemm_grad_a(gc.data_ptr(), bc.data_ptr(), oc.data_ptr<int32_t>(), b.size(0), n, k,
                           cpu_dtype(grad.scalar_type()), out.data_ptr());
  zero_tail(out, oc);
  return out;
}

at::Tensor grouped_gemm_grad_b_cpu(const at::Tensor& grad, const at::Tensor& a,
                                   const at::Tensor& offs, int64_t num_groups) {
  constexpr const char* op = "grouped_gemm_grad_b";
  check_grouped_gemm_grad_b(grad, a, offs, num_groups);
  const at::Tensor oc = offs.contiguous();
  check_offs_values(op, oc.data_ptr<int32_t>(), num_groups, grad.size(0));
  const int64_t n = grad.size(1), k = a.size(1);
  at::Tensor out = at::empty({num_groups, n, k}, grad.options());
  if (out.numel() == 0) return out;
  const at::Tensor gc = grad.contiguous(), ac = a.contiguous();
  cpu::grouped_gemm_grad_b(gc.data_ptr(), ac.data_ptr(), oc.data_ptr<int32_t>(), num_groups, n, k,
                           cpu_dtype(grad.scalar_type()), out.data_ptr());
  return out;
}

at::Tensor fp8_grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale,
                                const at::Tensor& b, const at::Tensor& b_scale,
                                const at::Tensor& offs, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType odt = gemm_out_dtype(out_dtype, "fp8_grouped_gemm");
  check_fp8_grouped_gemm(a, a_scale, b, b_scale, offs);
  const at::Tensor oc = offs.contiguous();
  check_offs_values("fp8_grouped_gemm", oc.data_ptr<int32_t>(), oc.size(0), a.size(0));
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1);
  at::Tensor out = at::empty({m, n}, a.options().dtype(odt));
  if (m == 0 || n == 0) return out;
  if (k == 0) return out.zero_();
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor asc = a_scale.contiguous(), bsc = b_scale.contiguous();
  cpu::fp8_grouped_gemm(static_cast<const uint8_t*>(ac.data_ptr()), asc.data_ptr<float>(),
                        static_cast<const uint8_t*>(bc.data_ptr()), bsc.data_ptr<float>(),
                        oc.data_ptr<int32_t>(), b.size(0), n, k,
                        odt == at::kFloat ? cpu::DType::kF32 : cpu::DType::kBF16, out.data_ptr());
  zero_tail(out, oc);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(r1x, CPU, m) {
  m.impl("moe_topk_route", &moe_topk_route_cpu);
  m.impl("moe_dispatch", &moe_dispatch_cpu);
  m.impl("moe_combine", &moe_combine_cpu);
  m.impl("moe_combine_backward", &moe_combine_backward_cpu);
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_grad_a", &grouped_gemm_grad_a_cpu);
  m.impl("grouped_gemm_grad_b", &grouped_gemm_grad_b_cpu);
  m.impl("fp8_grouped_gemm", &fp8_grouped_gemm_cpu);
}

}  // namespace r1x
