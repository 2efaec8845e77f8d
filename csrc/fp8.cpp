// FP8 op family, CPU: argument checks, output allocation, and calls into csrc/cpu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu_glue.h"
#include "cpu/fp8.h"
#include "fp8_checks.h"

namespace r1x {
namespace {

std::tuple<at::Tensor, at::Tensor> quant_fp8_per_token_group_cpu(const at::Tensor& x,
                                                                 int64_t group_size, bool ue8m0) {
  const auto scale_shape = check_quant_per_token_group(x, group_size);
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  const int64_t k = x.size(-1);
  if (xc.numel() > 0) {
    cpu::quant_fp8_per_token_group(xc.data_ptr(), cpu_dtype(x.scalar_type()), xc.numel() / k, k,
                                   group_size, ue8m0,
                                   static_cast<uint8_t*>(q.data_ptr()), scale.data_ptr<float>());
  }
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quant_fp8_per_block_cpu(const at::Tensor& w,
                                                           int64_t block_size, bool ue8m0) {
  const auto scale_shape = check_quant_per_block(w, block_size);
  const at::Tensor wc = w.contiguous();
  at::Tensor q = at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale = at::empty(scale_shape, w.options().dtype(at::kFloat));
  if (wc.numel() > 0) {
    cpu::quant_fp8_per_block(wc.data_ptr(), cpu_dtype(w.scalar_type()), w.size(0), w.size(1),
                             block_size, ue8m0, static_cast<uint8_t*>(q.data_ptr()),
                             scale.data_ptr<float>());
  }
  return {q, scale};
}

at::Tensor dequant_fp8_cpu(const at::Tensor& q, const at::Tensor& scale, at::IntArrayRef block) {
  check_dequant(q, scale, block);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (q.numel() == 0) return out;
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous();
  const int64_t cols = q.size(-1), rows = q.dim() >= 2 ? q.size(-2) : 1;
  cpu::dequant_fp8(static_cast<const uint8_t*>(qc.data_ptr()), sc.data_ptr<float>(),
                   q.numel() / (rows * cols), rows, cols, q.dim() >= 2 ? block[0] : 1, block[1],
                   out.data_ptr<float>());
  return out;
}

at::Tensor fp8_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                        const at::Tensor& b_scale, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType odt = gemm_out_dtype(out_dtype);
  check_fp8_gemm(a, a_scale, b, b_scale);
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  if (m == 0 || n == 0) return at::empty({m, n}, a.options().dtype(odt));
  if (k == 0) return at::zeros({m, n}, a.options().dtype(odt));
  at::Tensor out = at::empty({m, n}, a.options().dtype(odt));
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor asc = a_scale.contiguous(), bsc = b_scale.contiguous();
  cpu::GemmArgs args{static_cast<const uint8_t*>(ac.data_ptr()), asc.data_ptr<float>(),
                     static_cast<const uint8_t*>(bc.data_ptr()), bsc.data_ptr<float>(),
                     out.data_ptr(), odt == at::kFloat ? cpu::DType::kF32 : cpu::DType::kBF16,
                     m, n, k};
  cpu::fp8_gemm(args);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(r1x, CPU, m) {
  m.impl("quant_fp8_per_token_group", &quant_fp8_per_token_group_cpu);
  m.impl("quant_fp8_per_block", &quant_fp8_per_block_cpu);
  m.impl("dequant_fp8", &dequant_fp8_cpu);
  m.impl("fp8_gemm", &fp8_gemm_cpu);
}

}  // namespace r1x
