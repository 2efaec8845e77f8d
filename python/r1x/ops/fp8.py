"""FP8 (e4m3) quantization and the FP8 block-scaled GEMM (DESIGN.md 3.1-3.2)."""

from __future__ import annotations

import torch

__all__ = ["quant_fp8_per_token_group", "quant_fp8_per_block", "dequant_fp8", "fp8_gemm"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def quant_fp8_per_token_group(
    x: torch.Tensor, group_size: int = 128, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations to e4m3 with one scale per ``group_size`` contiguous values.

    Args:
        x: float32/bfloat16/float16 ``[..., K]`` with ``K % group_size == 0``.
        group_size: values per scale (DeepSeek-V3: 128, a 1x128 "token group").
        ue8m0: round each scale up to a power of two (the UE8M0 scale format).

    Returns:
        ``(q, scale)``: ``q`` e4m3 shaped like ``x``; ``scale`` float32 ``[..., K // group_size]``
        with ``scale = max(amax(|group|), 1e-4) / 448`` and ``q = e4m3(x / scale)`` (round to
        nearest even, saturating at 448). ``q * scale`` approximates ``x``.
    """
    return torch.ops.r1x.quant_fp8_per_token_group.default(x, group_size, ue8m0)


def quant_fp8_per_block(
    w: torch.Tensor, block_size: int = 128, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[N, K]`` to e4m3 with one scale per ``block_size`` x ``block_size`` block.

    Any N and K: edge blocks may be partial. Returns ``(q [N, K] e4m3, scale float32
    [ceil(N/128), ceil(K/128)])``, the same scale rule as :func:`quant_fp8_per_token_group`.
    """
    return torch.ops.r1x.quant_fp8_per_block.default(w, block_size, ue8m0)


def dequant_fp8(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (1, 128)
) -> torch.Tensor:
    """Dequantize e4m3 ``q`` with block scales to float32.

    ``block`` is the (rows, cols) block one scale covers over the last two dimensions of ``q``:
    ``(1, 128)`` for activations (``scale [..., ceil(K/128)]``), ``(128, 128)`` for weights
    (``scale [..., ceil(N/128), ceil(K/128)]``).
    """
    return torch.ops.r1x.dequant_fp8.default(q, scale, list(block))


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 block-scaled GEMM: ``out = (a * a_scale) @ (b * b_scale).T``.

    Args:
        a: e4m3 ``[M, K]`` activations, ``K % 128 == 0``, any ``M >= 0``.
        a_scale: float32 ``[M, K/128]`` per-token-group scales.
        b: e4m3 ``[N, K]`` weights (the ``nn.Linear`` layout).
        b_scale: float32 ``[ceil(N/128), K/128]`` block scales.
        out_dtype: ``torch.bfloat16`` (default) or ``torch.float32``.

    Accumulates in fp32 and applies the scales per 128-wide K block (DeepGEMM's promotion).
    """
    return torch.ops.r1x.fp8_gemm.default(a, a_scale, b, b_scale, out_dtype)


def _ceil_div(a, b):
    return (a + b - 1) // b


@torch.library.register_fake("r1x::quant_fp8_per_token_group")
def _(x, group_size=128, ue8m0=False):
    torch._check(x.dim() >= 1, lambda: "quant_fp8_per_token_group: `x` must have at least 1 dimension")
    torch._check(group_size > 0, lambda: "quant_fp8_per_token_group: `group_size` must be positive")
    torch._check(
        x.shape[-1] % group_size == 0,
        lambda: f"quant_fp8_per_token_group: the last dimension of `x` ({x.shape[-1]}) must be a "
        f"multiple of `group_size` ({group_size})",
    )
    q = torch.empty_like(x, dtype=FP8_DTYPE, memory_format=torch.contiguous_format)
    scale = x.new_empty((*x.shape[:-1], x.shape[-1] // group_size), dtype=torch.float32)
    return q, scale


@torch.library.register_fake("r1x::quant_fp8_per_block")
def _(w, block_size=128, ue8m0=False):
    torch._check(w.dim() == 2, lambda: "quant_fp8_per_block: `w` must be 2-D")
    torch._check(block_size > 0, lambda: "quant_fp8_per_block: `block_size` must be positive")
    q = torch.empty_like(w, dtype=FP8_DTYPE, memory_format=torch.contiguous_format)
    scale = w.new_empty(
        (_ceil_div(w.shape[0], block_size), _ceil_div(w.shape[1], block_size)), dtype=torch.float32
    )
    return q, scale


@torch.library.register_fake("r1x::dequant_fp8")
def _(q, scale, block=(1, 128)):
    return torch.empty_like(q, dtype=torch.float32, memory_format=torch.contiguous_format)


@torch.library.register_fake("r1x::fp8_gemm")
def _(a, a_scale, b, b_scale, out_dtype=None):
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    torch._check(
        out_dtype in (torch.bfloat16, torch.float32),
        lambda: f"fp8_gemm: `out_dtype` must be torch.bfloat16 or torch.float32, got {out_dtype}",
    )
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "fp8_gemm: `a` and `b` must be 2-D")
    torch._check(b.shape[1] == a.shape[1], lambda: "fp8_gemm: `b` must be [N, K] with the K of `a`")
    torch._check(a.shape[1] % BLOCK == 0, lambda: "fp8_gemm: K must be a multiple of 128")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
