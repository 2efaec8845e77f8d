"""r1x: compiled kernels for DeepSeek-V3/R1-style models.

FP8 (e4m3) block-scaled quantization and GEMM, and the Mixture-of-Experts ops (routing,
dispatch/combine, grouped GEMMs), and Multi-head Latent Attention (fused variable-length
attention with its backward, absorbed decode over a paged latent cache). Every op is
``r1x.<name>(...)`` and ``torch.ops.r1x.<name>``, on CPU tensors (C++ kernels with runtime ISA
dispatch) and CUDA tensors (sm_90a kernels, CUTLASS), and works under ``torch.compile``.
"""

import torch  # noqa: F401  (loads libtorch before the extension)

from r1x._torch_check import check_torch as _check_torch, explain_load_error as _explain

_check_torch()  # the torch r1x._C was built against, before loading it
try:
    from r1x import _C  # noqa: F401  (registers the torch.ops.r1x schemas and kernels)
except ImportError as _e:
    raise _explain(_e) from _e
from r1x import reference
from r1x.ops.fp8 import dequant_fp8, fp8_gemm, quant_fp8_per_block, quant_fp8_per_token_group
from r1x.ops.moe import fp8_grouped_gemm, grouped_gemm, moe_combine, moe_dispatch, moe_topk_route
from r1x.ops.mla import mla_attention, mla_attention_forward, mla_decode
from r1x.utils import cpu_isa, info, use_cpu_isa
from r1x import nn  # noqa: E402
from r1x import model  # noqa: E402
from r1x import data, rewards, train  # noqa: E402
from r1x import parallel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "quant_fp8_per_token_group",
    "quant_fp8_per_block",
    "dequant_fp8",
    "fp8_gemm",
    "moe_topk_route",
    "moe_dispatch",
    "moe_combine",
    "grouped_gemm",
    "fp8_grouped_gemm",
    "mla_attention",
    "mla_attention_forward",
    "mla_decode",
    "cpu_isa",
    "use_cpu_isa",
    "info",
    "reference",
    "nn",
    "model",
    "data",
    "rewards",
    "train",
    "parallel",
]
