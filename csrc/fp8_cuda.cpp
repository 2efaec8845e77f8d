// FP8 op family, CUDA: argument checks, output and workspace allocation (caching allocator),
// and calls into the torch-free kernels of csrc/cuda.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda_glue.h"
#include "fp8_checks.h"

namespace r1x {
namespace {

std::tuple<at::Tensor, at::Tensor> quant_fp8_per_token_group_cuda(const at::Tensor& x,
                                                                  int64_t group_size, bool ue8m0) {
  const auto scale_shape = check_quant_per_token_group(x, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = dense(x);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  const int64_t k = x.size(-1);
  if (xc.numel() > 0) {
    check_launch(cuda::quant_fp8_per_token_group(
                     xc.data_ptr(), cuda_dtype(x.scalar_type()), xc.numel() / k, k, group_size,
                     ue8m0, static_cast<uint8_t*>(q.data_ptr()), scale.data_ptr<float>(),
                     c10::cuda::getCurrentCUDAStream()),
                 "quant_fp8_per_token_group");
  }
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quant_fp8_per_block_cuda(const at::Tensor& w,
                                                            int64_t block_size, bool ue8m0) {
  const auto scale_shape = check_quant_per_block(w, block_size);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = dense(w);
  at::Tensor q = at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale = at::empty(scale_shape, w.options().dtype(at::kFloat));
  if (wc.numel() > 0) {
    check_launch(cuda::quant_fp8_per_block(wc.data_ptr(), cuda_dtype(w.scalar_type()), w.size(0),
                                           w.size(1), block_size, ue8m0,
                                           static_cast<uint8_t*>(q.data_ptr()),
                                           scale.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
                 "quant_fp8_per_block");
  }
  return {q, scale};
}

at::Tensor dequant_fp8_cuda(const at::Tensor& q, const at::Tensor& scale, at::IntArrayRef block) {
  check_dequant(q, scale, block);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (q.numel() == 0) return out;
  const at::Tensor qc = dense(q), sc = dense(scale);
  const int64_t cols = q.size(-1), rows = q.dim() >= 2 ? q.size(-2) : 1;
  check_launch(cuda::dequant_fp8(static_cast<const uint8_t*>(qc.data_ptr()), sc.data_ptr<float>(),
                                 q.numel() / (rows * cols), rows, cols, q.dim() >= 2 ? block[0] : 1,
                                 block[1], out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "dequant_fp8");
  return out;
}

at::Tensor fp8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType odt = gemm_out_dtype(out_dtype);
  check_fp8_gemm(a, a_scale, b, b_scale);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  if (m == 0 || n == 0) return at::empty({m, n}, a.options().dtype(odt));
  if (k == 0) return at::zeros({m, n}, a.options().dtype(odt));
  const at::Tensor ac = dense(a), bc = dense(b), asc = dense(a_scale), bsc = dense(b_scale);
  // The epilogue stores rows with TMA: the row pitch must be a multiple of 16 bytes.
  const int64_t esize = odt == at::kFloat ? 4 : 2;
  const int64_t ldo = ceil_div(n * esize, 16) * 16 / esize;
  at::Tensor out = at::empty({m, ldo}, a.options().dtype(odt));
  const cuda::DType cdt = odt == at::kFloat ? cuda::DType::kFloat32 : cuda::DType::kBFloat16;
  const Workspace ws = make_workspace(cuda::fp8_gemm_workspace_bytes(m, n, k, cdt), a);
  check_launch(cuda::fp8_gemm(static_cast<const uint8_t*>(ac.data_ptr()), asc.data_ptr<float>(),
                              static_cast<const uint8_t*>(bc.data_ptr()), bsc.data_ptr<float>(),
                              out.data_ptr(), cdt, m, n, k, ldo, ws.ptr, ws.bytes,
                              c10::cuda::getCurrentCUDAStream()),
               "fp8_gemm");
  return ldo == n ? out : out.narrow(1, 0, n).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(r1x, CUDA, m) {
  m.impl("quant_fp8_per_token_group", &quant_fp8_per_token_group_cuda);
  m.impl("quant_fp8_per_block", &quant_fp8_per_block_cuda);
  m.impl("dequant_fp8", &dequant_fp8_cuda);
  m.impl("fp8_gemm", &fp8_gemm_cuda);
}

}  // namespace r1x
