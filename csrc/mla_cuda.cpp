// Multi-head Latent Attention op family, CUDA: argument checks (mla_checks.h, as on the CPU),
// output and workspace allocation (caching allocator, current stream), and calls into the
// torch-free kernels of csrc/cuda (mla_launch.h). cu_seqlens, cache_seqlens and block_table are
// never read on the host (no op here synchronises with the device), so their values are not
// checked: out-of-range values give unspecified results, never out-of-bounds accesses.
// mla_attention itself is a composite of mla_attention_forward (csrc/r1x.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <limits>

#include "cuda/mla_launch.h"
#include "cuda_glue.h"
#include "mla_checks.h"

namespace r1x {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

void check_attention_limits(const char* op, const AttentionShape& s) {
  const int64_t max_d = cuda::mla_attention_max_head_dim();
  R1X_CHECK_VALUE(s.dqk <= max_d && s.dv <= max_d, op, ": the CUDA kernels take head dims up to ",
                    max_d, ", got Dqk = ", s.dqk, " and Dv = ", s.dv);
  R1X_CHECK_VALUE(s.h <= cuda::mla_attention_max_heads(), op,
                    ": the CUDA kernels take at most ", cuda::mla_attention_max_heads(),
                    " heads, got H = ", s.h);
  R1X_CHECK_VALUE(s.batch < INT_MAX, op, ": `cu_seqlens` is too long (", s.batch + 1, ")");
}

std::tuple<at::Tensor, at::Tensor> mla_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    bool causal, std::optional<double> softmax_scale) {
  constexpr const char* op = "mla_attention_forward";
  const AttentionShape s = check_mla_attention(op, q, k, v, cu_seqlens, softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.t, s.h, s.dv}, q.options());
  at::Tensor lse = at::empty({s.h, s.t}, q.options().dtype(at::kFloat));
  if (s.t == 0) return {out, lse};
  // No sequence can own a row (cu_seqlens = [0] with T > 0 is invalid input): rows that see no
  // key, as the reference leaves them.
  if (s.batch == 0) return {out.zero_(), lse.fill_(-std::numeric_limits<float>::infinity())};
  check_attention_limits(op, s);
  const at::Tensor qc = dense(q), kc = dense(k), vc = dense(v), cc = dense(cu_seqlens);
  check_launch(cuda::mla_attention_forward(qc.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                                           cuda_dtype(q.scalar_type()), cc.data_ptr<int32_t>(),
                                           s.batch, s.t, s.h, s.dqk, s.dv, causal, s.scale,
                                           out.data_ptr(), lse.data_ptr<float>(),
                                           current_stream()),
               op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens, bool causal, std::optional<double> softmax_scale) {
  constexpr const char* op = "mla_attention_backward";
  const AttentionShape s = check_mla_attention_backward(grad_out, q, k, v, out, lse, grad_lse,
                                                        cu_seqlens, softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor grad_q = at::empty({s.t, s.h, s.dqk}, q.options());
  at::Tensor grad_k = at::empty({s.t, s.h, s.dqk}, q.options());
  at::Tensor grad_v = at::empty({s.t, s.h, s.dv}, q.options());
  if (s.t == 0) return {grad_q, grad_k, grad_v};
  if (s.batch == 0) return {grad_q.zero_(), grad_k.zero_(), grad_v.zero_()};
  check_attention_limits(op, s);
  const at::Tensor gc = dense(grad_out), qc = dense(q), kc = dense(k), vc = dense(v);
  const at::Tensor oc = dense(out), lc = dense(lse), cc = dense(cu_seqlens);
  at::Tensor glc;
  if (grad_lse.has_value()) glc = dense(*grad_lse);
  const Workspace ws = make_workspace(cuda::mla_attention_backward_workspace_bytes(s.t, s.h), q);
  check_launch(cuda::mla_attention_backward(
                   gc.data_ptr(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), oc.data_ptr(),
                   lc.data_ptr<float>(), glc.defined() ? glc.data_ptr<float>() : nullptr,
                   cuda_dtype(q.scalar_type()), cc.data_ptr<int32_t>(), s.batch, s.t, s.h, s.dqk,
                   s.dv, causal, s.scale, grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(),
                   ws.ptr, ws.bytes, current_stream()),
               op);
  return {grad_q, grad_k, grad_v};
}

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(const at::Tensor& q, const at::Tensor& kv_cache,
                                                   const at::Tensor& block_table,
                                                   const at::Tensor& cache_seqlens, int64_t dv,
                                                   std::optional<double> softmax_scale,
                                                   bool causal) {
  constexpr const char* op = "mla_decode";
  const DecodeShape s =
      check_mla_decode(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.batch, s.sq, s.h, s.dv}, q.options());
  at::Tensor lse = at::empty({s.batch, s.h, s.sq}, q.options().dtype(at::kFloat));
  if (s.batch == 0) return {out, lse};
  R1X_CHECK_VALUE(s.sq * s.h <= INT_MAX / 2 && s.d < INT_MAX / 2 && s.block_size <= INT_MAX &&
                        s.max_blocks <= INT_MAX && s.num_blocks <= INT_MAX && s.batch <= INT_MAX,
                    op, ": the problem is too large for the kernels' 32-bit sizes, got q ",
                    q.sizes(), ", kv_cache ", kv_cache.sizes(), " and block_table ",
                    block_table.sizes());
  cuda::MlaDecodeShape shape;
  shape.batch = s.batch;
  shape.sq = s.sq;
  shape.heads = s.h;
  shape.d = s.d;
  shape.dv = s.dv;
  shape.num_blocks = s.num_blocks;
  shape.block_size = s.block_size;
  shape.max_blocks = s.max_blocks;
  const cuda::DType dt = cuda_dtype(q.scalar_type());
  const at::Tensor qc = dense(q), sc = dense(cache_seqlens);
  // Empty cache or table: nothing can be read, every sequence counts as empty (the kernels see
  // num_blocks == 0 and never touch these pointers).
  const bool readable = s.num_blocks > 0 && s.max_blocks > 0;
  // The cache is not re-aligned: a view at an odd storage offset (one layer of a larger cache)
  // would otherwise be copied whole on every step; the kernels take element loads for it.
  const at::Tensor kc = readable ? kv_cache.contiguous() : kv_cache;
  const at::Tensor tc = readable ? dense(block_table) : block_table;
  const int splits = cuda::mla_decode_num_splits(shape, dt);
  const Workspace ws = make_workspace(cuda::mla_decode_workspace_bytes(shape, splits), q);
  check_launch(cuda::mla_decode(qc.data_ptr(), readable ? kc.data_ptr() : nullptr, dt,
                                readable ? tc.data_ptr<int32_t>() : nullptr,
                                sc.data_ptr<int32_t>(), shape, causal, s.scale, splits,
                                out.data_ptr(), lse.data_ptr<float>(), ws.ptr, ws.bytes,
                                current_stream()),
               op);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1x, CUDA, m) {
  m.impl("mla_attention_forward", &mla_attention_forward_cuda);
  m.impl("mla_attention_backward", &mla_attention_backward_cuda);
  m.impl("mla_decode", &mla_decode_cuda);
}

}  // namespace r1x
