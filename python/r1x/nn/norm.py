"""RMSNorm as DeepSeek-V3 uses it (transformers' ``DeepseekV3RMSNorm``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, the statistics in float32.

    As transformers' ``DeepseekV3RMSNorm``: the normalised values are cast back to x's dtype
    before the (learned, initially 1) ``weight [hidden_size]`` multiplies them, so a bf16 model
    rounds exactly where the checkpoint's reference does.

    Args:
        hidden_size: the normalised (last) dimension.
        eps: added to the mean square (DeepSeek-V3: 1e-6).
        dtype, device: of ``weight``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"RMSNorm: `hidden_size` must be a positive integer, got {hidden_size!r}")
        if not eps >= 0:
            raise ValueError(f"RMSNorm: `eps` must be >= 0, got {eps!r}")
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))

    def reset_parameters(self) -> None:
        """``weight = 1``."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., hidden_size]`` -> the same shape."""
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNorm: `x` must be [..., hidden_size = {self.hidden_size}], "
                             f"got shape {list(x.shape)}")
        # normalised in (at least) fp32, rounded to x's dtype, then scaled: transformers' order
        # (torch's fused rms_norm computes x * rsqrt(mean(x^2) + eps) in one op)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        y = torch.nn.functional.rms_norm(x32, (self.hidden_size,), None, self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
