"""DeepSeekMoE: the DeepSeek-V3 mixture-of-experts layer on r1x's MoE ops.

One forward is a fixed sequence of ops, with no Python loop over experts or sequences::

    logits  = x.float() @ gate.weight.T                         # fp32 router
    weights, ids = r1x.moe_topk_route(logits, top_k, e_score_correction_bias, ...)
    xs, offs, perm = r1x.moe_dispatch(x, ids, E)                # rows grouped by expert
    gate, up = r1x.grouped_gemm(xs, experts.gate_up_proj, offs).chunk(2, -1)  # gate rows first
    ys = r1x.grouped_gemm(silu(gate) * up, experts.down_proj, offs)
    y  = r1x.moe_combine(ys, weights, perm, T) + shared_experts(x)

Parameter names and layouts are those of transformers' ``DeepseekV3MoE`` (``gate.weight``,
``gate.e_score_correction_bias``, ``experts.gate_up_proj`` / ``experts.down_proj`` as 3-D
tensors, ``shared_experts.{gate,up,down}_proj``), so a checkpoint's tensors load 1:1.

Load balancing follows the DeepSeek-V3 paper: the auxiliary-loss-free bias update (section
2.1.2: after each training forward, ``bias_e += speed * sign(mean load - load_e)``) and the
complementary sequence-wise balance loss (eq. 17-20), exposed as ``layer.aux_loss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from r1x.nn.fp8_linear import BLOCK, FP8Linear, _gemm_out_dtype, _pad
from r1x.ops.fp8 import FP8_DTYPE, fp8_gemm, quant_fp8_per_block, quant_fp8_per_token_group
from r1x.ops.moe import fp8_grouped_gemm, grouped_gemm, moe_combine, moe_dispatch, moe_topk_route

__all__ = ["MoE", "MoEGate", "MoEExperts", "MoEMLP"]

_EXPERT_DTYPES = (torch.float32, torch.bfloat16)
# Up to this many tokens the CPU shared experts run on r1x.grouped_gemm (one group), beyond it on
# torch's matmul (oneDNN is faster on large dense GEMMs; the two break even around T = 512).
_SHARED_GROUPED_MAX_T = 256


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; without autograd the product is taken in place (one pass and one
    [M, I] buffer less: ~30% off this step, which is ~5% of the experts' time at T = 4096 on the CPU)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return F.silu(gate) * up
    return F.silu(gate).mul_(up)


def _quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert 128x128 block quantization of ``w [E, N, K]``: ``(q [E, N, K] e4m3,
    scale [E, ceil(N/128), ceil(K/128)] float32)``."""
    e, n, k = w.shape
    if n % BLOCK == 0:  # the experts' blocks do not straddle: one call on [E*N, K]
        q, s = quant_fp8_per_block(w.reshape(e * n, k), BLOCK)
        return q.view(e, n, k), s.view(e, n // BLOCK, -1)
    qs = [quant_fp8_per_block(w[i], BLOCK) for i in range(e)]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


class MoEGate(nn.Module):
    """The router: ``weight [E, H]`` (kept in float32, as transformers does) and the
    aux-loss-free balancing bias ``e_score_correction_bias [E]`` (float32 buffer)."""

    def __init__(self, hidden_size: int, n_routed_experts: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_routed_experts, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(n_routed_experts, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` in float32."""
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        return F.linear(x if x.dtype == torch.float32 else x.float(), w)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class MoEExperts(nn.Module):
    """The routed experts as 3-D weights (transformers' ``DeepseekV3Experts`` layout):
    ``gate_up_proj [E, 2*I, H]`` (the I gate rows, then the I up rows) and
    ``down_proj [E, H, I]``; expert ``e`` maps ``x`` to
    ``down_proj[e] @ (silu(gate_e x) * up_e x)``.

    After :meth:`to_fp8` both are e4m3 buffers with 128x128 block scales
    ``gate_up_proj_scale_inv [E, ceil(2I/128), ceil(H/128)]`` and
    ``down_proj_scale_inv [E, ceil(H/128), ceil(I/128)]`` (DeepSeek-V3's FP8 checkpoint names;
    dequantized weight = weight * scale), used for inference only.
    """

    def __init__(self, n_routed_experts: int, hidden_size: int, moe_intermediate_size: int,
                 dtype=None, device=None):
        super().__init__()
        self.num_experts = n_routed_experts
        self.hidden_size = hidden_size
        self.intermediate_size = moe_intermediate_size
        factory = {"dtype": dtype, "device": device}
        self.gate_up_proj = nn.Parameter(torch.empty(n_routed_experts, 2 * moe_intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(n_routed_experts, hidden_size, moe_intermediate_size, **factory))
        self._padded = {}  # name -> (key, e4m3 weight with K padded to 128), eager inference
        self.grad_scale = 1.0  # multiplies the weights' gradients (r1x.parallel.parallelize sets 1/ep)

    @property
    def is_fp8(self) -> bool:
        return self.gate_up_proj.dtype == FP8_DTYPE

    def reset_parameters(self) -> None:
        # nn.Linear's distribution per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        nn.init.uniform_(self.gate_up_proj, -self.hidden_size**-0.5, self.hidden_size**-0.5)
        nn.init.uniform_(self.down_proj, -self.intermediate_size**-0.5, self.intermediate_size**-0.5)

    @torch.no_grad()
    def to_fp8(self) -> "MoEExperts":
        """Replace both weights by their e4m3 quantization (128x128 blocks per expert)."""
        if self.is_fp8:
            return self
        for name in ("gate_up_proj", "down_proj"):
            q, s = _quantize_experts(getattr(self, name).detach())
            delattr(self, name)
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale_inv", s)
        self._padded = {}
        return self

    def _fp8_weight(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The e4m3 weight with its K zero-padded to a multiple of 128, and its scales (whose
        shape ceil(K/128) already covers the padding: zeros change no block's amax)."""
        q, s = getattr(self, name), getattr(self, f"{name}_scale_inv")
        if q.shape[-1] % BLOCK == 0 or torch.compiler.is_compiling():
            return _pad(q, -1, BLOCK), s
        key = (q.data_ptr(), q._version, q.device)
        hit = self._padded.get(name)
        if hit is None or hit[0] != key:
            hit = self._padded[name] = (key, _pad(q, -1, BLOCK))
        return hit[1], s

    def forward(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """The expert MLPs on rows grouped by expert (``xs [M, H]``, ``offs [E]`` int32 end
        offsets from :func:`r1x.moe_dispatch`). Returns ``[M, H]`` in the weights' dtype
        (bfloat16 for FP8 experts)."""
        i = self.intermediate_size
        if self.is_fp8:
            q_gu, s_gu = self._fp8_weight("gate_up_proj")
            q_d, s_d = self._fp8_weight("down_proj")
            h = fp8_grouped_gemm(*quant_fp8_per_token_group(_pad(xs, -1, BLOCK), BLOCK), q_gu, s_gu, offs)
            a = _swiglu(h[:, :i], h[:, i:])
            return fp8_grouped_gemm(*quant_fp8_per_token_group(_pad(a, -1, BLOCK), BLOCK), q_d, s_d, offs)
        w_gu, w_d = self.gate_up_proj, self.down_proj
        if self.grad_scale != 1.0 and torch.is_grad_enabled():
            w_gu, w_d = _ScaleGrad.apply(w_gu, self.grad_scale), _ScaleGrad.apply(w_d, self.grad_scale)
        h = grouped_gemm(xs.to(w_gu.dtype), w_gu, offs)
        return grouped_gemm(_swiglu(h[:, :i], h[:, i:]), w_d, offs)

    def extra_repr(self) -> str:
        kind = "fp8 e4m3 (128x128 blocks)" if self.is_fp8 else str(self.gate_up_proj.dtype)
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, {kind}")


class MoEMLP(nn.Module):
    """The shared experts: one SwiGLU MLP ``down(silu(gate(x)) * up(x))`` of width
    ``n_shared_experts * moe_intermediate_size`` (transformers' ``DeepseekV3MLP``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype=None, device=None):
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    @property
    def is_fp8(self) -> bool:
        return isinstance(self.down_proj, FP8Linear)

    def to_fp8(self) -> "MoEMLP":
        """Frozen FP8Linear projections (``weight`` e4m3 + ``weight_scale_inv``)."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(self, name)
            if not isinstance(lin, FP8Linear):
                setattr(self, name, FP8Linear.from_linear(lin).freeze_fp8())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, H]``."""
        if self.is_fp8:
            if torch.is_grad_enabled() and x.requires_grad:
                return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))
            # inference: quantize x once for gate and up, no autograd wrapper
            out_dtype = _gemm_out_dtype(x.dtype)
            q_x, s_x = quant_fp8_per_token_group(_pad(x, -1, BLOCK), BLOCK)
            g = fp8_gemm(q_x, s_x, *self.gate_proj._quantized_weight(), out_dtype=out_dtype)
            a = _swiglu(g, fp8_gemm(q_x, s_x, *self.up_proj._quantized_weight(), out_dtype=out_dtype))
            q_a, s_a = quant_fp8_per_token_group(_pad(a, -1, BLOCK), BLOCK)
            return fp8_gemm(q_a, s_a, *self.down_proj._quantized_weight(), out_dtype=out_dtype).to(x.dtype)
        w_gate, w_up, w_down = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        x = x.to(w_down.dtype)
        if x.device.type == "cpu" and x.shape[0] <= _SHARED_GROUPED_MAX_T and w_down.dtype in _EXPERT_DTYPES:
            # decode sizes: r1x's grouped GEMM as one group streams the weights faster than torch's
            # CPU matmul (measured ~40 vs ~23 GB/s at T = 1 on a [2816, 2048] bf16 weight)
            offs = torch.full((1,), x.shape[0], dtype=torch.int32)
            a = _swiglu(grouped_gemm(x, w_gate.unsqueeze(0), offs), grouped_gemm(x, w_up.unsqueeze(0), offs))
            return grouped_gemm(a, w_down.unsqueeze(0), offs)
        return F.linear(_swiglu(F.linear(x, w_gate), F.linear(x, w_up)), w_down)


class MoE(nn.Module):
    """The DeepSeekMoE layer: shared experts plus ``num_experts_per_tok`` of
    ``n_routed_experts`` routed SwiGLU experts, with DeepSeek-V3 routing.

    Args:
        hidden_size: H.
        moe_intermediate_size: I, the width of one routed expert.
        n_routed_experts: E.
        num_experts_per_tok: top_k, experts per token.
        n_shared_experts: shared experts, fused into one MLP of width ``I * n_shared_experts``
            (none when 0).
        n_group, topk_group: group-limited routing: the E experts form ``n_group`` groups and
            each token picks its experts among the ``topk_group`` groups whose two best biased
            scores sum highest.
        score_func: ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"`` (DeepSeek-V2).
        norm_topk_prob: renormalise the chosen experts' weights to sum to 1.
        routed_scaling_factor: multiplies the routed experts' weights.
        bias_update_speed: gamma of the aux-loss-free balancing: in training mode each forward
            moves ``gate.e_score_correction_bias`` by ``gamma * sign(mean load - load_e)``
            using this forward's per-expert token counts; 0 disables it.
        seq_aux_loss_alpha: alpha of the complementary sequence-wise balance loss; when > 0,
            a training forward stores it in ``self.aux_loss`` (add it to your loss).
        fp8: keep the routed and shared experts' weights in e4m3 with 128x128 block scales
            (inference only; see :meth:`to_fp8`).
        dtype, device: of the expert weights (float32 or bfloat16; the router is float32).

    ``forward(x [..., H], cu_seqlens=None) -> [..., H]``. ``cu_seqlens`` (int32/int64
    ``[B+1]``, packed sequence boundaries of the flattened tokens) only matters to the
    sequence-wise loss: without it each row of a ``[B, S, H]`` input is a sequence, and any
    other input is one sequence.

    Load statistics: the non-persistent buffer ``expert_load`` counts the tokens routed to
    each expert over all forwards (training and eval) since :meth:`reset_load_stats`;
    :meth:`load_stats` summarises it.

    The bias update happens inside forward: a forward that is recomputed (activation
    checkpointing) updates it twice and may route differently the second time; use
    ``bias_update_speed=0`` there and update the bias yourself from :attr:`expert_load`.
    """

    def __init__(
        self,
        hidden_size: int,
        moe_intermediate_size: int,
        n_routed_experts: int,
        num_experts_per_tok: int,
        n_shared_experts: int = 1,
        n_group: int = 1,
        topk_group: int = 1,
        score_func: str = "sigmoid",
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        bias_update_speed: float = 0.001,
        seq_aux_loss_alpha: float = 0.0,
        fp8: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("moe_intermediate_size", moe_intermediate_size),
                        ("n_routed_experts", n_routed_experts), ("num_experts_per_tok", num_experts_per_tok)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MoE: `{name}` must be a positive integer, got {v!r}")
        e, k = n_routed_experts, num_experts_per_tok
        if not isinstance(n_shared_experts, int) or n_shared_experts < 0:
            raise ValueError(f"MoE: `n_shared_experts` must be an integer >= 0, got {n_shared_experts!r}")
        if not isinstance(n_group, int) or n_group < 1 or e % n_group:
            raise ValueError(f"MoE: `n_group` ({n_group!r}) must be a positive integer dividing "
                             f"`n_routed_experts` ({e})")
        if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"MoE: `topk_group` must be in [1, n_group = {n_group}], got {topk_group!r}")
        eligible = topk_group * (e // n_group)
        if k > eligible:
            raise ValueError(f"MoE: `num_experts_per_tok` ({k}) must be <= the experts of the `topk_group` "
                             f"best groups ({topk_group} x {e // n_group} = {eligible})" if n_group > 1 else
                             f"MoE: `num_experts_per_tok` ({k}) must be <= `n_routed_experts` ({e})")
        if score_func not in ("sigmoid", "softmax"):
            raise ValueError(f'MoE: `score_func` must be "sigmoid" or "softmax", got {score_func!r}')
        for name, v in (("routed_scaling_factor", routed_scaling_factor),
                        ("bias_update_speed", bias_update_speed), ("seq_aux_loss_alpha", seq_aux_loss_alpha)):
            if not math.isfinite(v) or v < 0 or (name == "routed_scaling_factor" and v == 0):
                raise ValueError(f"MoE: `{name}` must be a finite number "
                                 f"{'> 0' if name == 'routed_scaling_factor' else '>= 0'}, got {v!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _EXPERT_DTYPES:
            raise ValueError(f"MoE: `dtype` must be torch.float32 or torch.bfloat16 (the grouped GEMMs' "
                             f"dtypes), got {dtype}")

        self.hidden_size = hidden_size
        self.moe_intermediate_size = moe_intermediate_size
        self.n_routed_experts = e
        self.num_experts_per_tok = k
        self.n_shared_experts = n_shared_experts
        self.n_group = n_group
        self.topk_group = topk_group
        self.score_func = score_func
        self.norm_topk_prob = bool(norm_topk_prob)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.bias_update_speed = float(bias_update_speed)
        self.seq_aux_loss_alpha = float(seq_aux_loss_alpha)

        self.gate = MoEGate(hidden_size, e, device=device)
        self.experts = MoEExperts(e, hidden_size, moe_intermediate_size, dtype=dtype, device=device)
        self.shared_experts = (MoEMLP(hidden_size, moe_intermediate_size * n_shared_experts, dtype=dtype, device=device)
                               if n_shared_experts else None)
        self.register_buffer("expert_load", torch.zeros(e, dtype=torch.float32, device=device), persistent=False)
        # expert parallelism (r1x.parallel.expert_parallel): this rank holds experts
        # ep_rank * E / ep_size .. (ep_rank + 1) * E / ep_size - 1 of the group's ep_size ranks
        self.ep_group, self.ep_size, self.ep_rank = None, 1, 0
        # the group over which the per-expert load (expert_load, the bias update) is summed:
        # None = this process alone (or the EP group when expert-parallel); parallelize() sets
        # the whole world so that every data-parallel rank keeps the same bias
        self.load_group = None
        self.aux_loss = torch.zeros((), device=device)
        self.reset_parameters()
        if fp8:
            self.to_fp8()

    @classmethod
    def from_config(cls, config, dtype=None, device=None, **overrides) -> "MoE":
        """The layer for a config with transformers' ``DeepseekV3Config`` field names
        (``r1x.model.DeepSeekConfig``); ``overrides`` replace constructor arguments."""
        c = config
        kwargs = dict(n_shared_experts=c.n_shared_experts, n_group=c.n_group, topk_group=c.topk_group,
                      score_func=c.scoring_func, norm_topk_prob=c.norm_topk_prob,
                      routed_scaling_factor=c.routed_scaling_factor, bias_update_speed=c.bias_update_speed,
                      seq_aux_loss_alpha=c.aux_loss_alpha)
        return cls(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok,
                   **{**kwargs, **overrides}, dtype=dtype, device=device)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for every projection (router and experts), zero bias."""
        with torch.no_grad():
            bound = self.hidden_size**-0.5
            self.gate.weight.uniform_(-bound, bound)
            self.gate.e_score_correction_bias.zero_()
            if not self.experts.is_fp8:
                self.experts.reset_parameters()
            if self.shared_experts is not None and not self.shared_experts.is_fp8:
                for lin in (self.shared_experts.gate_proj, self.shared_experts.up_proj, self.shared_experts.down_proj):
                    lin.reset_parameters()

    @property
    def is_fp8(self) -> bool:
        """True when the routed experts hold e4m3 weights (inference only)."""
        return self.experts.is_fp8

    def to_fp8(self, shared_experts: bool = True) -> "MoE":
        """Quantize the routed experts (and, by default, the shared experts, as DeepSeek-V3's
        FP8 checkpoints do) to e4m3 with 128x128 block scales, in place; the bf16/fp32
        copies are freed. The router stays float32. Inference only: a forward that needs
        gradients through the experts raises."""
        self.experts.to_fp8()
        if shared_experts and self.shared_experts is not None:
            self.shared_experts.to_fp8()
        return self

    # ------------------------------------------------------------------------------------------
    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [T, E] fp32, weights [T, k] fp32, ids [T, k] int32)`` for tokens ``[T, H]``."""
        logits = self.gate(x2)
        weights, ids = moe_topk_route(logits, self.num_experts_per_tok, self.gate.e_score_correction_bias,
                                      self.n_group, self.topk_group, self.score_func, self.norm_topk_prob,
                                      self.routed_scaling_factor)
        return logits, weights, ids

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: `x` must be [..., hidden_size = {self.hidden_size}], got shape {list(x.shape)}")
        if self.is_fp8 and torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("MoE: the FP8 experts are inference-only (no backward through "
                               "fp8_grouped_gemm); run under torch.no_grad() / inference_mode(), or "
                               "train a layer built with fp8=False")
        x2 = x.reshape(-1, self.hidden_size)
        t = x2.shape[0]
        logits, weights, ids = self.route(x2)
        if not self.is_fp8:
            x2 = x2.to(self.experts.gate_up_proj.dtype)  # the grouped GEMMs take one dtype
        xs, offs, perm = moe_dispatch(x2, ids, self.n_routed_experts)
        counts = torch.diff(offs, prepend=offs.new_zeros(1))  # this rank's tokens per expert
        if self.ep_group is None:
            ys = self.experts(xs, offs)
        else:  # experts sharded over ranks: all-to-all there and back (r1x.parallel)
            from r1x.parallel import ep_experts

            ys = ep_experts(self, xs, counts)
        y = moe_combine(ys, weights, perm, t).to(x.dtype)
        if self.shared_experts is not None:
            y = y.add_(self.shared_experts(x2).to(x.dtype))  # y is combine's fresh output

        with torch.no_grad():  # per-expert token counts of this forward: no host sync
            group = self.load_group if self.load_group is not None else self.ep_group
            if group is not None:  # summed over the ranks that share the bias
                counts = counts.float()
                torch.distributed.all_reduce(counts, group=group)
            self.expert_load.add_(counts)
            if self.training and self.bias_update_speed > 0:
                c = counts.float()
                bias = self.gate.e_score_correction_bias
                bias.add_(torch.sign(c.mean() - c).to(bias.dtype), alpha=self.bias_update_speed)
        if self.training and self.seq_aux_loss_alpha > 0:
            self.aux_loss = self._seq_aux_loss(logits, ids, x, cu_seqlens)
        elif self.aux_loss.requires_grad or self.aux_loss.device != logits.device:
            self.aux_loss = logits.new_zeros(())
        return y.view(x.shape)

    def _seq_aux_loss(self, logits, ids, x, cu_seqlens) -> torch.Tensor:
        """DeepSeek-V3 eq. 17-20, all sequences at once:
        ``alpha * mean_s sum_i f_i P_i`` with ``f_i = E / (K T_s) * #{t in s: i in topk(t)}``
        and ``P_i = mean_{t in s} s'_{i,t}``, ``s'`` the unbiased scores normalised over experts."""
        t, e = logits.shape
        k = self.num_experts_per_tok
        dev = logits.device
        if cu_seqlens is not None:
            if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"MoE: `cu_seqlens` must be int32/int64 [B+1] sequence boundaries, got "
                                 f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}")
            cu = cu_seqlens.to(device=dev, dtype=torch.int64)
            n_seq = cu.shape[0] - 1
            lengths = cu.diff()
            seg = torch.searchsorted(cu[1:], torch.arange(t, device=dev), right=True)
        else:
            n_seq, s_len = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, t)
            lengths = torch.full((n_seq,), s_len, dtype=torch.int64, device=dev)
            seg = torch.div(torch.arange(t, device=dev), max(s_len, 1), rounding_mode="floor")
        # tokens outside [cu[0], cu[-1]) (none, for valid boundaries) land in no sequence
        seg = seg.clamp(0, max(n_seq - 1, 0))
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        s_norm = scores / scores.sum(dim=-1, keepdim=True)
        p = torch.zeros(n_seq, e, dtype=s_norm.dtype, device=dev).index_add_(0, seg, s_norm)
        hits = torch.zeros(n_seq * e, dtype=torch.float32, device=dev)
        flat = (seg.unsqueeze(1) * e + ids.long()).reshape(-1)
        hits.index_add_(0, flat, torch.ones(flat.shape[0], dtype=torch.float32, device=dev))
        len_f = lengths.float().clamp(min=1).unsqueeze(1)
        f = hits.view(n_seq, e) * (e / k) / len_f
        per_seq = (f * (p / len_f)).sum(dim=1)
        nonempty = (lengths > 0).float()
        return self.seq_aux_loss_alpha * (per_seq * nonempty).sum() / nonempty.sum().clamp(min=1)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_load_stats(self) -> None:
        """Zero :attr:`expert_load`."""
        self.expert_load.zero_()

    @torch.no_grad()
    def load_stats(self) -> dict:
        """Per-expert load since the last :meth:`reset_load_stats`: ``load`` (float32 [E] token
        counts, on the CPU), ``total`` (token-expert assignments), ``mean``, ``max``, ``min``
        and ``maxvio = (max - mean) / mean`` (DeepSeek's MaxVio; 0 when nothing was routed)."""
        load = self.expert_load.detach().float().cpu()
        total = float(load.sum())
        mean = total / load.numel()
        mx, mn = float(load.max()), float(load.min())
        return {"load": load, "total": total, "mean": mean, "max": mx, "min": mn,
                "maxvio": (mx - mean) / mean if mean > 0 else 0.0}

    def extra_repr(self) -> str:
        s = (f"hidden_size={self.hidden_size}, moe_intermediate_size={self.moe_intermediate_size}, "
             f"n_routed_experts={self.n_routed_experts}, num_experts_per_tok={self.num_experts_per_tok}, "
             f"n_shared_experts={self.n_shared_experts}, score_func={self.score_func}")
        if self.n_group > 1:
            s += f", n_group={self.n_group}, topk_group={self.topk_group}"
        s += (f", norm_topk_prob={self.norm_topk_prob}, routed_scaling_factor={self.routed_scaling_factor}, "
              f"bias_update_speed={self.bias_update_speed}, seq_aux_loss_alpha={self.seq_aux_loss_alpha}, "
              f"fp8={self.is_fp8}")
        if self.ep_group is not None:
            local = self.n_routed_experts // self.ep_size
            s += f", expert_parallel=rank {self.ep_rank} of {self.ep_size} (experts {self.ep_rank * local}..{(self.ep_rank + 1) * local - 1})"
        return s
