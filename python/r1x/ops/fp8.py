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


# The fake (meta) implementations repeat the C++ argument checks (csrc/fp8_checks.h) with the
# same messages, so torch.compile tracing and meta tensors reject bad input as eagerly as the
# kernels do.
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_dtype(op, name, t, allowed, expected):
    torch._check(t.dtype in allowed, lambda: f"{op}: `{name}` must be {expected}, got {t.dtype}")


def _check_same_device(op, ref_name, ref, **tensors):
    for name, t in tensors.items():
        torch._check(
            t.device == ref.device,
            lambda: f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
            "all tensors must be on one device",
        )


def _check_shape(op, name, t, expected, why):
    torch._check(
        tuple(t.shape) == tuple(expected),
        lambda: f"{op}: `{name}` must have shape {list(expected)} ({why}), got {list(t.shape)}",
    )


@torch.library.register_fake("r1x::quant_fp8_per_token_group")
def _(x, group_size=128, ue8m0=False):
    op = "quant_fp8_per_token_group"
    _check_dtype(op, "x", x, _FLOATS, "float32, bfloat16 or float16")
    torch._check(x.dim() >= 1, lambda: f"{op}: `x` must have at least 1 dimension, got a scalar")
    torch._check(group_size > 0, lambda: f"{op}: `group_size` must be positive, got {group_size}")
    torch._check(
        x.shape[-1] % group_size == 0,
        lambda: f"{op}: the last dimension of `x` ({x.shape[-1]}) must be a multiple of "
        f"`group_size` ({group_size})",
    )
    q = torch.empty_like(x, dtype=FP8_DTYPE, memory_format=torch.contiguous_format)
    scale = x.new_empty((*x.shape[:-1], x.shape[-1] // group_size), dtype=torch.float32)
    return q, scale


@torch.library.register_fake("r1x::quant_fp8_per_block")
def _(w, block_size=128, ue8m0=False):
    op = "quant_fp8_per_block"
    _check_dtype(op, "w", w, _FLOATS, "float32, bfloat16 or float16")
    torch._check(w.dim() == 2, lambda: f"{op}: `w` must be 2-D, got shape {list(w.shape)}")
    torch._check(block_size > 0, lambda: f"{op}: `block_size` must be positive, got {block_size}")
    q = torch.empty_like(w, dtype=FP8_DTYPE, memory_format=torch.contiguous_format)
    scale = w.new_empty(
        (_ceil_div(w.shape[0], block_size), _ceil_div(w.shape[1], block_size)), dtype=torch.float32
    )
    return q, scale


@torch.library.register_fake("r1x::dequant_fp8")
def _(q, scale, block=(1, 128)):
    op = "dequant_fp8"
    _check_dtype(op, "q", q, (FP8_DTYPE,), "float8_e4m3fn")
    _check_dtype(op, "scale", scale, (torch.float32,), "float32")
    _check_same_device(op, "q", q, scale=scale)
    torch._check(q.dim() >= 1, lambda: f"{op}: `q` must have at least 1 dimension, got a scalar")
    torch._check(
        len(block) == 2 and block[0] >= 1 and block[1] >= 1,
        lambda: f"{op}: `block` must be two positive sizes (rows, cols), got {list(block)}",
    )
    expected = list(q.shape)
    expected[-1] = _ceil_div(q.shape[-1], block[1])
    if q.dim() >= 2:
        expected[-2] = _ceil_div(q.shape[-2], block[0])
    _check_shape(op, "scale", scale, expected, "one scale per block of `q`")
    return torch.empty_like(q, dtype=torch.float32, memory_format=torch.contiguous_format)


@torch.library.register_fake("r1x::fp8_gemm")
def _(a, a_scale, b, b_scale, out_dtype=None):
    op = "fp8_gemm"
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    torch._check(
        out_dtype in (torch.bfloat16, torch.float32),
        lambda: f"{op}: `out_dtype` must be torch.bfloat16 or torch.float32, got {out_dtype}",
    )
    for name, t in (("a", a), ("b", b)):
        _check_dtype(op, name, t, (FP8_DTYPE,), "float8_e4m3fn")
    for name, t in (("a_scale", a_scale), ("b_scale", b_scale)):
        _check_dtype(op, name, t, (torch.float32,), "float32")
    for name, t in (("a", a), ("b", b)):
        torch._check(t.dim() == 2, lambda: f"{op}: `{name}` must be 2-D, got shape {list(t.shape)}")
    _check_same_device(op, "a", a, a_scale=a_scale, b=b, b_scale=b_scale)
    k = a.shape[1]
    torch._check(
        b.shape[1] == k,
        lambda: f"{op}: `b` must be [N, K] with the K of `a` ({k}), got shape {list(b.shape)}",
    )
    torch._check(
        k % BLOCK == 0,
        lambda: f"{op}: K (the last dimension of `a` and `b`) must be a multiple of 128, got {k}",
    )
    _check_shape(op, "a_scale", a_scale, (a.shape[0], k // BLOCK), "[M, K/128]: one scale per 1x128 group")
    _check_shape(
        op, "b_scale", b_scale, (_ceil_div(b.shape[0], BLOCK), k // BLOCK),
        "[ceil(N/128), K/128]: one scale per 128x128 block",
    )
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
