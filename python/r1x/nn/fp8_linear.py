"""FP8Linear: a drop-in ``nn.Linear`` that multiplies in FP8 (DeepSeek-V3's recipe).

Forward: activations are quantized per 1x128 token group, weights per 128x128 block, and
multiplied with :func:`r1x.fp8_gemm` (fp32 accumulation, scales applied per K block).
Backward: ``grad_input`` is another FP8 GEMM, of the quantized ``grad_output`` with the
transposed quantized weight (128x128 blocks transpose into 128x128 blocks, so the forward's
quantized weight is reused as is); ``grad_weight`` is a matmul in the master weight's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from r1x.ops.fp8 import FP8_DTYPE, fp8_gemm, quant_fp8_per_block, quant_fp8_per_token_group

BLOCK = 128


def _pad(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pads dimension ``dim`` (-1 or -2) of ``t`` to a multiple of ``multiple``; e4m3
    tensors are padded through their bytes (e4m3 zero is 0x00; F.pad has no float8 kernel)."""
    pad = -t.shape[dim] % multiple
    if not pad:
        return t
    widths = (0, pad) if dim == -1 else (0, 0, 0, pad)
    if t.dtype == FP8_DTYPE:
        return F.pad(t.view(torch.uint8), widths).view(FP8_DTYPE)
    return F.pad(t, widths)


def _gemm_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp8_gemm writes bf16 or fp32; other dtypes go through fp32."""
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def quantize_weight(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an ``[N, K]`` weight per 128x128 block, zero-padding K to a multiple of 128
    (zeros change no block's amax). Returns ``(q [N, K_pad], scale [ceil(N/128), K_pad/128])``."""
    return quant_fp8_per_block(_pad(w, -1, BLOCK), BLOCK, ue8m0)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, q_w, s_w, bias, ue8m0):
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        q_x, s_x = quant_fp8_per_token_group(_pad(x2, -1, BLOCK), BLOCK, ue8m0)
        y = fp8_gemm(q_x, s_x, q_w, s_w, out_dtype=_gemm_out_dtype(x.dtype))
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x2, weight, q_w, s_w, bias)
        ctx.in_features = in_features
        ctx.ue8m0 = ue8m0
        ctx.x_shape = x.shape
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, q_w, s_w, bias = ctx.saved_tensors
        n = q_w.shape[0]
        g = grad_out.reshape(-1, n)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # grad_x = g @ W: an FP8 GEMM with K = N (padded to 128) and the transposed weight
            q_g, s_g = quant_fp8_per_token_group(_pad(g, -1, BLOCK), BLOCK, ctx.ue8m0)
            q_wt = _pad(q_w, -2, BLOCK).t().contiguous()
            grad_x = fp8_gemm(q_g, s_g, q_wt, s_w.t().contiguous(), out_dtype=_gemm_out_dtype(g.dtype))
            grad_x = grad_x[:, : ctx.in_features].to(grad_out.dtype).reshape(ctx.x_shape)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = g.to(weight.dtype).t() @ x2.to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[4]:
            grad_b = g.sum(0).to(bias.dtype)
        return grad_x, grad_w, None, None, grad_b, None


class FP8Linear(nn.Module):
    """``y = x @ W.T + b`` computed in FP8 with DeepSeek-V3's fine-grained scales.

    A drop-in for :class:`torch.nn.Linear` (same constructor, parameters, initialisation and
    ``state_dict`` keys) that holds bf16/fp32 master weights and quantizes them on the fly; or,
    after :meth:`freeze_fp8` / :meth:`from_fp8`, holds only frozen e4m3 weights with their
    block scales (``weight`` and ``weight_scale_inv``, DeepSeek-V3's checkpoint names).
    Any ``in_features`` and ``out_features`` (K is zero-padded to a multiple of 128 inside).

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        ue8m0: round all scales up to powers of two (UE8M0 scales).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, *, ue8m0: bool = False):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"FP8Linear: in_features and out_features must be positive, got "
                             f"{in_features} and {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.ue8m0 = ue8m0
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("weight_scale_inv", None)
        self._cache = None  # (weight version, data_ptr, q, s) for eager inference
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so FP8Linear(...) and nn.Linear(...) match in distribution
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def is_fp8(self) -> bool:
        """True when the weights are frozen e4m3 (no master weights kept)."""
        return self.weight.dtype == FP8_DTYPE

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, ue8m0: bool = False) -> "FP8Linear":
        """An FP8Linear sharing ``linear``'s parameters (master weights, trainable)."""
        return cls._wrap(linear.weight, linear.bias, None, ue8m0)

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                 bias: torch.Tensor | None = None) -> "FP8Linear":
        """Frozen FP8 layer from an e4m3 ``weight [N, K]`` and its block scales
        ``weight_scale_inv [ceil(N/128), ceil(K/128)]`` (dequantized weight = weight * scale)."""
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"FP8Linear.from_fp8: `weight` must be a 2-D float8_e4m3fn tensor, got "
                             f"{weight.dtype} {list(weight.shape)}")
        n, k = weight.shape
        expected = ((n + BLOCK - 1) // BLOCK, (k + BLOCK - 1) // BLOCK)
        if weight_scale_inv.dtype != torch.float32 or tuple(weight_scale_inv.shape) != expected:
            raise ValueError(f"FP8Linear.from_fp8: `weight_scale_inv` must be float32 of shape "
                             f"{list(expected)}, got {weight_scale_inv.dtype} {list(weight_scale_inv.shape)}")
        frozen_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return cls._wrap(nn.Parameter(weight, requires_grad=False), frozen_bias, weight_scale_inv, False)

    @classmethod
    def _wrap(cls, weight: nn.Parameter, bias, weight_scale_inv, ue8m0: bool) -> "FP8Linear":
        """A layer around existing parameters (no allocation, no initialisation)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.out_features, m.in_features = weight.shape
        m.ue8m0 = ue8m0
        m.weight = weight
        m.bias = bias
        m.register_buffer("weight_scale_inv", weight_scale_inv)
        m._cache = None
        return m

    @torch.no_grad()
    def freeze_fp8(self) -> "FP8Linear":
        """Replace the master weights by their e4m3 quantization (frees the bf16/fp32 copy)."""
        if not self.is_fp8:
            q, s = quant_fp8_per_block(self.weight.detach(), BLOCK, self.ue8m0)
            self.weight = nn.Parameter(q, requires_grad=False)
            self.weight_scale_inv = s
            self._cache = None
        return self

    def _quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_fp8:
            q, s = self.weight, self.weight_scale_inv
            return _pad(q, -1, BLOCK), s
        w = self.weight
        if torch.compiler.is_compiling() or (w.requires_grad and torch.is_grad_enabled()):
            return quantize_weight(w.detach(), self.ue8m0)
        # Eager inference: reuse the quantized weight until the parameter changes.
        key = (w._version, w.data_ptr(), w.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *quantize_weight(w.detach(), self.ue8m0))
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: `x` must have last dimension in_features="
                             f"{self.in_features}, got shape {list(x.shape)}")
        q_w, s_w = self._quantized_weight()
        master = None if self.is_fp8 else self.weight
        return _FP8LinearFunction.apply(x, master, q_w, s_w, self.bias, self.ue8m0)

    def extra_repr(self) -> str:
        kind = "fp8 frozen" if self.is_fp8 else f"master {self.weight.dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {kind}, ue8m0={self.ue8m0}")
