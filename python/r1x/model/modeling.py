"""The DeepSeek-V3-style causal language model, on r1x's MLA and MoE layers.

    input_ids -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits
    DecoderLayer: x += MLA(input_layernorm(x)); x += MLP or MoE(post_attention_layernorm(x))

The first ``first_k_dense_replace`` layers have a dense SwiGLU MLP, the rest DeepSeekMoE.
Module names are transformers' ``DeepseekV3ForCausalLM``'s, so the main model's ``state_dict``
keys are the same (``model.embed_tokens``, ``model.layers.{i}``, ``model.norm``, ``lm_head``).

Multi-token prediction (DeepSeek-V3 paper, section 2.2): ``num_nextn_predict_layers`` modules in
``self.mtp``, applied sequentially. Module k (1-based) sees, at position t, the previous depth's
hidden state ``h^{k-1}_t`` and the embedding of token ``t + k``::

    h^k = DecoderLayer_k(eh_proj([enorm(embed(x_{t+k})); hnorm(h^{k-1}_t)]))
    logits^k = lm_head(shared_head.norm(h^k))      # predicts token t + 1 + k

with the embedding and output head shared with the main model. ``h^0`` is the main model's
final (normed) hidden state, as vLLM and SGLang feed DeepSeek's MTP weights. In DeepSeek-V3's
checkpoint module k is ``model.layers.{num_hidden_layers + k - 1}`` (the decoder layer's weights
plus ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, and copies of the shared
``embed_tokens`` and ``shared_head.head``); here it is ``mtp.{k - 1}`` with the same names
below, without the shared copies, so a loader maps one prefix to the other.

Batches are packed: ``[B, S]`` input is flattened to ``[T = B*S]`` with ``cu_seqlens``
internally; attention, the label shift, the MTP shift and the balance loss never cross a
sequence boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1x.model.config import DeepSeekConfig
from r1x.nn.fp8_linear import FP8Linear
from r1x.nn.mla import MLA
from r1x.nn.moe import MoE, MoEMLP
from r1x.nn.norm import RMSNorm

__all__ = ["CausalLMOutput", "DeepSeekDecoderLayer", "DeepSeekMTPModule", "DeepSeekModel", "DeepSeekForCausalLM"]

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What :meth:`DeepSeekForCausalLM.forward` returns.

    Attributes:
        logits: ``[B, S, vocab]`` or ``[T, vocab]`` (the input's layout), the model's dtype.
        loss: with labels: ``lm_loss + mtp_loss_weight * mtp_loss + aux_loss``, else None.
        lm_loss: next-token cross-entropy (mean over the targets that are not -100).
        mtp_loss: the MTP modules' cross-entropies, averaged over the depths (None without
            labels or MTP modules).
        aux_loss: the sum of the MoE layers' sequence-wise balance losses (training mode with
            ``aux_loss_alpha > 0``; else 0).
        mtp_logits: the MTP modules' logits, depth 1 first (computed with labels only).
        hidden_states: the main model's final normed hidden states, the input's layout.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    mtp_logits: tuple[torch.Tensor, ...] | None = None
    hidden_states: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------
class DeepSeekDecoderLayer(nn.Module):
    """Pre-norm block: MLA, then the dense SwiGLU MLP (``mlp.gate_proj/up_proj/down_proj``)
    or DeepSeekMoE, each added to the residual stream."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        c = config
        f = {"dtype": dtype, "device": device}
        self.layer_idx = layer_idx
        self.self_attn = MLA.from_config(c, layer_idx=layer_idx, **f)
        if c.is_moe_layer(layer_idx):
            self.mlp = MoE.from_config(c, **f)
        else:
            self.mlp = MoEMLP(c.hidden_size, c.intermediate_size, **f)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **f)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **f)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """``x [T, hidden]`` packed, ``positions [T]``, ``cu_seqlens [B + 1]`` int32."""
        x = x + self.self_attn(self.input_layernorm(x), positions, cu_seqlens)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, cu_seqlens) if self.is_moe else self.mlp(h))


