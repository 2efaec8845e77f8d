"""The DeepSeek-V3-style model: config, modeling (generation and checkpoint I/O build on these)."""

from r1x.model.config import PRESETS, DeepSeekConfig
from r1x.model.modeling import (
    CausalLMOutput,
    DeepSeekDecoderLayer,
    DeepSeekForCausalLM,
    DeepSeekModel,
    DeepSeekMTPModule,
)

__all__ = [
    "PRESETS",
    "DeepSeekConfig",
    "CausalLMOutput",
    "DeepSeekDecoderLayer",
    "DeepSeekForCausalLM",
    "DeepSeekModel",
    "DeepSeekMTPModule",
]
