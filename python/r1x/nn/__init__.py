"""Layers built on r1x ops."""

from r1x.nn.cache import OutOfBlocksError, PagedLatentCache
from r1x.nn.fp8_linear import FP8Linear
from r1x.nn.mla import MLA, RotaryEmbedding
from r1x.nn.moe import MoE
from r1x.nn.norm import RMSNorm

__all__ = ["FP8Linear", "MoE", "MLA", "RMSNorm", "RotaryEmbedding", "PagedLatentCache", "OutOfBlocksError"]
