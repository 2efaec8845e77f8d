"""Plain-PyTorch reference of every r1x op: the tests' oracle and a readable specification.

Each function has the name and signature of the op it specifies. They are written for clarity
(and for float64 where an op accumulates), not speed; the scale and rounding rules are
bit-exact with the kernels.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_AMAX = 1e-4


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def fp8_scale(amax: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """``max(amax, 1e-4) / 448`` in float32 (NaN stays NaN); with ``ue8m0`` rounded up to a
    power of two, exactly (on the bit pattern: a nonzero mantissa bumps the exponent)."""
    scale = amax.float().clamp(min=MIN_AMAX) / FP8_MAX
    if ue8m0:
        bits = scale.view(torch.int32)
        finite = (bits & 0x7F800000) != 0x7F800000
        bump = finite & ((bits & 0x007FFFFF) != 0)
        bits = torch.where(bump, (bits & ~0x007FFFFF) + 0x00800000, bits)
        scale = bits.view(torch.float32)
    return scale


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """float32 -> e4m3, round to nearest even, saturating at +-448."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quant_fp8_per_token_group(x: torch.Tensor, group_size: int = 128, ue8m0: bool = False):
    k = x.shape[-1]
    g = x.float().reshape(*x.shape[:-1], k // group_size, group_size)
    scale = fp8_scale(g.abs().amax(dim=-1), ue8m0)
    q = to_fp8(g / scale.unsqueeze(-1)).reshape(x.shape)
    return q, scale


def quant_fp8_per_block(w: torch.Tensor, block_size: int = 128, ue8m0: bool = False):
    n, k = w.shape
    bn, bk = _ceil_div(n, block_size), _ceil_div(k, block_size)
    wf = w.float()
    padded = wf.new_zeros(bn * block_size, bk * block_size)  # zeros never raise an amax
    padded[:n, :k] = wf
    blocks = padded.reshape(bn, block_size, bk, block_size)
    scale = fp8_scale(blocks.abs().amax(dim=(1, 3)), ue8m0)
    full = scale.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[:n, :k]
    return to_fp8(wf / full), scale


def expand_scale(scale: torch.Tensor, shape, block) -> torch.Tensor:
    """Broadcast block scales to the element grid of ``shape`` (the last two dims)."""
    br, bc = block
    s = scale.repeat_interleave(bc, dim=-1)[..., : shape[-1]]
    if len(shape) >= 2:
        s = s.repeat_interleave(br, dim=-2)[..., : shape[-2], :]
    return s


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block=(1, 128)) -> torch.Tensor:
    return q.float() * expand_scale(scale, q.shape, block)


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale).T`` computed in float64, cast to ``out_dtype``."""
    a64 = a.double() * expand_scale(a_scale.double(), a.shape, (1, 128))
    b64 = b.double() * expand_scale(b_scale.double(), b.shape, (128, 128))
    return (a64 @ b64.T).to(out_dtype)
