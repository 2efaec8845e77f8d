"""Layers built on r1x ops."""

from r1x.nn.fp8_linear import FP8Linear
from r1x.nn.moe import MoE

__all__ = ["FP8Linear", "MoE"]
