"""DeepSeek-V3 Multi-head Latent Attention (MLA) on r1x's attention ops.

Each token is compressed to a ``kv_lora_rank``-wide latent ``c_kv`` (RMS-normalised) plus one
``qk_rope_head_dim``-wide RoPE key ``k_pe`` shared by all heads; ``kv_b_proj`` expands the
latent into per-head ``k_nope`` and ``v``. Queries come from an optional low-rank bottleneck
(``q_lora_rank``). Two ways to compute the same attention:

Training / prefill (:meth:`MLA.forward`): expand K and V, fused variable-length attention::

    k = [kv_b(c_kv)_nope | k_pe]  v = kv_b(c_kv)_v           # [T, H, 192], [T, H, 128]
    o = r1x.mla_attention(q, k, v, cu_seqlens, softmax_scale=scale)

Decode (:meth:`MLA.decode`): absorb ``kv_b_proj`` into both sides and attend over the paged
latent cache directly (the latents are never expanded)::

    q_abs = [q_nope @ W_UK | q_pe]                           # [B, Sq, H, 512 + 64]
    o_lat = r1x.mla_decode(q_abs, cache.kv[layer], table, lens, dv=512, softmax_scale=scale)
    o = o_lat @ W_UV^T                                       # [B, Sq, H, 128]

since ``q_nope . (W_UK c) = (W_UK^T q_nope) . c`` and ``sum_j p_j W_UV c_j = W_UV sum_j p_j c_j``.

Parameter names and shapes are those of transformers' ``DeepseekV3Attention`` (``q_a_proj``,
``q_a_layernorm``, ``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
``kv_b_proj``, ``o_proj``), and so are its conventions: RoPE on interleaved pairs
(``rope_interleave``), YaRN (``rope_scaling``) with the attention factor on cos/sin and the
``mscale_all_dim`` correction squared on the softmax scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from r1x.nn.cache import PagedLatentCache
from r1x.nn.norm import RMSNorm
from r1x.ops import mla as _ops

__all__ = ["MLA", "RotaryEmbedding", "apply_rotary", "yarn_mscale"]

# The attention ops the layer calls, looked up at call time: r1x.reference's functions have the
# same signatures and semantics (tests swap them in to compare).
mla_attention = _ops.mla_attention
mla_decode = _ops.mla_decode


def _positive_int(owner: str, name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{owner}: `{name}` must be a positive integer, got {v!r}")
    return v


# ----------------------------------------------------------------------------------------------
# rotary position embedding with YaRN
# ----------------------------------------------------------------------------------------------
def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate ``x [..., d]`` by the angles whose ``cos``/``sin`` ``[..., d/2]`` broadcast
    against ``x[..., :d/2]``; computed in float32 (or x's wider dtype), returned in x's dtype.

    With ``interleave`` (DeepSeek's checkpoints) the rotated pairs are ``(x0, x1), (x2, x3), ...``,
    otherwise ``(x_i, x_{i + d/2})``; either way the output holds the pairs' first components,
    then their second ones (transformers' layout; q and k get the same, so dot products agree
    with rotating in place).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    half = x.shape[-1] // 2
    x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleave else (xf[..., :half], xf[..., half:])
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding of width ``dim``, plain or YaRN-scaled.

    Args:
        dim: the rotated width (``qk_rope_head_dim``), even.
        base: ``rope_theta``.
        rope_scaling: None (or ``{"rope_type": "default"}``) for plain RoPE, or YaRN as
            transformers' ``rope_parameters`` / DeepSeek's ``rope_scaling`` write it:
            ``{"rope_type" (or "type"): "yarn", "factor", "original_max_position_embeddings",
            "beta_fast" (32), "beta_slow" (1), "mscale" (1), "mscale_all_dim" (0),
            "attention_factor" (derived), "truncate" (True)}``; a ``factor`` of None means
            ``max_position_embeddings / original_max_position_embeddings``.
        max_position_embeddings: only for that default factor.
        interleave: rotate interleaved pairs (see :func:`apply_rotary`).

    Attributes:
        inv_freq: ``[dim / 2]`` float32 (non-persistent buffer; stays float32 when the module
            is cast to another dtype).
        attention_factor: multiplies cos and sin (YaRN: ``mscale(f, mscale) / mscale(f,
            mscale_all_dim)``; 1 for plain RoPE and for DeepSeek-V3's equal mscales).
        softmax_mscale: multiplies the attention's softmax scale (YaRN with ``mscale_all_dim``:
            ``mscale(f, mscale_all_dim) ** 2``; else 1).
    """

    def __init__(self, dim: int, base: float = 10000.0, rope_scaling: dict | None = None,
                 max_position_embeddings: int = 4096, interleave: bool = True, device=None):
        super().__init__()
        _positive_int("RotaryEmbedding", "dim", dim)
        if dim % 2:
            raise ValueError(f"RotaryEmbedding: `dim` (qk_rope_head_dim) must be even, got {dim}")
        if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 0):
            raise ValueError(f"RotaryEmbedding: `base` (rope_theta) must be a finite number > 0, got {base!r}")
        self.dim = dim
        self.base = float(base)
        self.interleave = bool(interleave)
        self.rope_type = "default"
        self.attention_factor = 1.0
        self.softmax_mscale = 1.0
        exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim  # on the CPU, then moved
        pos_freqs = self.base ** exponents
        inv_freq = 1.0 / pos_freqs
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                raise ValueError(f"RotaryEmbedding: `rope_scaling` must be a dict or None, got {rope_scaling!r}")
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind == "yarn":
                inv_freq = self._yarn(rope_scaling, pos_freqs, max_position_embeddings)
            elif kind != "default":
                raise ValueError(f"RotaryEmbedding: `rope_scaling` type must be 'yarn' or 'default' (DeepSeek-V3's), "
                                 f"got {kind!r}")
        self._inv_freq32 = inv_freq  # the float32 master: .to(bfloat16) must not round it
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # a module-wide dtype cast: keep the frequencies exact
            self.inv_freq = self._inv_freq32.to(self.inv_freq.device)
        return self

    def _yarn(self, cfg: dict, pos_freqs: torch.Tensor, max_position_embeddings) -> torch.Tensor:
        def number(key, default, positive=True):
            v = cfg.get(key)
            v = default if v is None else v
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
                raise ValueError(f"RotaryEmbedding: `rope_scaling[{key!r}]` must be a finite number"
                                 f"{' > 0' if positive else ''}, got {v!r}")
            return float(v)

        orig = cfg.get("original_max_position_embeddings")
        if not isinstance(orig, int) or isinstance(orig, bool) or orig < 1:
            raise ValueError(f"RotaryEmbedding: YaRN needs `rope_scaling['original_max_position_embeddings']`, "
                             f"a positive integer, got {orig!r}")
        factor = cfg.get("factor")
        if factor is None:
            factor = max_position_embeddings / orig
        factor = number("factor", factor)
        beta_fast = number("beta_fast", cfg.get("beta_fast") or 32)
        beta_slow = number("beta_slow", cfg.get("beta_slow") or 1)
        mscale = number("mscale", 0.0, positive=False)
        mscale_all_dim = number("mscale_all_dim", 0.0, positive=False)
        if cfg.get("attention_factor") is not None:
            self.attention_factor = number("attention_factor", None)
        elif mscale and mscale_all_dim:
            self.attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            self.attention_factor = yarn_mscale(factor)
        if mscale_all_dim:
            self.softmax_mscale = yarn_mscale(factor, mscale_all_dim) ** 2
        self.rope_type = "yarn"
        self.factor = factor

        # frequencies rotating fewer than beta_slow times over the original context are
        # interpolated (divided by factor), those rotating more than beta_fast times kept, a
        # linear ramp between (YaRN, "NTK-by-parts")
        dim, base = self.dim, self.base

        def correction_dim(rotations):
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if cfg.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
        return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[*positions.shape, dim / 2]`` float32, times
        :attr:`attention_factor`, for integer ``positions``."""
        freqs = positions.to(self.inv_freq.device).float().unsqueeze(-1) * self.inv_freq
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:func:`apply_rotary` with this embedding's pair layout."""
        return apply_rotary(x, cos, sin, self.interleave)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, base={self.base}, interleave={self.interleave}, rope_type={self.rope_type}"
        if self.rope_type == "yarn":
            s += (f", factor={self.factor}, attention_factor={self.attention_factor:.6g}, "
                  f"softmax_mscale={self.softmax_mscale:.6g}")
        return s


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------
class MLA(nn.Module):
    """DeepSeek-V3 Multi-head Latent Attention.

    Args (transformers' ``DeepseekV3Config`` names; defaults: DeepSeek-V3's):
        hidden_size: model width.
        num_attention_heads: H.
        q_lora_rank: width of the query bottleneck (``q_a_proj`` -> RMSNorm -> ``q_b_proj``);
            None for a direct ``q_proj`` (DeepSeek-V2-Lite).
        kv_lora_rank: width of the KV latent ``c_kv``.
        qk_nope_head_dim, qk_rope_head_dim: per-head query/key widths without and with RoPE
            (the key's RoPE part is shared by all heads); the attention's Dqk is their sum.
        v_head_dim: per-head value width.
        rope_theta, rope_scaling, max_position_embeddings, rope_interleave: the rotary
            embedding (see :class:`RotaryEmbedding`; YaRN also scales the softmax).
        attention_bias: biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``.
        rms_norm_eps: of the two latent norms (transformers and DeepSeek's reference code use
            1e-6 there whatever the config's ``rms_norm_eps``).
        layer_idx: this layer's index in a :class:`PagedLatentCache` shared by the model.
        dtype, device: of the parameters (the computation's dtype: inputs are cast to it and
            outputs back to the input's dtype).

    Attributes:
        softmax_scale: ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``, times YaRN's
            ``mscale(factor, mscale_all_dim) ** 2``.
        rotary: the :class:`RotaryEmbedding` (no parameters).

    :meth:`forward` is the training / prefill path (packed variable-length sequences, through
    :func:`r1x.mla_attention`, differentiable); :meth:`decode` the inference path over a
    :class:`PagedLatentCache` (through :func:`r1x.mla_decode`). They compute the same outputs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        q_lora_rank: int | None = 1536,
        kv_lora_rank: int = 512,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        max_position_embeddings: int = 4096,
        rope_interleave: bool = True,
        attention_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        layer_idx: int = 0,
        dtype=None,
        device=None,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("num_attention_heads", num_attention_heads),
                        ("kv_lora_rank", kv_lora_rank), ("qk_nope_head_dim", qk_nope_head_dim),
                        ("qk_rope_head_dim", qk_rope_head_dim), ("v_head_dim", v_head_dim)):
            _positive_int("MLA", name, v)
        if q_lora_rank is not None:
            _positive_int("MLA", "q_lora_rank", q_lora_rank)
        if qk_rope_head_dim % 2:
            raise ValueError(f"MLA: `qk_rope_head_dim` must be even (RoPE rotates pairs), got {qk_rope_head_dim}")
        if not (isinstance(rope_theta, (int, float)) and math.isfinite(rope_theta) and rope_theta > 0):
            raise ValueError(f"MLA: `rope_theta` must be a finite number > 0, got {rope_theta!r}")
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or layer_idx < 0:
            raise ValueError(f"MLA: `layer_idx` must be an integer >= 0, got {layer_idx!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise ValueError(f"MLA: `dtype` must be a 16/32/64-bit floating dtype, got {dtype}")
        self.hidden_size = hidden_size
        self.num_heads = num_attention_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.layer_idx = layer_idx

        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope_theta, rope_scaling, max_position_embeddings,
                                      rope_interleave, device=device)
        self.softmax_scale = self.qk_head_dim ** -0.5 * self.rotary.softmax_mscale

        f = {"dtype": dtype, "device": device}
        h = num_attention_heads
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, h * self.qk_head_dim, bias=False, **f)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=attention_bias, **f)
            self.q_a_layernorm = RMSNorm(q_lora_rank, rms_norm_eps, **f)
            self.q_b_proj = nn.Linear(q_lora_rank, h * self.qk_head_dim, bias=False, **f)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=attention_bias, **f)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, rms_norm_eps, **f)
        self.kv_b_proj = nn.Linear(kv_lora_rank, h * (qk_nope_head_dim + v_head_dim), bias=False, **f)
        self.o_proj = nn.Linear(h * v_head_dim, hidden_size, bias=attention_bias, **f)

    @classmethod
    def from_config(cls, config, layer_idx: int = 0, dtype=None, device=None) -> "MLA":
        """The layer for a config with transformers' ``DeepseekV3Config`` field names
        (``rope_parameters`` as transformers 5 writes it, or ``rope_theta`` + ``rope_scaling``)."""
        rp = getattr(config, "rope_parameters", None)
        if isinstance(rp, dict) and rp:
            theta = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        else:
            theta = getattr(config, "rope_theta", 10000.0)
            scaling = getattr(config, "rope_scaling", None)
        return cls(
            config.hidden_size, config.num_attention_heads, q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
            qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim, rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=getattr(config, "max_position_embeddings", 4096),
            rope_interleave=getattr(config, "rope_interleave", True),
            attention_bias=getattr(config, "attention_bias", False), layer_idx=layer_idx, dtype=dtype, device=device,
        )

    @property
    def latent_dim(self) -> int:
        """Cache elements per token (and layer): ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.kv_b_proj.weight.dtype

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for every projection, 1 for the norms' weights."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    # ------------------------------------------------------------------------------------------
    def _project(self, x2: torch.Tensor, positions: torch.Tensor):
        """Tokens ``[N, hidden]`` at ``positions [N]`` -> ``q_nope [N, H, nope]``, rotated
        ``q_pe [N, H, rope]``, and the cache row ``[c_kv | k_pe]`` ``[N, kv_lora_rank + rope]``."""
        n = x2.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x2)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x2)))
        q_nope, q_pe = q.view(n, self.num_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x2).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        cos, sin = self.rotary(positions)
        q_pe = self.rotary.rotate(q_pe, cos.unsqueeze(1), sin.unsqueeze(1))
        latents = torch.cat((self.kv_a_layernorm(c_kv), self.rotary.rotate(k_pe, cos, sin)), dim=-1)
        return q_nope, q_pe, latents

    def _check_x(self, op: str, x: torch.Tensor, dims: tuple[int, ...], layout: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"MLA.{op}: `x` must be a tensor, got {type(x).__name__}")
        if x.dim() not in dims or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MLA.{op}: `x` must be {layout} with hidden_size = {self.hidden_size}, "
                             f"got shape {list(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"MLA.{op}: `x` must be a floating tensor, got {x.dtype}")

    @staticmethod
    def _check_positions(op: str, positions, shape, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"MLA.{op}: `positions` must be an integer tensor, got {type(positions).__name__}")
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
            raise ValueError(f"MLA.{op}: `positions` must be an integer tensor, got {positions.dtype}")
        if tuple(positions.shape) != tuple(shape):
            raise ValueError(f"MLA.{op}: `positions` must have shape {list(shape)} (one per token of `x`), "
                             f"got {list(positions.shape)}")
        if positions.device != x.device:
            raise ValueError(f"MLA.{op}: `positions` must be on the device of `x` ({x.device}), got {positions.device}")
        return positions

    def _check_cache(self, op: str, cache, seq_ids, batch: int, device) -> list[int]:
        if not isinstance(cache, PagedLatentCache):
            raise TypeError(f"MLA.{op}: `cache` must be a PagedLatentCache, got {type(cache).__name__}")
        if cache.dim != self.latent_dim:
            raise ValueError(f"MLA.{op}: `cache` must hold rows of kv_lora_rank + qk_rope_head_dim = "
                             f"{self.latent_dim} elements, got dim = {cache.dim}")
        if cache.dtype != self.dtype:
            raise ValueError(f"MLA.{op}: `cache` must have the layer's dtype {self.dtype}, got {cache.dtype}")
        if cache.device != device:
            raise ValueError(f"MLA.{op}: `cache` must be on the device of `x` ({device}), got {cache.device}")
        if self.layer_idx >= cache.num_layers:
            raise ValueError(f"MLA.{op}: the layer's `layer_idx` ({self.layer_idx}) must be < the `cache`'s "
                             f"num_layers ({cache.num_layers})")
        if seq_ids is None or isinstance(seq_ids, (int, str, bytes)):
            raise TypeError(f"MLA.{op}: `seq_ids` must be a list of the {batch} sequences' ids in `cache`, "
                            f"got {seq_ids!r}")
        ids = list(seq_ids)
        if len(ids) != batch:
            raise ValueError(f"MLA.{op}: `seq_ids` must name one sequence per sequence of `x` ({batch}), "
                             f"got {len(ids)}")
        for s in ids:
            if s not in cache:
                raise ValueError(f"MLA.{op}: `seq_ids` entry {s!r} is not a sequence of `cache` (cache.add it first)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"MLA.{op}: `seq_ids` must be distinct, got {ids}")
        return ids

    def _attention_out(self, o: torch.Tensor, shape, out_dtype) -> torch.Tensor:
        return self.o_proj(o.reshape(*shape, self.num_heads * self.v_head_dim)).to(out_dtype)

    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: PagedLatentCache | None = None,
                seq_ids=None) -> torch.Tensor:
        """Training / prefill: causal attention within each sequence, via :func:`r1x.mla_attention`.

        Args:
            x: packed ``[T, hidden]`` tokens of B sequences (delimited by ``cu_seqlens``), or
                ``[B, S, hidden]`` (each row one sequence).
            positions: RoPE positions (any integer dtype), ``[T]`` or ``[B, S]``; default: each
                token's index in its sequence.
            cu_seqlens: packed input only: ``[B + 1]`` int32 (or int64) cumulative sequence
                starts, 0 to T; default: one sequence.
            cache, seq_ids: prefill: also append each token's latent row (``[c_kv | k_pe]``) to
                layer ``layer_idx`` of ``cache``, sequence b as ``seq_ids[b]``. Those sequences
                must hold no tokens in this layer yet (the packed attention sees only ``x``):
                continue a cached sequence with :meth:`decode`.

        Returns:
            ``[T, hidden]`` or ``[B, S, hidden]`` in x's dtype. Differentiable.
        """
        op = "forward"
        self._check_x(op, x, (2, 3), "[T, hidden] (packed, with cu_seqlens) or [B, S, hidden]")
        dev = x.device
        if x.dim() == 3:
            b, s = x.shape[0], x.shape[1]
            if cu_seqlens is not None:
                raise ValueError("MLA.forward: `cu_seqlens` is for packed [T, hidden] input; a [B, S, hidden] `x` "
                                 "is B sequences of S tokens")
            cu = torch.arange(b + 1, dtype=torch.int32, device=dev) * s
            if positions is None:
                positions = torch.arange(s, device=dev).repeat(b)
            else:
                positions = self._check_positions(op, positions, (b, s), x).reshape(-1)
        else:
            t = x.shape[0]
            if cu_seqlens is None:
                cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
            else:
                if not isinstance(cu_seqlens, torch.Tensor):
                    raise TypeError(f"MLA.forward: `cu_seqlens` must be an int32 tensor, got "
                                    f"{type(cu_seqlens).__name__}")
                if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or not len(cu_seqlens):
                    raise ValueError(f"MLA.forward: `cu_seqlens` must be a 1-D int32 tensor of B + 1 cumulative "
                                     f"sequence starts, got {cu_seqlens.dtype} {list(cu_seqlens.shape)}")
                if cu_seqlens.device != dev:
                    raise ValueError(f"MLA.forward: `cu_seqlens` must be on the device of `x` ({dev}), got "
                                     f"{cu_seqlens.device}")
                cu = cu_seqlens.to(torch.int32)
            b = cu.shape[0] - 1
            if positions is None:
                idx = torch.arange(t, device=dev)
                bounds = cu.long()
                seg = torch.searchsorted(bounds[1:], idx, right=True).clamp(max=max(b - 1, 0))
                positions = idx - bounds[seg] if b > 0 else idx
            else:
                positions = self._check_positions(op, positions, (t,), x)

        if cache is None and seq_ids is not None:
            raise ValueError("MLA.forward: `seq_ids` is given without a `cache`")
        cu_host = None
        if cache is not None:
            ids = self._check_cache(op, cache, seq_ids, b, dev)
            for sid in ids:
                held = cache.length(sid, self.layer_idx)
                if held:
                    raise ValueError(f"MLA.forward: sequence {sid} of `seq_ids` already holds {held} token(s) in "
                                     f"layer {self.layer_idx} of `cache`; the packed forward attends only within "
                                     f"`x`: continue a cached sequence with MLA.decode")
            cu_host = cu.tolist()

        x2 = x.reshape(-1, self.hidden_size).to(self.dtype)
        q_nope, q_pe, latents = self._project(x2, positions)
        if cache is not None:
            cache.append(self.layer_idx, ids, latents, cu_seqlens=cu_host)
        n = x2.shape[0]
        c_kv, k_pe = latents.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c_kv).view(n, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).split(
            [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(n, self.num_heads, self.qk_rope_head_dim)), dim=-1)
        o = mla_attention(q, k, v.contiguous(), cu, causal=True, softmax_scale=self.softmax_scale)
        return self._attention_out(o, x.shape[:-1], x.dtype)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, cache: PagedLatentCache, seq_ids, positions: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Inference step over the paged latent cache, via :func:`r1x.mla_decode` (absorbed).

        Appends the Sq new tokens' latent rows to layer ``layer_idx`` of ``cache`` after each
        sequence's last token there (blocks are allocated as needed), then each new token
        attends to its sequence's cached tokens and the new ones up to itself (Sq > 1: MTP
        verification; roll rejected tokens back with :meth:`PagedLatentCache.truncate`).

        Args:
            x: ``[B, Sq, hidden]``, the next Sq tokens of each of the B sequences.
            cache: the :class:`PagedLatentCache` (dim ``latent_dim``, the layer's dtype and device).
            seq_ids: the B sequences' ids in ``cache`` (distinct).
            positions: RoPE positions ``[B, Sq]`` (any integer dtype); default: continuing each
                sequence (its length in this layer, + 0, 1, ...).

        Returns:
            ``[B, Sq, hidden]`` in x's dtype. No gradients (runs under ``torch.no_grad``).
        """
        op = "decode"
        self._check_x(op, x, (3,), "[B, Sq, hidden]")
        b, sq = x.shape[0], x.shape[1]
        if sq < 1:
            raise ValueError(f"MLA.decode: `x` must hold Sq >= 1 new tokens per sequence, got shape {list(x.shape)}")
        ids = self._check_cache(op, cache, seq_ids, b, x.device)
        starts = [cache.length(s, self.layer_idx) for s in ids]
        if positions is None:
            positions = (torch.tensor(starts, dtype=torch.int64).unsqueeze(1) + torch.arange(sq)).to(x.device)
        else:
            self._check_positions(op, positions, (b, sq), x)
        if b == 0:
            return x.new_zeros(x.shape)

        h, nope, rope, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        x2 = x.reshape(-1, self.hidden_size).to(self.dtype)
        q_nope, q_pe, latents = self._project(x2, positions.reshape(-1))
        cache.append(self.layer_idx, ids, latents.view(b, sq, r + rope))

        w = self.kv_b_proj.weight.view(h, nope + self.v_head_dim, r)
        w_uk, w_uv = w[:, :nope], w[:, nope:]  # [H, nope, r], [H, v, r]
        q_abs = torch.einsum("thd,hdr->thr", q_nope, w_uk)
        q_full = torch.cat((q_abs, q_pe), dim=-1).view(b, sq, h, r + rope)
        o_lat, _ = mla_decode(q_full, cache.kv[self.layer_idx], cache.block_table(ids),
                              cache.seqlens(ids, self.layer_idx), r, softmax_scale=self.softmax_scale, causal=True)
        o = torch.einsum("bshr,hvr->bshv", o_lat, w_uv)
        return self._attention_out(o, (b, sq), x.dtype)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, "
                f"kv_lora_rank={self.kv_lora_rank}, qk_nope_head_dim={self.qk_nope_head_dim}, "
                f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.v_head_dim}, "
                f"softmax_scale={self.softmax_scale:.6g}, layer_idx={self.layer_idx}")
