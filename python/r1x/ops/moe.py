"""Mixture-of-Experts ops (DESIGN.md 3.3): DeepSeek-V3 routing, token dispatch/combine, and
grouped GEMMs over experts (bf16/fp32 and FP8 block-scaled).

A typical routed-expert forward::

    weights, ids = r1x.moe_topk_route(x @ gate.T, top_k=6, bias=e_score_correction_bias)
    xs, offs, perm = r1x.moe_dispatch(x, ids, num_experts)
    h = r1x.grouped_gemm(xs, w_up, offs)          # rows of expert e times w_up[e].T
    y = r1x.moe_combine(r1x.grouped_gemm(act(h), w_down, offs), weights, perm, x.shape[0])
"""

from __future__ import annotations

import torch

from r1x.ops.fp8 import BLOCK, FP8_DTYPE, _FLOATS, _ceil_div, _check_dtype, _check_same_device, _check_shape

__all__ = ["moe_topk_route", "moe_dispatch", "moe_combine", "grouped_gemm", "fp8_grouped_gemm"]


def moe_topk_route(
    logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    score_func: str = "sigmoid",
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 top-k routing (transformers' DeepseekV3 router semantics).

    Args:
        logits: ``[T, E]`` router logits (float32/bfloat16/float16).
        top_k: experts per token.
        bias: optional ``[E]`` ``e_score_correction_bias``: added to the scores for the
            *selection* only (aux-loss-free balancing); the weights use the unbiased scores.
        n_group, topk_group: group-limited routing: the E experts form ``n_group`` groups, each
            rated by the sum of its two best biased scores; only the ``topk_group`` best groups
            are eligible.
        score_func: ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"`` (DeepSeek-V2).
        norm_topk_prob: renormalise the chosen weights to sum to 1.
        routed_scaling_factor: multiplies the weights last.

    Returns:
        ``(weights [T, top_k] float32, ids [T, top_k] int32)``, experts in descending order of
        their biased score (ties: lower index first). Differentiable w.r.t. ``logits``.
    """
    return torch.ops.r1x.moe_topk_route.default(
        logits, top_k, bias, n_group, topk_group, score_func, norm_topk_prob, float(routed_scaling_factor)
    )


def moe_dispatch(
    x: torch.Tensor, ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the token rows by expert.

    Args:
        x: ``[T, H]`` tokens (float, or float8_e4m3fn for FP8 experts).
        ids: ``[T, k]`` expert of each (token, slot), int32 or int64, in ``[0, num_experts)``.
        num_experts: E.

    Returns:
        ``(x_sorted [T*k, H], offs [E] int32, perm [T*k] int32)``: rows grouped by expert in a
        stable (token, slot) order; ``offs`` the cumulative end offset of each expert's rows (the
        ``torch._grouped_mm`` layout); ``perm[r] = t * k + j``, the (token, slot) of sorted row r.
        Differentiable w.r.t. ``x``.

    Out-of-range ids raise on the CPU. On CUDA they are not checked (that would cost a host
    sync): their rows sort after every expert's and belong to no group, so the grouped GEMMs
    give them zeros.
    """
    return torch.ops.r1x.moe_dispatch.default(x, ids, num_experts)


def moe_combine(
    y_sorted: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Weighted sum of each token's expert outputs:
    ``out[t] = sum_j weights[t, j] * y_sorted[row of (t, j)]`` (fp32 accumulation, in slot order).

    ``y_sorted [T*k, H2]`` in :func:`moe_dispatch` order, ``weights [T, k]``, ``perm`` from
    :func:`moe_dispatch`. Returns ``[T, H2]`` in ``y_sorted``'s dtype. Differentiable w.r.t.
    ``y_sorted`` and ``weights``.
    """
    return torch.ops.r1x.moe_combine.default(y_sorted, weights, perm, num_tokens)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over experts: rows ``offs[e-1]:offs[e]`` of ``a [M, K]`` times ``b[e].T``.

    ``a`` and ``b [E, N, K]`` bfloat16 or float32 (fp32 accumulation), ``offs [E]`` int32
    nondecreasing end offsets; groups may be empty and need no alignment or padding. Rows past
    ``offs[-1]`` are zero. Returns ``[M, N]``. Differentiable w.r.t. ``a`` and ``b``.
    """
    return torch.ops.r1x.grouped_gemm.default(a, b, offs)


def fp8_grouped_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """:func:`r1x.fp8_gemm` per expert: e4m3 ``a [M, K]`` with ``a_scale [M, K/128]``, e4m3
    ``b [E, N, K]`` with ``b_scale [E, ceil(N/128), K/128]``, ``offs [E]`` int32 end offsets.
    Groups of any size (including 0); no 128-row padding. Returns ``[M, N]`` of ``out_dtype``
    (bfloat16 or float32); rows past ``offs[-1]`` are zero."""
    return torch.ops.r1x.fp8_grouped_gemm.default(a, a_scale, b, b_scale, offs, out_dtype)


# ----------------------------------------------------------------------------------------------
# fakes: the C++ checks (csrc/moe_checks.h) with the same messages
# ----------------------------------------------------------------------------------------------
def _check_dim(op, name, t, dim):
    torch._check(t.dim() == dim, lambda: f"{op}: `{name}` must be {dim}-D, got shape {list(t.shape)}")


def _check_offs(op, offs, groups, ref, ref_name):
    _check_dtype(op, "offs", offs, (torch.int32,), "int32")
    _check_same_device(op, ref_name, ref, offs=offs)
    _check_shape(op, "offs", offs, (groups,), "one cumulative end offset per group")


@torch.library.register_fake("r1x::moe_topk_route")
def _(logits, top_k, bias=None, n_group=1, topk_group=1, score_func="sigmoid", norm_topk_prob=True,
      routed_scaling_factor=1.0):
    op = "moe_topk_route"
    _check_dtype(op, "logits", logits, _FLOATS, "float32, bfloat16 or float16")
    _check_dim(op, "logits", logits, 2)
    e = logits.shape[1]
    torch._check(e >= 1, lambda: f"{op}: `logits` must have at least one expert column, got shape {list(logits.shape)}")
    torch._check(score_func in ("sigmoid", "softmax"),
                 lambda: f'{op}: `score_func` must be "sigmoid" or "softmax", got "{score_func}"')
    torch._check(n_group >= 1 and e % n_group == 0,
                 lambda: f"{op}: `n_group` ({n_group}) must be positive and divide the number of experts ({e})")
    torch._check(1 <= topk_group <= n_group,
                 lambda: f"{op}: `topk_group` must be in [1, n_group = {n_group}], got {topk_group}")
    eligible = topk_group * (e // n_group)
    torch._check(1 <= top_k <= eligible,
                 lambda: f"{op}: `top_k` must be in [1, {eligible}] (the experts of the `topk_group` best groups), got {top_k}")
    if bias is not None:
        _check_dtype(op, "bias", bias, _FLOATS, "float32, bfloat16 or float16")
        _check_same_device(op, "logits", logits, bias=bias)
        _check_shape(op, "bias", bias, (e,), "one correction per expert")
    t = logits.shape[0]
    return logits.new_empty((t, top_k), dtype=torch.float32), logits.new_empty((t, top_k), dtype=torch.int32)


@torch.library.register_fake("r1x::moe_dispatch")
def _(x, ids, num_experts):
    op = "moe_dispatch"
    _check_dtype(op, "x", x, _FLOATS + (FP8_DTYPE,), "float32, bfloat16, float16 or float8_e4m3fn")
    _check_dim(op, "x", x, 2)
    _check_dtype(op, "ids", ids, (torch.int32, torch.int64), "int32 or int64")
    _check_dim(op, "ids", ids, 2)
    _check_same_device(op, "x", x, ids=ids)
    torch._check(ids.shape[0] == x.shape[0],
                 lambda: f"{op}: `ids` must be [T, top_k] with the T of `x` ({x.shape[0]}), got shape {list(ids.shape)}")
    torch._check(num_experts >= 1, lambda: f"{op}: `num_experts` must be positive, got {num_experts}")
    rows = ids.shape[0] * ids.shape[1]
    return (x.new_empty((rows, x.shape[1])), ids.new_empty((num_experts,), dtype=torch.int32),
            ids.new_empty((rows,), dtype=torch.int32))


@torch.library.register_fake("r1x::moe_combine")
def _combine_fake(y_sorted, weights, perm, num_tokens):
    op = "moe_combine"
    _check_dtype(op, "y_sorted", y_sorted, _FLOATS, "float32, bfloat16 or float16")
    _check_dtype(op, "weights", weights, _FLOATS, "float32, bfloat16 or float16")
    _check_dtype(op, "perm", perm, (torch.int32,), "int32")
    _check_dim(op, "y_sorted", y_sorted, 2)
    _check_dim(op, "weights", weights, 2)
    _check_same_device(op, "y_sorted", y_sorted, weights=weights, perm=perm)
    torch._check(num_tokens >= 0, lambda: f"{op}: `num_tokens` must be >= 0, got {num_tokens}")
    torch._check(weights.shape[0] == num_tokens,
                 lambda: f"{op}: `weights` must be [num_tokens, top_k] with num_tokens = {num_tokens}, got shape {list(weights.shape)}")
    rows = num_tokens * weights.shape[1]
    _check_shape(op, "perm", perm, (rows,), "one entry per (token, slot)")
    torch._check(y_sorted.shape[0] == rows,
                 lambda: f"{op}: `y_sorted` must have num_tokens * top_k = {rows} rows, got shape {list(y_sorted.shape)}")
    return y_sorted.new_empty((num_tokens, y_sorted.shape[1]))


@torch.library.register_fake("r1x::moe_combine_backward")
def _(grad_out, y_sorted, weights, perm):
    op = "moe_combine_backward"
    _combine_fake(y_sorted, weights, perm, weights.shape[0] if weights.dim() == 2 else 0)
    torch._check(grad_out.dtype == y_sorted.dtype,
                 lambda: f"{op}: `grad_out` must have the dtype of `y_sorted` ({y_sorted.dtype}), got {grad_out.dtype}")
    _check_same_device(op, "y_sorted", y_sorted, grad_out=grad_out)
    _check_shape(op, "grad_out", grad_out, (weights.shape[0], y_sorted.shape[1]), "[num_tokens, H2]")
    return torch.empty_like(y_sorted, memory_format=torch.contiguous_format), torch.empty_like(
        weights, memory_format=torch.contiguous_format)


@torch.library.register_fake("r1x::grouped_gemm")
def _(a, b, offs):
    op = "grouped_gemm"
    _check_dtype(op, "a", a, (torch.float32, torch.bfloat16), "float32 or bfloat16")
    _check_dim(op, "a", a, 2)
    _check_dim(op, "b", b, 3)
    torch._check(b.dtype == a.dtype, lambda: f"{op}: `b` must have the dtype of `a` ({a.dtype}), got {b.dtype}")
    _check_same_device(op, "a", a, b=b)
    torch._check(b.shape[2] == a.shape[1],
                 lambda: f"{op}: `b` must be [E, N, K] with the K of `a` ({a.shape[1]}), got shape {list(b.shape)}")
    _check_offs(op, offs, b.shape[0], a, "a")
    return a.new_empty((a.shape[0], b.shape[1]))


def _check_grad(op, grad, name, t, offs, groups):
    _check_dtype(op, "grad", grad, (torch.float32, torch.bfloat16), "float32 or bfloat16")
    _check_dim(op, "grad", grad, 2)
    torch._check(t.dtype == grad.dtype,
                 lambda: f"{op}: `{name}` must have the dtype of `grad` ({grad.dtype}), got {t.dtype}")
    _check_same_device(op, "grad", grad, **{name: t})
    _check_offs(op, offs, groups, grad, "grad")


@torch.library.register_fake("r1x::grouped_gemm_grad_a")
def _(grad, b, offs):
    op = "grouped_gemm_grad_a"
    _check_dim(op, "b", b, 3)
    _check_grad(op, grad, "b", b, offs, b.shape[0])
    torch._check(b.shape[1] == grad.shape[1],
                 lambda: f"{op}: `b` must be [E, N, K] with the N of `grad` ({grad.shape[1]}), got shape {list(b.shape)}")
    return grad.new_empty((grad.shape[0], b.shape[2]))


@torch.library.register_fake("r1x::grouped_gemm_grad_b")
def _(grad, a, offs, num_groups):
    op = "grouped_gemm_grad_b"
    torch._check(num_groups >= 0, lambda: f"{op}: `num_groups` must be >= 0, got {num_groups}")
    _check_dim(op, "a", a, 2)
    _check_grad(op, grad, "a", a, offs, num_groups)
    torch._check(a.shape[0] == grad.shape[0],
                 lambda: f"{op}: `a` must have the rows of `grad` ({grad.shape[0]}), got shape {list(a.shape)}")
    return grad.new_empty((num_groups, grad.shape[1], a.shape[1]))


@torch.library.register_fake("r1x::fp8_grouped_gemm")
def _(a, a_scale, b, b_scale, offs, out_dtype=None):
    op = "fp8_grouped_gemm"
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    torch._check(out_dtype in (torch.bfloat16, torch.float32),
                 lambda: f"{op}: `out_dtype` must be torch.bfloat16 or torch.float32, got {out_dtype}")
    for name, t in (("a", a), ("b", b)):
        _check_dtype(op, name, t, (FP8_DTYPE,), "float8_e4m3fn")
    for name, t in (("a_scale", a_scale), ("b_scale", b_scale)):
        _check_dtype(op, name, t, (torch.float32,), "float32")
    _check_dim(op, "a", a, 2)
    _check_dim(op, "b", b, 3)
    _check_same_device(op, "a", a, a_scale=a_scale, b=b, b_scale=b_scale)
    k = a.shape[1]
    torch._check(b.shape[2] == k,
                 lambda: f"{op}: `b` must be [E, N, K] with the K of `a` ({k}), got shape {list(b.shape)}")
    torch._check(k % BLOCK == 0,
                 lambda: f"{op}: K (the last dimension of `a` and `b`) must be a multiple of 128, got {k}")
    _check_shape(op, "a_scale", a_scale, (a.shape[0], k // BLOCK), "[M, K/128]: one scale per 1x128 group")
    _check_shape(op, "b_scale", b_scale, (b.shape[0], _ceil_div(b.shape[1], BLOCK), k // BLOCK),
                 "[E, ceil(N/128), K/128]: one scale per 128x128 block of each expert")
    _check_offs(op, offs, b.shape[0], a, "a")
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------
def _route_setup(ctx, inputs, output):
    logits, _top_k, _bias, _ng, _tg, score_func, norm, scale = inputs
    _weights, ids = output
    ctx.save_for_backward(logits, ids)
    ctx.score_func, ctx.norm, ctx.scale = score_func, norm, scale


def _route_backward(ctx, grad_w, _grad_ids):
    logits, ids = ctx.saved_tensors
    x = logits.float()
    s = x.sigmoid() if ctx.score_func == "sigmoid" else x.softmax(dim=-1)
    idx = ids.long()
    g = grad_w.float() * ctx.scale
    if ctx.norm:
        sc = s.gather(1, idx)
        d = sc.sum(-1, keepdim=True) + 1e-20
        g = g / d - (g * sc).sum(-1, keepdim=True) / (d * d)
    ds = torch.zeros_like(s).scatter_add_(1, idx, g)
    if ctx.score_func == "sigmoid":
        dx = ds * s * (1 - s)
    else:
        dx = s * (ds - (ds * s).sum(-1, keepdim=True))
    return dx.to(logits.dtype), None, None, None, None, None, None, None


torch.library.register_autograd("r1x::moe_topk_route", _route_backward, setup_context=_route_setup)


def _dispatch_setup(ctx, inputs, output):
    x, ids, _e = inputs
    ctx.save_for_backward(output[2])
    ctx.num_tokens, ctx.k = x.shape[0], ids.shape[1]


def _dispatch_backward(ctx, grad_xs, _g_offs, _g_perm):
    (perm,) = ctx.saved_tensors
    ones = grad_xs.new_ones((ctx.num_tokens, ctx.k), dtype=torch.float32)
    return moe_combine(grad_xs.contiguous(), ones, perm, ctx.num_tokens), None, None


torch.library.register_autograd("r1x::moe_dispatch", _dispatch_backward, setup_context=_dispatch_setup)


def _combine_setup(ctx, inputs, output):
    y, weights, perm, _t = inputs
    ctx.save_for_backward(y, weights, perm)


def _combine_backward(ctx, grad_out):
    y, weights, perm = ctx.saved_tensors
    grad_y, grad_w = torch.ops.r1x.moe_combine_backward.default(grad_out.contiguous(), y, weights, perm)
    return grad_y, grad_w, None, None


torch.library.register_autograd("r1x::moe_combine", _combine_backward, setup_context=_combine_setup)


def _gg_setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _gg_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = torch.ops.r1x.grouped_gemm_grad_a.default(grad, b, offs)
    if ctx.needs_input_grad[1]:
        grad_b = torch.ops.r1x.grouped_gemm_grad_b.default(grad, a, offs, b.shape[0])
    return grad_a, grad_b, None


torch.library.register_autograd("r1x::grouped_gemm", _gg_backward, setup_context=_gg_setup)