class SharedHead(nn.Module):
    """The MTP module's output norm (``shared_head.norm``); the head itself is the main
    model's ``lm_head`` (DeepSeek's checkpoint also stores a copy as ``shared_head.head``)."""

    def __init__(self, hidden_size: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps, dtype=dtype, device=device)


class DeepSeekMTPModule(DeepSeekDecoderLayer):
    """One multi-token-prediction depth: a full decoder layer (its weights under the same
    names) plus ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head.norm``."""

    def __init__(self, config: DeepSeekConfig, layer_idx: int, dtype=None, device=None):
        super().__init__(config, layer_idx, dtype=dtype, device=device)
        f = {"dtype": dtype, "device": device}
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps, **f)
        self.hnorm = RMSNorm(h, config.rms_norm_eps, **f)
        self.eh_proj = nn.Linear(2 * h, h, bias=False, **f)
        self.shared_head = SharedHead(h, config.rms_norm_eps, **f)

    def forward(self, prev_hidden: torch.Tensor, next_embeds: torch.Tensor, positions: torch.Tensor,
                cu_seqlens: torch.Tensor) -> torch.Tensor:
        """``prev_hidden [T, hidden]`` (h^{k-1}), ``next_embeds [T, hidden]`` (the embedding of
        token t + k at row t) -> h^k ``[T, hidden]`` (before ``shared_head.norm``)."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(prev_hidden)), dim=-1))
        return super().forward(x, positions, cu_seqlens)


class DeepSeekModel(nn.Module):
    """Embedding, decoder layers, final norm (transformers' ``DeepseekV3Model`` names)."""

    def __init__(self, config: DeepSeekConfig, dtype=None, device=None):
        super().__init__()
        f = {"dtype": dtype, "device": device}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id, **f)
        self.layers = nn.ModuleList(DeepSeekDecoderLayer(config, i, **f) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **f)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Packed ``input_ids [T]`` -> the final normed hidden states ``[T, hidden]``."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, cu_seqlens)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# the causal LM
