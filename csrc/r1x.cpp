// r1x._C: every op schema (once), and a tiny Python module with CPU-dispatch controls.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <stdexcept>

#include "check.h"
#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace {

at::Tensor mla_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_seqlens, bool causal,
                         std::optional<double> softmax_scale) {
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("r1x::mla_attention_forward", "")
                                  .typed<std::tuple<at::Tensor, at::Tensor>(
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, bool, std::optional<double>)>();
  return std::get<0>(forward.call(q, k, v, cu_seqlens, causal, softmax_scale));
}

// mla_decode has no backward. Rather than torch's fallback for ops without an autograd kernel
// (a warning, then gradients that silently stop here), refuse to record it.
std::tuple<at::Tensor, at::Tensor> mla_decode_autograd(const at::Tensor& q,
                                                       const at::Tensor& kv_cache,
                                                       const at::Tensor& block_table,
                                                       const at::Tensor& cache_seqlens, int64_t dv,
                                                       std::optional<double> softmax_scale,
                                                       bool causal) {
  R1X_CHECK(!(at::GradMode::is_enabled() && (q.requires_grad() || kv_cache.requires_grad())),
              "mla_decode: has no backward (an inference kernel), but `q` or `kv_cache` requires "
              "grad: call it under torch.no_grad() or torch.inference_mode(), and train with "
              "mla_attention");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("r1x::mla_decode", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, int64_t, std::optional<double>, bool)>();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale, causal);
}

}  // namespace

TORCH_LIBRARY(r1x, m) {
  // FP8 (e4m3) quantization, DESIGN.md 3.1
  m.def("quant_fp8_per_token_group(Tensor x, int group_size=128, bool ue8m0=False) -> (Tensor, Tensor)");
  m.def("quant_fp8_per_block(Tensor w, int block_size=128, bool ue8m0=False) -> (Tensor, Tensor)");
  m.def("dequant_fp8(Tensor q, Tensor scale, int[2] block=[1, 128]) -> Tensor");
  // FP8 block-scaled GEMM, DESIGN.md 3.2
  m.def("fp8_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, ScalarType? out_dtype=None) -> Tensor");
  // Mixture-of-Experts, DESIGN.md 3.3
  m.def(
      "moe_topk_route(Tensor logits, int top_k, Tensor? bias=None, int n_group=1, int topk_group=1, "
      "str score_func=\"sigmoid\", bool norm_topk_prob=True, float routed_scaling_factor=1.0) -> (Tensor, Tensor)");
  m.def("moe_dispatch(Tensor x, Tensor ids, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def("moe_combine(Tensor y_sorted, Tensor weights, Tensor perm, int num_tokens) -> Tensor");
  // moe_combine's backward: (grad of y_sorted, grad of weights)
  m.def("moe_combine_backward(Tensor grad_out, Tensor y_sorted, Tensor weights, Tensor perm) -> (Tensor, Tensor)");
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor offs) -> Tensor");
  m.def(
      "fp8_grouped_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor offs, "
      "ScalarType? out_dtype=None) -> Tensor");
  // grouped_gemm's backward: grad_a[rows of e] = grad[rows of e] @ b[e] (M x K), and
  // grad_b[e] = grad[rows of e].T @ a[rows of e] (E x N x K)
  m.def("grouped_gemm_grad_a(Tensor grad, Tensor b, Tensor offs) -> Tensor");
  m.def("grouped_gemm_grad_b(Tensor grad, Tensor a, Tensor offs, int num_groups) -> Tensor");
  // Multi-head Latent Attention, DESIGN.md 3.4. mla_attention is mla_attention_forward's output
  // (a composite: autograd and torch.compile see mla_attention_forward, whose log-sum-exp [H, T]
  // fp32 the backward needs).
  m.def(
      "mla_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, bool causal=True, "
      "float? softmax_scale=None) -> Tensor");
  m.impl("mla_attention", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(mla_attention));
  m.def(
      "mla_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, bool causal=True, "
      "float? softmax_scale=None) -> (Tensor, Tensor)");
  // (grad_q, grad_k, grad_v); grad_lse, when given, is the gradient of the forward's lse
  m.def(
      "mla_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, Tensor cu_seqlens, bool causal=True, float? softmax_scale=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, int dv, "
      "float? softmax_scale=None, bool causal=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(r1x, Autograd, m) { m.impl("mla_decode", TORCH_FN(mla_decode_autograd)); }

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(r1x::cpu::isa_name(r1x::cpu::active_isa()));
}

PyObject* py_detected_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(r1x::cpu::isa_name(r1x::cpu::detected_isa()));
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    const r1x::cpu::Isa prev = r1x::cpu::set_isa_cap(r1x::cpu::parse_isa(name));
    return PyUnicode_FromString(r1x::cpu::isa_name(prev));
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* py_cpu_peak(PyObject*, PyObject*) {
  const r1x::cpu::Kernels& kern = r1x::cpu::active_kernels();
  double gflops = 0.0;
  Py_BEGIN_ALLOW_THREADS gflops = r1x::cpu::peak_gflops(kern);
  Py_END_ALLOW_THREADS
  if (kern.peak_probe == nullptr) Py_RETURN_NONE;
  return Py_BuildValue("(ds)", gflops, kern.peak_unit);
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The ISA level the CPU kernels use now."},
    {"detected_cpu_isa", py_detected_cpu_isa, METH_NOARGS, "The best ISA level this CPU supports."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "Cap the CPU kernels' ISA level (generic, avx2, avx512, amx); returns the previous cap."},
    {"cpu_peak", py_cpu_peak, METH_NOARGS,
     "(GFLOP/s, instruction): the measured peak of the active CPU path's GEMM instruction on all "
     "threads (about 50 ms), or None on the generic path."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "r1x compiled core", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
