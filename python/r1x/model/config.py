"""DeepSeekConfig: the model's hyper-parameters, under transformers' ``DeepseekV3Config`` names.

A plain dataclass (no transformers import): defaults are DeepSeek-V3's (as transformers'
``DeepseekV3Config`` has them), :meth:`DeepSeekConfig.preset` gives named shapes, and
:meth:`DeepSeekConfig.from_dict` / :meth:`from_json_file` read a checkpoint's ``config.json``
(DeepSeek's own, with ``rope_theta`` + ``rope_scaling``, or transformers 5's, with
``rope_parameters``); keys this class does not know are kept in :attr:`extra` and written back
by :meth:`to_dict`. Every instance is validated on construction: a bad value raises a
``ValueError`` whose message names the field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DeepSeekConfig", "PRESETS"]

_DTYPES = ("float32", "bfloat16")  # the grouped GEMMs' dtypes (FP8 is an opt-in on top)


@dataclass
class DeepSeekConfig:
    """Hyper-parameters of :class:`r1x.model.DeepSeekForCausalLM` (defaults: DeepSeek-V3).

    Field names are transformers' ``DeepseekV3Config``'s (and DeepSeek's ``config.json``'s);
    r1x's own fields are the training knobs ``mtp_loss_weight`` (the MTP loss weight lambda),
    ``aux_loss_alpha`` (alpha of the sequence-wise balance loss; DeepSeek's name) and
    ``bias_update_speed`` (gamma of the aux-loss-free bias update).

    ``rope_scaling`` is DeepSeek's YaRN dict (``{"type": "yarn", "factor", ...}``) or None for
    plain RoPE; transformers 5's ``rope_parameters`` is accepted by :meth:`from_dict`.
    ``torch_dtype`` is the dtype a model built from this config gets by default.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA: always num_attention_heads (None means that)
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    torch_dtype: str = "bfloat16"
    # r1x's training knobs
    mtp_loss_weight: float = 0.3
    aux_loss_alpha: float = 0.0001
    bias_update_speed: float = 0.001
    # keys of a config.json this class does not know, kept for to_dict
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.torch_dtype = _dtype_name(self.torch_dtype)
        if self.rope_scaling is not None and isinstance(self.rope_scaling, dict):
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind == "default":
                self.rope_scaling = None
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first bad field."""

        def bad(name, expected):
            raise ValueError(f"DeepSeekConfig: `{name}` must be {expected}, got {getattr(self, name)!r}")

        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                bad(name, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")

        def number(name, lo=0.0, strict=False):
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                    or v < lo or (strict and v == lo)):
                bad(name, f"a finite number {'>' if strict else '>='} {lo:g}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                     "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok", "max_position_embeddings",
                     "moe_layer_freq"):
            pos_int(name)
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            pos_int(name, 0)
        if self.q_lora_rank is not None:
            pos_int("q_lora_rank")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"num_attention_heads ({self.num_attention_heads}): MLA shares its latent "
                "across all heads, there are no key/value head groups")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "even (RoPE rotates pairs)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"<= num_hidden_layers ({self.num_hidden_layers})")
        if self.n_routed_experts % self.n_group:
            bad("n_group", f"a divisor of n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            bad("topk_group", f"<= n_group ({self.n_group})")
        if self.num_experts_per_tok > self.n_routed_experts:
            bad("num_experts_per_tok", f"<= n_routed_experts ({self.n_routed_experts})")
        eligible = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > eligible:
            bad("num_experts_per_tok", f"<= the experts of the topk_group best groups ({self.topk_group} x "
                f"{self.n_routed_experts // self.n_group} = {eligible})")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad("scoring_func", '"sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2)')
        if self.topk_method not in ("noaux_tc", "greedy") and not (
                self.topk_method == "group_limited_greedy" and self.n_group == 1):
            bad("topk_method", '"noaux_tc" or "greedy" (r1x routes with group top-2 sums)')
        if self.hidden_act != "silu":
            bad("hidden_act", '"silu" (SwiGLU experts)')
        number("routed_scaling_factor", strict=True)
        number("initializer_range")
        number("rms_norm_eps")
        number("rope_theta", strict=True)
        number("attention_dropout")
        number("mtp_loss_weight")
        number("aux_loss_alpha")
        number("bias_update_speed")
        if self.attention_dropout != 0:
            bad("attention_dropout", "0 (r1x's attention has no dropout)")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict) or rs.get("rope_type", rs.get("type")) != "yarn":
                bad("rope_scaling", 'None or a YaRN dict {"type": "yarn", "factor", '
                    '"original_max_position_embeddings", ...}')
            orig = rs.get("original_max_position_embeddings")
            if not isinstance(orig, int) or isinstance(orig, bool) or orig < 1:
                bad("rope_scaling", "a YaRN dict with a positive integer 'original_max_position_embeddings'")
            f = rs.get("factor")
            if f is not None and (not isinstance(f, (int, float)) or isinstance(f, bool) or not f > 0):
                bad("rope_scaling", "a YaRN dict with a 'factor' > 0")
        for name in ("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool")
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size):
                bad(name, f"None or a token id in [0, vocab_size = {self.vocab_size})")
        eos = self.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size for i in ids):
            bad("eos_token_id", f"None, a token id or a list of token ids in [0, vocab_size = {self.vocab_size})")
        if self.torch_dtype not in _DTYPES:
            bad("torch_dtype", f"one of {_DTYPES}")
        if not isinstance(self.extra, dict):
            bad("extra", "a dict")

    # ------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def dtype(self):
        """``torch_dtype`` as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.torch_dtype)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` (MTP modules: ``num_hidden_layers + i``) has the
        MoE (else the dense SwiGLU MLP of width ``intermediate_size``)."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    # ------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "DeepSeekConfig":
        """A named shape: ``"tiny"`` (tests, the CPU demo), ``"small"`` (~100M parameters),
        ``"v2-lite"`` (DeepSeek-V2-Lite), ``"v3"`` (DeepSeek-V3 / R1); ``overrides`` replace fields."""
        if name not in PRESETS:
            raise ValueError(f"DeepSeekConfig.preset: `name` must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "DeepSeekConfig":
        """From a ``config.json``'s dict (DeepSeek's or transformers'); unknown keys go to
        :attr:`extra`. ``rope_parameters`` (transformers 5) is split into ``rope_theta`` and
        ``rope_scaling`` (and wins over them); ``num_mtp_layers`` and ``dtype`` are read as ``num_nextn_predict_layers``
        and ``torch_dtype``."""
        if not isinstance(d, dict):
            raise TypeError(f"DeepSeekConfig.from_dict: `d` must be a dict, got {type(d).__name__}")
        d = {**copy.deepcopy(d), **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        extra = dict(d.pop("extra", None) or {})
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict) and rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            d["rope_scaling"] = rp if rp.get("rope_type", rp.get("type", "default")) != "default" else None
        if "num_mtp_layers" in d:
            v = d.pop("num_mtp_layers")
            d.setdefault("num_nextn_predict_layers", v)
        if "dtype" in d:
            v = d.pop("dtype")
            d.setdefault("torch_dtype", v)
        if d.get("torch_dtype") is None:
            d.pop("torch_dtype", None)
        if d.get("num_key_value_heads") is None:
            d.pop("num_key_value_heads", None)
        known = {k: v for k, v in d.items() if k in names}
        extra.update({k: v for k, v in d.items() if k not in names})
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> "DeepSeekConfig":
        """From a ``config.json`` file (or a checkpoint directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields (DeepSeek's ``config.json`` layout: ``rope_theta`` + ``rope_scaling``)
        plus the kept :attr:`extra` keys; ``model_type`` defaults to ``"deepseek_v3"``."""
        d = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}
        d.update(copy.deepcopy(self.extra))
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = copy.deepcopy(getattr(self, f.name))
        return d

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes) -> "DeepSeekConfig":
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)


def _dtype_name(v) -> str:
    s = str(v)
    return s[len("torch."):] if s.startswith("torch.") else s


_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict] = {
    # every feature at toy size: q LoRA, 1 dense + 2 MoE layers, shared experts, group-limited
    # routing, one MTP module; float32 so CPU tests compare tightly
    # (vocabulary and special ids: r1x.model.tokenizer.ByteTokenizer's 256 bytes + 7 special tokens)
    "tiny": dict(
        vocab_size=264, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=512,
        num_nextn_predict_layers=1, pad_token_id=256, bos_token_id=257, eos_token_id=258, torch_dtype="float32",
    ),
    # ~100M parameters (embeddings and head included, one MTP module)
    "small": dict(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=8, n_shared_experts=1, n_routed_experts=16, routed_scaling_factor=2.5,
        kv_lora_rank=128, q_lora_rank=256, qk_rope_head_dim=32, v_head_dim=64, qk_nope_head_dim=64, n_group=4,
        topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=4096,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
    ),
    # deepseek-ai/DeepSeek-V2-Lite's config.json
    "v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
        routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=6, first_k_dense_replace=1,
        norm_topk_prob=False, scoring_func="softmax", topk_method="greedy", max_position_embeddings=163840,
        rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.001,
        bias_update_speed=0.0, torch_dtype="bfloat16",
    ),
    # deepseek-ai/DeepSeek-V3's config.json (R1 has the same shapes)
    "v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        max_position_embeddings=163840, rope_theta=10000.0, rope_scaling=_YARN_V3, num_nextn_predict_layers=1,
        bos_token_id=0, eos_token_id=1, aux_loss_alpha=0.0001, torch_dtype="bfloat16",
    ),
}
