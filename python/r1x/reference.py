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


# ---------------------------------------------------------------------------------------------
# Mixture-of-Experts (DESIGN.md 3.3)
# ---------------------------------------------------------------------------------------------
def moe_topk_route(logits, top_k, bias=None, n_group=1, topk_group=1, score_func="sigmoid",
                   norm_topk_prob=True, routed_scaling_factor=1.0):
    """DeepSeek-V3 routing, as transformers' DeepseekV3 router (float32 throughout).

    Returns ``(weights [T, top_k] float32, ids [T, top_k] int32)``, the experts in descending
    order of their biased score (ties: the lower expert index first).
    """
    t, e = logits.shape
    x = logits.float()
    scores = x.sigmoid() if score_func == "sigmoid" else x.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)
        # stable: among equal group scores the lower group index wins
        order = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, order[:, :topk_group], True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)


def moe_dispatch(x, ids, num_experts):
    """Rows of ``x`` grouped by expert, stable in (token, slot) order.

    Returns ``(x_sorted [T*k, H], offs [E] int32 cumulative end offsets, perm [T*k] int32)``
    with ``x_sorted[r] = x[perm[r] // k]`` and ``ids.flatten()[perm[r]]`` the expert of row r.
    """
    flat = ids.reshape(-1).long()
    perm = torch.sort(flat, stable=True).indices
    k = ids.shape[1]
    counts = torch.bincount(flat, minlength=num_experts)
    x_sorted = x[torch.div(perm, k, rounding_mode="floor")] if k else x[:0]
    return x_sorted, counts.cumsum(0).to(torch.int32), perm.to(torch.int32)


def moe_combine(y_sorted, weights, perm, num_tokens):
    """``out[t] = sum_j weights[t, j] * y_sorted[row of (t, j)]``, in float64, cast to y's dtype."""
    k = weights.shape[1]
    out = torch.zeros(num_tokens, y_sorted.shape[1], dtype=torch.float64, device=y_sorted.device)
    p = perm.long()
    contrib = y_sorted.double() * weights.double().reshape(-1)[p].unsqueeze(1)
    out.index_add_(0, torch.div(p, k, rounding_mode="floor"), contrib)
    return out.to(y_sorted.dtype)


def _group_bounds(offs):
    ends = offs.long().tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_gemm(a, b, offs):
    """A plain loop over the groups: ``out[s:e] = a[s:e] @ b[g].T`` in float64; rows past the
    last offset are zero."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    for g, (s, e) in enumerate(_group_bounds(offs)):
        out[s:e] = a[s:e].double() @ b[g].double().T
    return out.to(a.dtype)


def fp8_grouped_gemm(a, a_scale, b, b_scale, offs, out_dtype=torch.bfloat16):
    """:func:`fp8_gemm` per group (float64), rows past the last offset zero."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    for g, (s, e) in enumerate(_group_bounds(offs)):
        out[s:e] = fp8_gemm(a[s:e], a_scale[s:e], b[g], b_scale[g], out_dtype=torch.float64)
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Multi-head Latent Attention (DESIGN.md 3.4)
# ---------------------------------------------------------------------------------------------
def _attend(q, k, v, scale, allowed):
    """One sequence: q [Sq, H, Dqk], k [L, H, Dqk], v [L, H, Dv], allowed [Sq, L] bool ->
    (out [Sq, H, Dv], lse [H, Sq]); a query with no allowed key gives out = 0, lse = -inf."""
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, Sq]
    p = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows with no key: exp(-inf + inf)
    return torch.einsum("hqk,khd->qhd", p, v), lse


def mla_attention(q, k, v, cu_seqlens, causal=True, softmax_scale=None, return_lse=False):
    """Packed variable-length attention, one sequence at a time: rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` of q, k and v form sequence b; with ``causal`` query i
    attends keys j <= i of its sequence. ``softmax_scale`` defaults to ``Dqk ** -0.5``. Computed
    in q's dtype (pass float64 for an oracle). With ``return_lse``, also the log-sum-exp
    ``[H, T]`` (natural log), as :func:`r1x.mla_attention_forward` returns it."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"))
    bounds = cu_seqlens.long().tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed.tril()
        out[s:e], lse[:, s:e] = _attend(q[s:e], k[s:e], v[s:e], scale, allowed)
    return (out, lse) if return_lse else out


def mla_decode(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale=None, causal=True):
    """Absorbed MLA decode over a paged latent cache (FlashMLA semantics), one sequence at a
    time: token j of sequence b is ``kv_cache[block_table[b, j // block_size], j % block_size]``
    (only the ``cache_seqlens[b]`` valid tokens are read); K is the whole D-wide row, V its first
    ``dv`` columns, shared by all heads. The Sq queries are the last Sq positions of the
    sequence: with ``causal`` query s attends tokens j <= L - Sq + s. ``softmax_scale`` defaults
    to ``D ** -0.5``. Returns ``(out [B, Sq, H, dv], lse [B, H, Sq])`` (natural log); a sequence
    or query with no visible token gives out = 0 and lse = -inf. Computed in q's dtype."""
    b, sq, h, d = q.shape
    bs = kv_cache.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(b, sq, h, dv)
    lse = torch.full((b, h, sq), float("-inf"), dtype=q.dtype, device=q.device)
    for i in range(b):
        n = int(cache_seqlens[i])
        if n == 0:
            continue
        j = torch.arange(n, device=q.device)
        rows = kv_cache[block_table[i].long()[j // bs], j % bs].to(q.dtype)  # [n, D]
        k = rows.unsqueeze(1).expand(n, h, d)
        allowed = torch.ones(sq, n, dtype=torch.bool, device=q.device)
        if causal:
            allowed = j.unsqueeze(0) <= (n - sq + torch.arange(sq, device=q.device)).unsqueeze(1)
        out[i], lse[i] = _attend(q[i], k, k[..., :dv], scale, allowed)
    return out, lse
