// MLA op family, CPU: argument checks (mla_checks.h, as on CUDA, plus the checks of the
// sequence offsets, lengths and block table, which are on the host here), output allocation,
// and calls into csrc/cpu (mla.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <climits>

#include "cpu/mla.h"
#include "cpu_glue.h"
#include "mla_checks.h"

namespace r1x {
namespace {

cpu::AttnArgs attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& cu, const AttentionShape& s, bool causal) {
  return {q.data_ptr(), k.data_ptr(), v.data_ptr(), cpu_dtype(q.scalar_type()),
          cu.data_ptr<int32_t>(), s.batch, s.t, s.h, s.dqk, s.dv, s.scale, causal};
}

std::tuple<at::Tensor, at::Tensor> mla_attention_forward_cpu(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const at::Tensor& cu_seqlens,
                                                             bool causal,
                                                             std::optional<double> softmax_scale) {
  constexpr const char* op = "mla_attention_forward";
  const AttentionShape s = check_mla_attention(op, q, k, v, cu_seqlens, softmax_scale);
  const at::Tensor cu = cu_seqlens.contiguous();
  check_cu_seqlens_values(op, cu.data_ptr<int32_t>(), s.batch, s.t);
  at::Tensor out = at::empty({s.t, s.h, s.dv}, q.options());
  at::Tensor lse = at::empty({s.h, s.t}, q.options().dtype(at::kFloat));
  if (s.t == 0) return {out, lse};
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  cpu::AttnFwdArgs a{attn_args(qc, kc, vc, cu, s, causal)};
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  cpu::mla_attention_forward(a);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens, bool causal, std::optional<double> softmax_scale) {
  const AttentionShape s = check_mla_attention_backward(grad_out, q, k, v, out, lse, grad_lse,
                                                        cu_seqlens, softmax_scale);
  const at::Tensor cu = cu_seqlens.contiguous();
  check_cu_seqlens_values("mla_attention_backward", cu.data_ptr<int32_t>(), s.batch, s.t);
  at::Tensor grad_q = at::empty({s.t, s.h, s.dqk}, q.options());
  at::Tensor grad_k = at::empty({s.t, s.h, s.dqk}, q.options());
  at::Tensor grad_v = at::empty({s.t, s.h, s.dv}, q.options());
  if (s.t == 0) return {grad_q, grad_k, grad_v};
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor oc = out.contiguous(), gc = grad_out.contiguous(), lc = lse.contiguous();
  at::Tensor glc;
  if (grad_lse.has_value()) glc = grad_lse->contiguous();
  cpu::AttnBwdArgs a{attn_args(qc, kc, vc, cu, s, causal)};
  a.out = oc.data_ptr();
  a.grad_out = gc.data_ptr();
  a.lse = lc.data_ptr<float>();
  a.grad_lse = glc.defined() ? glc.data_ptr<float>() : nullptr;
  a.grad_q = grad_q.data_ptr();
  a.grad_k = grad_k.data_ptr();
  a.grad_v = grad_v.data_ptr();
  cpu::mla_attention_backward(a);
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(const at::Tensor& q, const at::Tensor& kv_cache,
                                                  const at::Tensor& block_table,
                                                  const at::Tensor& cache_seqlens, int64_t dv,
                                                  std::optional<double> softmax_scale,
                                                  bool causal) {
  const DecodeShape s = check_mla_decode(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale);
  const at::Tensor table = block_table.contiguous(), lens = cache_seqlens.contiguous();
  check_mla_decode_values(s, lens.data_ptr<int32_t>(), table.data_ptr<int32_t>());
  at::Tensor out = at::empty({s.batch, s.sq, s.h, s.dv}, q.options());
  at::Tensor lse = at::empty({s.batch, s.h, s.sq}, q.options().dtype(at::kFloat));
  if (s.batch == 0) return {out, lse};
  const at::Tensor qc = q.contiguous(), cache = kv_cache.contiguous();
  const cpu::DecodeArgs a{qc.data_ptr(), cache.data_ptr(), cpu_dtype(q.scalar_type()),
                          table.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), s.batch, s.sq, s.h,
                          s.d, s.dv, s.block_size, s.max_blocks, s.scale, causal,
                          out.data_ptr(), lse.data_ptr<float>()};
  cpu::mla_decode(a);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1x, CPU, m) {
  m.impl("mla_attention_forward", &mla_attention_forward_cpu);
  m.impl("mla_attention_backward", &mla_attention_backward_cpu);
  m.impl("mla_decode", &mla_decode_cpu);
}

}  // namespace r1x
