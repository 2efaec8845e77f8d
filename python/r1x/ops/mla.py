"""Multi-head Latent Attention ops (DESIGN.md 3.4): fused variable-length attention for training
and prefill, and absorbed decode over a paged latent KV cache.

Training / prefill (K and V decompressed from the latents, qk head dim != v head dim)::

    out = r1x.mla_attention(q, k, v, cu_seqlens)            # [T, H, 192], [T, H, 192], [T, H, 128]

Decode (``wkv_b`` absorbed into the query and the output projection; the cache holds one
``kv_lora_rank + qk_rope_head_dim`` row per token, shared by all heads)::

    out, lse = r1x.mla_decode(q_absorbed, kv_cache, block_table, cache_seqlens, dv=512)
"""

from __future__ import annotations

import math

import torch

from r1x.ops.fp8 import _FLOATS, _check_dtype, _check_same_device, _check_shape

__all__ = ["mla_attention", "mla_attention_forward", "mla_decode"]


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Packed variable-length attention (``flash_attn_varlen_func`` layout).

    Args:
        q, k: ``[T, H, Dqk]``; v: ``[T, H, Dv]`` (Dqk != Dv allowed; DeepSeek-V3: 192 and 128),
            float32/bfloat16/float16, one dtype.
        cu_seqlens: ``[B + 1]`` int32 cumulative sequence starts: rows
            ``cu_seqlens[b]:cu_seqlens[b+1]`` form sequence b (``cu_seqlens[0] = 0``,
            ``cu_seqlens[B] = T``; empty sequences allowed).
        causal: query i attends keys j <= i of its own sequence (top-left aligned).
        softmax_scale: defaults to ``Dqk ** -0.5``.

    Returns:
        ``[T, H, Dv]`` in q's dtype. Differentiable w.r.t. q, k and v; the backward is fused too
        (recomputes the probabilities from the saved log-sum-exp, no T x T matrix anywhere).
        :func:`mla_attention_forward` also returns the log-sum-exp.
    """
    return torch.ops.r1x.mla_attention.default(q, k, v, cu_seqlens, causal, _scale(softmax_scale))


def mla_attention_forward(q, k, v, cu_seqlens, causal=True, softmax_scale=None):
    """:func:`mla_attention` that also returns the softmax log-sum-exp: ``(out [T, H, Dv],
    lse [H, T] float32)``, natural log (flash-attn's varlen layout). Differentiable w.r.t. q, k
    and v through both outputs."""
    return torch.ops.r1x.mla_attention_forward.default(q, k, v, cu_seqlens, causal, _scale(softmax_scale))


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    dv: int,
    softmax_scale: float | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode over a paged latent cache (FlashMLA semantics).

    Args:
        q: ``[B, Sq, H, D]`` absorbed queries (DeepSeek-V3: D = kv_lora_rank + rope = 576).
        kv_cache: ``[num_blocks, block_size, D]`` in q's dtype; token j of sequence b is
            ``kv_cache[block_table[b, j // block_size], j % block_size]``. K is the whole row,
            V its first ``dv`` columns; all heads share it. Any ``block_size >= 1``.
        block_table: ``[B, max_blocks]`` int32. Only the blocks holding the first
            ``cache_seqlens[b]`` tokens are read (the rest may hold anything).
        cache_seqlens: ``[B]`` int32 tokens in each sequence's cache, the new ones included.
        dv: value width, ``1 <= dv <= D`` (DeepSeek-V3: 512).
        softmax_scale: defaults to ``D ** -0.5`` (pass ``qk_head_dim ** -0.5`` for DeepSeek).
        causal: the Sq queries are the last Sq positions of each sequence, query s attends
            tokens ``j <= L - Sq + s`` (bottom-right aligned: MTP verification).

    Returns:
        ``(out [B, Sq, H, dv]`` in q's dtype, ``lse [B, H, Sq]`` float32, natural log``)``; a
        query that sees no token (``cache_seqlens[b] = 0``) gets out = 0 and lse = -inf.
        Inference only (no backward; train with :func:`mla_attention`).
    """
    return torch.ops.r1x.mla_decode.default(
        q, kv_cache, block_table, cache_seqlens, dv, _scale(softmax_scale), causal
    )


def _scale(softmax_scale):
    return None if softmax_scale is None else float(softmax_scale)


# ----------------------------------------------------------------------------------------------
# fakes: the C++ checks (csrc/mla_checks.h) with the same messages
# ----------------------------------------------------------------------------------------------
def _check_dim(op, name, t, dim):
    torch._check(t.dim() == dim, lambda: f"{op}: `{name}` must be {dim}-D, got shape {list(t.shape)}")


def _check_like(op, name, t, ref, ref_name="q"):
    torch._check(t.dtype == ref.dtype,
                 lambda: f"{op}: `{name}` must have the dtype of `{ref_name}` ({ref.dtype}), got {t.dtype}")


def _check_scale(op, softmax_scale):
    torch._check(softmax_scale is None or math.isfinite(softmax_scale),
                 lambda: f"{op}: `softmax_scale` must be finite (or None for the default), got {softmax_scale}")


def _check_attention(op, q, k, v, cu_seqlens, softmax_scale):
    _check_dtype(op, "q", q, _FLOATS, "float32, bfloat16 or float16")
    _check_dim(op, "q", q, 3)
    _check_dim(op, "k", k, 3)
    _check_dim(op, "v", v, 3)
    _check_like(op, "k", k, q)
    _check_like(op, "v", v, q)
    _check_same_device(op, "q", q, k=k, v=v, cu_seqlens=cu_seqlens)
    t, h, dqk = q.shape
    torch._check(h >= 1 and dqk >= 1,
                 lambda: f"{op}: `q` must be [T, H, Dqk] with H >= 1 and Dqk >= 1, got shape {list(q.shape)}")
    _check_shape(op, "k", k, (t, h, dqk), "[T, H, Dqk], the shape of `q`")
    torch._check(v.shape[0] == t and v.shape[1] == h and v.shape[2] >= 1,
                 lambda: f"{op}: `v` must be [T, H, Dv] with the T and H of `q` ({t}, {h}) and Dv >= 1, "
                 f"got shape {list(v.shape)}")
    _check_dtype(op, "cu_seqlens", cu_seqlens, (torch.int32,), "int32")
    _check_dim(op, "cu_seqlens", cu_seqlens, 1)
    torch._check(cu_seqlens.shape[0] >= 1,
                 lambda: f"{op}: `cu_seqlens` must be [B + 1] (cumulative sequence starts, beginning with 0), "
                 "got an empty tensor")
    _check_scale(op, softmax_scale)
    return t, h, v.shape[2]


@torch.library.register_fake("r1x::mla_attention_forward")
def _(q, k, v, cu_seqlens, causal=True, softmax_scale=None):
    t, h, dv = _check_attention("mla_attention_forward", q, k, v, cu_seqlens, softmax_scale)
    return q.new_empty((t, h, dv)), q.new_empty((h, t), dtype=torch.float32)


@torch.library.register_fake("r1x::mla_attention_backward")
def _(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens, causal=True, softmax_scale=None):
    op = "mla_attention_backward"
    t, h, dv = _check_attention(op, q, k, v, cu_seqlens, softmax_scale)
    for name, x in (("grad_out", grad_out), ("out", out)):
        _check_like(op, name, x, q)
        _check_same_device(op, "q", q, **{name: x})
        _check_shape(op, name, x, (t, h, dv), "[T, H, Dv], the shape of the forward's output")
    _check_dtype(op, "lse", lse, (torch.float32,), "float32")
    _check_same_device(op, "q", q, lse=lse)
    _check_shape(op, "lse", lse, (h, t), "[H, T], as mla_attention_forward returns it")
    if grad_lse is not None:
        _check_dtype(op, "grad_lse", grad_lse, (torch.float32,), "float32")
        _check_same_device(op, "q", q, grad_lse=grad_lse)
        _check_shape(op, "grad_lse", grad_lse, (h, t), "[H, T], the shape of `lse`")
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@torch.library.register_fake("r1x::mla_decode")
def _(q, kv_cache, block_table, cache_seqlens, dv, softmax_scale=None, causal=True):
    op = "mla_decode"
    _check_dtype(op, "q", q, _FLOATS, "float32, bfloat16 or float16")
    _check_dim(op, "q", q, 4)
    _check_dim(op, "kv_cache", kv_cache, 3)
    _check_like(op, "kv_cache", kv_cache, q)
    _check_dtype(op, "block_table", block_table, (torch.int32,), "int32")
    _check_dim(op, "block_table", block_table, 2)
    _check_dtype(op, "cache_seqlens", cache_seqlens, (torch.int32,), "int32")
    _check_dim(op, "cache_seqlens", cache_seqlens, 1)
    _check_same_device(op, "q", q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens)
    b, sq, h, d = q.shape
    torch._check(sq >= 1 and h >= 1 and d >= 1,
                 lambda: f"{op}: `q` must be [B, Sq, H, D] with Sq, H, D >= 1, got shape {list(q.shape)}")
    torch._check(kv_cache.shape[2] == d and kv_cache.shape[1] >= 1,
                 lambda: f"{op}: `kv_cache` must be [num_blocks, block_size, D] with block_size >= 1 and the D "
                 f"of `q` ({d}), got shape {list(kv_cache.shape)}")
    torch._check(block_table.shape[0] == b,
                 lambda: f"{op}: `block_table` must be [B, max_blocks] with the B of `q` ({b}), "
                 f"got shape {list(block_table.shape)}")
    _check_shape(op, "cache_seqlens", cache_seqlens, (b,), "one length per sequence")
    torch._check(1 <= dv <= d, lambda: f"{op}: `dv` must be in [1, D = {d}], got {dv}")
    _check_scale(op, softmax_scale)
    return q.new_empty((b, sq, h, dv)), q.new_empty((b, h, sq), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = torch.ops.r1x.mla_attention_backward.default(
        grad_out.contiguous(), q, k, v, out, lse, grad_lse, cu_seqlens, ctx.causal, ctx.softmax_scale
    )
    return grad_q, grad_k, grad_v, None, None, None


torch.library.register_autograd(
    "r1x::mla_attention_forward", _attention_backward, setup_context=_attention_setup
)

# mla_decode has no autograd formula: torch's fallback for ops without one raises when a
# backward reaches it (and, unlike a Python autograd wrapper, costs nothing per call).