# ----------------------------------------------------------------------------------------------
def _segments(cu_seqlens: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens 0..T-1: ``(positions [T] in their sequence, ends [T] = the end offset
    of each token's sequence)``, int64."""
    cu = cu_seqlens.long()
    idx = torch.arange(t, device=cu.device)
    seg = torch.searchsorted(cu[1:], idx, right=True).clamp(max=max(cu.shape[0] - 2, 0))
    return idx - cu[seg], cu[seg + 1]


def _shift(x: torch.Tensor, ends: torch.Tensor, by: int, fill) -> torch.Tensor:
    """``x[t + by]`` where ``t + by`` is in t's sequence, else ``fill`` (packed ``x [T]``)."""
    t = x.shape[0]
    idx = torch.arange(t, device=x.device) + by
    src = x[idx.clamp(max=max(t - 1, 0))]
    return torch.where(idx < ends, src, torch.full_like(src, fill))


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100 (0 when there are none), in float32."""
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class DeepSeekForCausalLM(nn.Module):
    """DeepSeek-V3-style causal LM: :class:`DeepSeekModel`, ``lm_head`` and the MTP modules.

    Args:
        config: a :class:`DeepSeekConfig`.
        dtype: of the parameters (default: ``config.torch_dtype``; float32 or bfloat16; the
            routers stay float32).
        device: of the parameters (``"meta"`` builds without memory, e.g. to count parameters).
        fp8: build, then :meth:`to_fp8` (inference).
        mtp: build the ``num_nextn_predict_layers`` MTP modules (False: none, e.g. for a
            checkpoint without their weights).

    Labels follow transformers' convention: ``labels`` has ``input_ids``' layout and is
    usually ``input_ids`` itself (-100 where no loss is wanted); it is shifted inside, within
    each sequence: position t's logits are scored against ``labels[t + 1]``, and MTP depth k's
    against ``labels[t + 1 + k]``; a sequence's last ``1 + k`` positions have no target.
    """

    def __init__(self, config: DeepSeekConfig, dtype=None, device=None, fp8: bool = False, mtp: bool = True):
        super().__init__()
        if not isinstance(config, DeepSeekConfig):
            raise TypeError(f"DeepSeekForCausalLM: `config` must be a DeepSeekConfig, got {type(config).__name__}")
        dtype = config.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"DeepSeekForCausalLM: `dtype` must be torch.float32 or torch.bfloat16, got {dtype}")
        self.config = config
        f = {"dtype": dtype, "device": device}
        self.model = DeepSeekModel(config, **f)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **f)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n_mtp = config.num_nextn_predict_layers if mtp else 0
        self.mtp = nn.ModuleList(DeepSeekMTPModule(config, config.num_hidden_layers + i, **f) for i in range(n_mtp))
        self.init_weights()
        if fp8:
            self.to_fp8()

    # ------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def num_parameters(self, include_mtp: bool = True) -> int:
        """Parameter count (tied weights once; e4m3 weights count as one each)."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if not include_mtp and name.startswith("mtp."):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialisation: projections, embeddings, routers and experts
        ~ N(0, initializer_range^2); norms 1; the routers' balancing bias 0."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, FP8Linear)) and m.weight.dtype.is_floating_point and m.weight.itemsize > 1:
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, MoE):
                m.gate.weight.normal_(0.0, std)
                m.gate.e_score_correction_bias.zero_()
                if not m.experts.is_fp8:
                    m.experts.gate_up_proj.normal_(0.0, std)
                    m.experts.down_proj.normal_(0.0, std)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def to_fp8(self, freeze: bool = True) -> "DeepSeekForCausalLM":
        """FP8 GEMMs (DeepSeek-V3's recipe: 1x128 activation groups, 128x128 weight blocks).

        ``freeze=True`` (inference): the attention projections (all but ``kv_b_proj``, which
        the absorbed decode reads in high precision), the dense and shared MLPs and ``eh_proj``
        become frozen :class:`r1x.nn.FP8Linear` (e4m3 ``weight`` + ``weight_scale_inv``, the
        FP8 checkpoint's names) and the routed experts e4m3 (:meth:`r1x.nn.MoE.to_fp8`).
        ``freeze=False`` (training): the same Linears become FP8Linear around their master
        weights (trainable); the routed experts stay in the master dtype.
        Embeddings, norms, routers and ``lm_head`` are left as they are.
        """
        def swap(parent: nn.Module, name: str):
            lin = getattr(parent, name, None)
            if isinstance(lin, nn.Linear):
                new = FP8Linear.from_linear(lin)
                setattr(parent, name, new.freeze_fp8() if freeze else new)
            elif isinstance(lin, FP8Linear) and freeze:
                lin.freeze_fp8()

        for layer in list(self.model.layers) + list(self.mtp):
            for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
                swap(layer.self_attn, name)
            mlps = [layer.mlp] if isinstance(layer.mlp, MoEMLP) else [layer.mlp.shared_experts]
            for mlp in mlps:
                if mlp is not None:
                    for name in ("gate_proj", "up_proj", "down_proj"):
                        swap(mlp, name)
            if freeze and isinstance(layer.mlp, MoE):
                layer.mlp.experts.to_fp8()
            if isinstance(layer, DeepSeekMTPModule):
                swap(layer, "eh_proj")
        return self

    # ------------------------------------------------------------------------------------------
    # checkpoints (the HF DeepseekV3 layout; r1x.model.checkpoint does the file work)
    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, path, max_shard_size: int | str = "5GB", fp8: bool = False) -> None:
        """Write ``config.json`` and sharded safetensors with transformers' parameter names
        (routed experts one by one, as DeepSeek-V3 ships them). MTP module i is written as
        ``model.layers.{num_hidden_layers + i}``, with the shared ``embed_tokens`` and
        ``shared_head.head`` it reads, as in DeepSeek-V3's checkpoint. ``fp8=True`` stores the
        projection weights as e4m3 with 128x128-block ``weight_scale_inv`` (DeepSeek-V3's FP8
        checkpoint); a model already converted with :meth:`to_fp8` is written as it is."""
        from r1x.model import checkpoint

        state = self.state_dict()
        for i in range(len(self.mtp)):
            state[f"mtp.{i}.embed_tokens.weight"] = self.model.embed_tokens.weight
            state[f"mtp.{i}.shared_head.head.weight"] = self.lm_head.weight
        config = self.config.replace(num_nextn_predict_layers=len(self.mtp)).to_dict()
        state = checkpoint.merge_mtp_state_dict(state, {}, self.config.num_hidden_layers)
        checkpoint.save_state_dict(path, state, config, max_shard_bytes=max_shard_size, fp8=fp8)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, fp8: bool = False, mtp: bool = True) -> "DeepSeekForCausalLM":
        """Load a checkpoint in the HF DeepseekV3 layout (written by :meth:`save_pretrained`, by
        transformers, or DeepSeek's own, FP8 included: e4m3 weights are dequantized).

        The model runs in the checkpoint's dtype (``config.json``'s ``torch_dtype``) unless
        ``dtype`` says otherwise; ``fp8=True`` then converts it for FP8 inference
        (:meth:`to_fp8`). A config that announces MTP modules whose weights the checkpoint does
        not have (transformers writes such) loads with MTP off and a warning; ``mtp=False``
        leaves them out in any case.
        """
        import warnings

        from r1x.model import checkpoint

        loaded = checkpoint.load_state_dict(path, dtype=dtype)
        state, config_dict = loaded
        config = DeepSeekConfig.from_dict(config_dict)
        dtype = config.dtype if dtype is None else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        announced = config.num_nextn_predict_layers
        if mtp and 0 < loaded.num_mtp_layers < announced:
            raise ValueError(
                f"from_pretrained: {path} has weights for {loaded.num_mtp_layers} of the {announced} MTP "
                "modules its config announces (`num_nextn_predict_layers`)")
        if mtp and announced and loaded.num_mtp_layers == 0:
            warnings.warn(
                f"from_pretrained: the config announces {announced} MTP module(s) "
                "(`num_nextn_predict_layers`) but the checkpoint has no weights for them: loading "
                "with MTP off", stacklevel=2)
        use_mtp = mtp and loaded.num_mtp_layers > 0
        main, mtp_state = checkpoint.split_mtp_state_dict(state, config)
        if use_mtp:
            # the MTP modules share the main model's embedding and head
            main.update({k: v for k, v in mtp_state.items()
                         if not k.endswith((".embed_tokens.weight", ".shared_head.head.weight"))})
        model = cls(config, dtype=dtype, device=device, mtp=use_mtp)
        model.load_state_dict(main, strict=True)
        return model.to_fp8() if fp8 else model

    # ------------------------------------------------------------------------------------------
    def _pack(self, input_ids, cu_seqlens, labels, positions):
        """Validate and flatten to packed ``[T]`` tensors with int32 ``cu_seqlens``."""
        if (not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point
                or input_ids.dtype == torch.bool):
            raise ValueError(f"DeepSeekForCausalLM: `input_ids` must be an integer tensor, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        dev = input_ids.device
        if input_ids.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError("DeepSeekForCausalLM: `cu_seqlens` is for packed [T] `input_ids`; [B, S] input is "
                                 "B sequences of S tokens")
            b, s = input_ids.shape
            cu = torch.arange(b + 1, dtype=torch.int32, device=dev) * s
        elif input_ids.dim() == 1:
            t = input_ids.shape[0]
            if cu_seqlens is None:
                cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
            else:
                if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64)
                        or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2):
                    raise ValueError("DeepSeekForCausalLM: `cu_seqlens` must be a 1-D int32/int64 tensor of B + 1 "
                                     "cumulative sequence starts from 0 to T")
                if not torch.compiler.is_compiling():
                    c = cu_seqlens.tolist()
                    if c[0] != 0 or c[-1] != t or any(a > b for a, b in zip(c, c[1:])):
                        raise ValueError(f"DeepSeekForCausalLM: `cu_seqlens` must rise from 0 to T = {t}, got {c}")
                cu = cu_seqlens.to(device=dev, dtype=torch.int32)
        else:
            raise ValueError(f"DeepSeekForCausalLM: `input_ids` must be [B, S] or packed [T], got shape "
                             f"{list(input_ids.shape)}")
        for name, v in (("labels", labels), ("positions", positions)):
            if v is not None and (not isinstance(v, torch.Tensor) or v.shape != input_ids.shape):
                raise ValueError(f"DeepSeekForCausalLM: `{name}` must have input_ids' shape "
                                 f"{list(input_ids.shape)}, got {list(getattr(v, 'shape', []))}")
        ids = input_ids.reshape(-1)
        pos, ends = _segments(cu, ids.shape[0])
        if positions is not None:
            pos = positions.reshape(-1).to(device=dev, dtype=torch.int64)
        return ids, cu, pos, ends, (None if labels is None else labels.reshape(-1).to(device=dev, dtype=torch.int64))

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits (and losses) for ``input_ids [B, S]``, or packed ``[T]`` with ``cu_seqlens``
        (``[B + 1]`` sequence starts; default one sequence).

        Args:
            labels: ``input_ids``' layout, transformers' convention (see the class docstring):
                usually ``input_ids`` with -100 where no loss is wanted. With labels the MTP
                modules run too.
            positions: RoPE positions, ``input_ids``' layout (default: index in the sequence).
        """
        ids, cu, pos, ends, lab = self._pack(input_ids, cu_seqlens, labels, positions)
        hidden = self.model(ids, pos, cu)
        logits = self.lm_head(hidden)
        out_shape = input_ids.shape
        # packed [T] input: the [T, V] tensors themselves (no view: FSDP2 warns about a root
        # module returning one, as an in-place op on it would skip its backward hook)
        shaped = (lambda t: t) if input_ids.dim() == 1 else (lambda t: t.view(*out_shape, -1))
        out = CausalLMOutput(logits=shaped(logits), hidden_states=shaped(hidden))
        if lab is None:
            return out

        out.lm_loss = _cross_entropy(logits, _shift(lab, ends, 1, IGNORE_INDEX))
        loss = out.lm_loss
        if len(self.mtp):
            embed = self.model.embed_tokens
            h, losses, mtp_logits = hidden, [], []
            for k, module in enumerate(self.mtp, start=1):
                # token t + k's embedding at row t; rows whose t + k leaves the sequence get some
                # token (their outputs only reach later rows of the same sequence: no targets)
                h = module(h, embed(_shift(ids, ends, k, 0)), pos, cu)
                lk = self.lm_head(module.shared_head.norm(h))
                losses.append(_cross_entropy(lk, _shift(lab, ends, 1 + k, IGNORE_INDEX)))
                mtp_logits.append(shaped(lk))
            out.mtp_loss = torch.stack(losses).mean()
            out.mtp_logits = tuple(mtp_logits)
            loss = loss + self.config.mtp_loss_weight * out.mtp_loss
        aux = [m.aux_loss for m in self.moe_layers()] if self.training and self.config.aux_loss_alpha > 0 else []
        out.aux_loss = torch.stack([a.to(loss.device, torch.float32) for a in aux]).sum() if aux else loss.new_zeros(())
        out.loss = loss + out.aux_loss
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop_token_ids=None, speculative: bool = False, **kwargs):
        """The new tokens of each prompt: batched sampling over a paged latent KV cache with
        absorbed MLA decode, continuous batching, optional MTP speculative decoding (greedy).

        ``temperature == 0`` is greedy; ``stop_token_ids=None`` means ``config.eos_token_id``
        (a stop token that ends a sequence is included in its output). Keyword extras
        (``seed``, ``tokenizer``, ``stop_strings``, ``max_batch``, ``max_tokens``,
        ``block_size``, ``return_stats``): see :func:`r1x.model.generation.generate`. Runs
        under ``torch.no_grad()`` in eval mode (the mode is restored after)."""
        from r1x.model.generation import generate

        return generate(self, prompts, max_new_tokens, temperature, top_p, top_k, stop_token_ids, speculative,
                        **kwargs)
