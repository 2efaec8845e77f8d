"""The MoE ops (DESIGN.md 3.3) against plain-PyTorch references (float64 where they accumulate)
and against transformers' DeepSeek routers, on every CPU ISA level and on CUDA when present."""

import pytest
import torch
from torch.library import opcheck

import r1x
from r1x import reference as ref
from r1x.testing import assert_raises_naming, calc_diff, fp8_grouped_gemm_error_bound, random_fp8, random_scales

FP8 = torch.float8_e4m3fn
OPS = torch.ops.r1x


def random_offs(m, groups, gen, empty_tail=0):
    """Cumulative end offsets of `groups` random groups over m rows (some groups empty), the
    last `empty_tail` rows belonging to no group."""
    cuts = torch.randint(0, m - empty_tail + 1, (groups - 1,), generator=gen).sort().values
    offs = torch.cat([cuts, torch.tensor([m - empty_tail])]).to(torch.int32)
    if groups >= 3:  # force an empty group in the middle
        offs[1] = offs[0]
    return offs


# ----------------------------------------------------------------------------------------------
# routing
# ----------------------------------------------------------------------------------------------
ROUTE_CONFIGS = [
    # (T, E, top_k, n_group, topk_group, score_func, with_bias, norm, scale)
    (33, 8, 2, 1, 1, "sigmoid", False, True, 1.0),
    (65, 64, 6, 8, 3, "sigmoid", True, True, 2.5),   # DeepSeek-V3-like (scaled down)
    (17, 256, 8, 8, 4, "sigmoid", True, True, 2.5),  # the V3 shape
    (40, 64, 6, 1, 1, "softmax", False, False, 1.0),  # V2-Lite
    (9, 16, 4, 4, 2, "softmax", True, True, 1.0),
    (5, 1, 1, 1, 1, "sigmoid", True, True, 1.0),      # E = 1
    (7, 6, 6, 1, 1, "sigmoid", False, True, 1.0),     # top_k = E
    (6, 12, 3, 12, 3, "sigmoid", True, False, 1.0),   # groups of one expert
    (0, 8, 2, 2, 1, "sigmoid", True, True, 1.0),      # T = 0
]


def choice_values(logits, bias, score_func):
    s = logits.float().sigmoid() if score_func == "sigmoid" else logits.float().softmax(-1)
    return s + (bias.float() if bias is not None else 0)


def assert_same_route(w, ids, w_ref, ids_ref, choice):
    """ids equal (a swap between experts whose choice values tie to ~1 ulp is allowed), weights
    of the same experts equal to fp32 rounding."""
    ids, ids_ref, w, w_ref, choice = ids.cpu(), ids_ref.cpu(), w.cpu(), w_ref.cpu(), choice.cpu()
    diff = (ids != ids_ref).any(dim=1)
    for t in diff.nonzero().flatten().tolist():
        got = choice[t, ids[t].long()].sort(descending=True).values
        exp = choice[t, ids_ref[t].long()].sort(descending=True).values
        assert torch.allclose(got, exp, rtol=1e-6, atol=1e-7), f"token {t}: {ids[t]} vs {ids_ref[t]}"
    same = ~diff
    torch.testing.assert_close(w[same], w_ref[same], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("cfg", ROUTE_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_route_matches_reference(device, gen, cfg):
    t, e, k, ng, tg, func, with_bias, norm, scale = cfg
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(t, e, generator=gen) * 2).to(dtype).to(device)
        bias = (torch.randn(e, generator=gen) * 0.1).to(device) if with_bias else None
        w, ids = r1x.moe_topk_route(logits, k, bias, ng, tg, func, norm, scale)
        assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (t, k)
        w_ref, ids_ref = ref.moe_topk_route(logits.cpu(), k, None if bias is None else bias.cpu(), ng, tg, func, norm, scale)
        assert_same_route(w, ids, w_ref, ids_ref, choice_values(logits.cpu(), None if bias is None else bias.cpu(), func))
        if t:
            assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "an expert chosen twice"
            if ng > 1:  # every chosen expert lies in one of at most topk_group groups
                groups = (ids.long() // (e // ng)).cpu()
                assert all(len(set(r.tolist())) <= tg for r in groups)


def _transformers_router(e, k, ng, tg, norm, scale, bias):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=e, n_routed_experts=e, num_experts_per_tok=k, n_group=ng,
                           topk_group=tg, norm_topk_prob=norm, routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))  # logits = the hidden states
        router.e_score_correction_bias.copy_(bias)
    return router


@pytest.mark.parametrize("ng,tg,with_bias,norm,scale", [(1, 1, False, True, 1.0), (1, 1, True, True, 2.5),
                                                        (8, 4, True, True, 2.5), (4, 2, False, False, 1.0)])
def test_route_agrees_with_transformers_deepseek_v3(gen, ng, tg, with_bias, norm, scale):
    e, k, t = 64, 6, 200
    bias = torch.randn(e, generator=gen) * 0.05 if with_bias else torch.zeros(e)
    router = _transformers_router(e, k, ng, tg, norm, scale, bias)
    logits = torch.randn(t, e, generator=gen) * 2
    with torch.no_grad():
        _, hf_w, hf_ids = router(logits)
    w, ids = r1x.moe_topk_route(logits, k, bias if with_bias else None, ng, tg, "sigmoid", norm, scale)
    # transformers returns the top-k unordered: compare per token sorted by expert id
    order_hf, order = hf_ids.argsort(dim=1), ids.long().argsort(dim=1)
    assert torch.equal(hf_ids.gather(1, order_hf), ids.long().gather(1, order))
    torch.testing.assert_close(w.gather(1, order), hf_w.gather(1, order_hf), rtol=2e-6, atol=1e-7)


def test_route_softmax_agrees_with_transformers_deepseek_v2(gen):
    pytest.importorskip("transformers")
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    e, k, t = 64, 6, 150
    cfg = DeepseekV2Config(hidden_size=e, n_routed_experts=e, num_experts_per_tok=k, topk_method="greedy",
                           routed_scaling_factor=1.5)
    router = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
        logits = torch.randn(t, e, generator=gen) * 2
        _, hf_w, hf_ids = router(logits)
    w, ids = r1x.moe_topk_route(logits, k, score_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.5)
    order_hf, order = hf_ids.argsort(dim=1), ids.long().argsort(dim=1)
    assert torch.equal(hf_ids.gather(1, order_hf), ids.long().gather(1, order))
    torch.testing.assert_close(w.gather(1, order), hf_w.gather(1, order_hf), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("func,norm", [("sigmoid", True), ("sigmoid", False), ("softmax", True), ("softmax", False)])
def test_route_gradient(device, gen, func, norm):
    t, e, k = 11, 16, 4
    logits = (torch.randn(t, e, generator=gen, dtype=torch.float64) * 2).float().to(device).requires_grad_()
    bias = (torch.randn(e, generator=gen) * 0.1).to(device)
    w, ids = r1x.moe_topk_route(logits, k, bias, 4, 2, func, norm, 1.7)
    g = torch.randn(t, k, generator=gen).to(device)
    (w * g).sum().backward()
    # the reference weights as a differentiable float64 function of the logits, same experts
    x = logits.detach().double().cpu().requires_grad_()
    s = x.sigmoid() if func == "sigmoid" else x.softmax(-1)
    ws = s.gather(1, ids.long().cpu())
    if norm:
        ws = ws / (ws.sum(-1, keepdim=True) + 1e-20)
    ((ws * 1.7) * g.double().cpu()).sum().backward()
    torch.testing.assert_close(logits.grad.cpu().double(), x.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# dispatch and combine
# ----------------------------------------------------------------------------------------------
def dispatch_samples(device, gen):
    out = []
    for t, e, k, h, dtype in [(13, 8, 2, 33, torch.float32), (64, 16, 6, 128, torch.bfloat16), (1, 4, 1, 8, torch.float16),
                              (5, 3, 3, 7, torch.float32), (0, 4, 2, 16, torch.bfloat16), (9, 64, 4, 256, FP8)]:
        x = torch.randn(t, h, generator=gen).to(dtype)
        # experts that receive nothing: ids drawn from the first half only
        ids = torch.stack([torch.randperm(max(e // 2, k), generator=gen)[:k] for _ in range(t)]) if t else torch.empty(0, k)
        out.append((x.to(device), ids.to(torch.int32).to(device), e))
    return out


def _eq(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == FP8 else torch.equal(a, b)


def test_dispatch_matches_reference(device, gen):
    for x, ids, e in dispatch_samples(device, gen):
        for idx in (ids, ids.long()):
            xs, offs, perm = r1x.moe_dispatch(x, idx, e)
            xs_r, offs_r, perm_r = ref.moe_dispatch(x.cpu(), idx.cpu(), e)
            assert offs.dtype == perm.dtype == torch.int32 and xs.dtype == x.dtype
            assert torch.equal(offs.cpu(), offs_r) and torch.equal(perm.cpu(), perm_r)
            assert _eq(xs.cpu(), xs_r)


def test_combine_matches_reference(device, gen):
    for x, ids, e in dispatch_samples(device, gen):
        if x.dtype == FP8:
            continue
        t, k = ids.shape
        _, _, perm = r1x.moe_dispatch(x, ids, e)
        y = torch.randn(t * k, 21, generator=gen).to(x.dtype).to(device)
        for wdt in (torch.float32, x.dtype):
            w = torch.rand(t, k, generator=gen).to(wdt).to(device)
            out = r1x.moe_combine(y, w, perm, t)
            expected = ref.moe_combine(y.cpu().double(), w.cpu(), perm.cpu(), t)
            assert out.dtype == x.dtype and out.shape == (t, 21)
            tol = 1e-6 if x.dtype == torch.float32 else 8e-3
            torch.testing.assert_close(out.cpu().double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combine_backward_matches_reference(device, gen, dtype):
    t, e, k, h = 37, 8, 3, 70
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).int().to(device)
    _, _, perm = r1x.moe_dispatch(torch.empty(t, 1, device=device), ids, e)
    y = torch.randn(t * k, h, generator=gen).to(dtype).to(device)
    w = torch.rand(t, k, generator=gen).to(device)
    g = torch.randn(t, h, generator=gen).to(dtype).to(device)
    grad_y, grad_w = OPS.moe_combine_backward(g, y, w, perm)
    assert grad_y.dtype == dtype and grad_w.dtype == w.dtype
    y64, w64 = y.cpu().double(), w.cpu().double()
    p = perm.cpu().long()
    exp_gy = g.cpu().double()[p // k] * w64.reshape(-1)[p].unsqueeze(1)
    exp_gw = torch.zeros(t * k, dtype=torch.float64)
    exp_gw[p] = (g.cpu().double()[p // k] * y64).sum(1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_y.cpu().double(), exp_gy, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_w.cpu().double(), exp_gw.view(t, k), rtol=1e-5, atol=1e-4 * h)


def test_dispatch_combine_gradients(device, gen):
    t, e, k, h = 10, 6, 3, 24
    x = torch.randn(t, h, generator=gen, dtype=torch.float64).float().to(device).requires_grad_()
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).int().to(device)
    w = torch.rand(t, k, generator=gen).to(device).requires_grad_()
    lin = torch.randn(h, h, generator=gen).to(device)
    xs, offs, perm = r1x.moe_dispatch(x, ids, e)
    out = r1x.moe_combine(torch.tanh(xs @ lin), w, perm, t)
    g = torch.randn(t, h, generator=gen).to(device)
    (out * g).sum().backward()
    # reference: the same function per (token, slot), no sorting at all
    x2, w2 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    ref_out = (torch.tanh(x2 @ lin.double().cpu()).unsqueeze(1) * w2.unsqueeze(2)).sum(1)
    (ref_out * g.double().cpu()).sum().backward()
    torch.testing.assert_close(out.detach().cpu().double(), ref_out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.cpu().double(), x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.cpu().double(), w2.grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# grouped GEMMs
# ----------------------------------------------------------------------------------------------
GG_SHAPES = [  # (M, N, K, E, rows past the last group)
    (1, 5, 7, 1, 0), (2, 33, 100, 3, 0), (37, 70, 130, 4, 3), (300, 200, 256, 5, 0), (3, 17, 31, 2, 1),
    (129, 64, 2048, 6, 0), (64, 1, 64, 2, 0), (0, 16, 32, 3, 0), (5, 0, 32, 2, 0), (6, 9, 0, 2, 2),
]


def gg_tolerance(dtype):
    return 1e-12 if dtype == torch.float32 else 1e-5  # calc_diff; bf16: one output rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_reference(device, cpu_isa, gen, dtype):
    for m, n, k, e, tail in GG_SHAPES:
        a = torch.randn(m, k, generator=gen).to(dtype).to(device)
        b = torch.randn(e, n, k, generator=gen).to(dtype).to(device)
        offs = random_offs(m, e, gen, tail).to(device)
        out = r1x.grouped_gemm(a, b, offs)
        assert out.shape == (m, n) and out.dtype == dtype
        expected = ref.grouped_gemm(a.cpu().double(), b.cpu().double(), offs.cpu())
        assert torch.isfinite(out).all()
        assert calc_diff(out.cpu(), expected) < gg_tolerance(dtype), (m, n, k, e)
        if tail:
            assert (out[m - tail:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_gradients(device, cpu_isa, gen, dtype):
    for m, n, k, e, tail in [(40, 24, 72, 4, 2), (130, 48, 96, 3, 0), (7, 16, 33, 5, 0), (1, 8, 16, 1, 0)]:
        a = torch.randn(m, k, generator=gen).to(dtype).to(device).requires_grad_()
        b = torch.randn(e, n, k, generator=gen).to(dtype).to(device).requires_grad_()
        offs = random_offs(m, e, gen, tail).to(device)
        g = torch.randn(m, n, generator=gen).to(dtype).to(device)
        r1x.grouped_gemm(a, b, offs).backward(g)
        a2, b2 = a.detach().double().cpu().requires_grad_(), b.detach().double().cpu().requires_grad_()
        ref.grouped_gemm(a2, b2, offs.cpu()).backward(g.double().cpu())
        assert calc_diff(a.grad.cpu(), a2.grad) < gg_tolerance(dtype)
        assert calc_diff(b.grad.cpu(), b2.grad) < gg_tolerance(dtype)
        # experts without rows get exactly zero gradient
        counts = torch.diff(offs.cpu(), prepend=torch.zeros(1, dtype=torch.int32))
        assert (b.grad[counts.to(device) == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_large_groups(device, cpu_isa, gen, dtype):
    """Groups of hundreds of tokens next to small and empty ones: on some CPU paths the large
    ones run on ATen's matmul (oneDNN), the rest on r1x's kernels, in one call."""
    offs = torch.tensor([600, 600, 607, 1150], dtype=torch.int32, device=device)
    a = torch.randn(1150, 96, generator=gen).to(dtype).to(device).requires_grad_()
    b = torch.randn(4, 40, 96, generator=gen).to(dtype).to(device).requires_grad_()
    g = torch.randn(1150, 40, generator=gen).to(dtype).to(device)
    out = r1x.grouped_gemm(a, b, offs)
    out.backward(g)
    a2, b2 = a.detach().double().cpu().requires_grad_(), b.detach().double().cpu().requires_grad_()
    expected = ref.grouped_gemm(a2, b2, offs.cpu())
    expected.backward(g.double().cpu())
    assert calc_diff(out.cpu(), expected) < gg_tolerance(dtype)
    assert calc_diff(a.grad.cpu(), a2.grad) < gg_tolerance(dtype)
    assert calc_diff(b.grad.cpu(), b2.grad) < gg_tolerance(dtype)
    assert (b.grad[1] == 0).all()


def test_grouped_gemm_noncontiguous(device, gen):
    a = torch.randn(64, 50, generator=gen).to(device).t()  # [50, 64], strided
    b = torch.randn(3, 64, 20, generator=gen).to(device).transpose(1, 2)  # [3, 20, 64]
    offs = torch.tensor([10, 10, 50], dtype=torch.int32, device=device)
    out = r1x.grouped_gemm(a, b, offs)
    assert calc_diff(out.cpu(), ref.grouped_gemm(a.cpu().double(), b.cpu().double(), offs.cpu())) < 1e-12


def fp8_grouped_samples(device, gen):
    out = []
    for m, n, k, e, tail in [(1, 33, 128, 1, 0), (37, 200, 256, 4, 2), (130, 129, 384, 3, 0), (16, 64, 128, 8, 0),
                             (5, 300, 1024, 2, 0), (0, 16, 128, 2, 0)]:
        a, b = random_fp8((m, k), generator=gen), random_fp8((e, n, k), generator=gen)
        sa = random_scales((m, k // 128), generator=gen)
        sb = random_scales((e, (n + 127) // 128, k // 128), generator=gen)
        out.append(tuple(t.to(device) for t in (a, sa, b, sb, random_offs(m, e, gen, tail))))
    return out


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_grouped_gemm_matches_reference(device, cpu_isa, gen, out_dtype):
    for a, sa, b, sb, offs in fp8_grouped_samples(device, gen):
        out = r1x.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype)
        assert out.shape == (a.shape[0], b.shape[1]) and out.dtype == out_dtype
        if out.numel() == 0:
            continue
        args = [t.cpu() for t in (a, sa, b, sb, offs)]
        expected = ref.fp8_grouped_gemm(*args, out_dtype=torch.float64)
        # per group, the bound of fp8_gemm on this device (r1x.testing.FP8_GEMM_EPS)
        bound = fp8_grouped_gemm_error_bound(*args, device, out_dtype)
        got = out.cpu().double()
        assert ((got - expected).abs() <= bound).all()
        assert (got[int(offs[-1]):] == 0).all()


def test_fp8_grouped_gemm_equals_fp8_gemm_per_group(device, gen):
    """Tolerance-free: each group's rows are bit-identical to fp8_gemm on that group (same
    kernels, same 128-wide K blocks, same summation order), on every device."""
    for a, sa, b, sb, offs in fp8_grouped_samples(device, gen)[1:5]:
        for out_dtype in (torch.float32, torch.bfloat16):
            out = r1x.fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype)
            s = 0
            for g, end in enumerate(offs.tolist()):
                if end > s:
                    single = r1x.fp8_gemm(a[s:end], sa[s:end], b[g], sb[g], out_dtype)
                    assert torch.equal(out[s:end], single), (tuple(a.shape), g, out_dtype)
                s = end


# ----------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------
def test_opcheck(device, gen):
    logits = torch.randn(7, 16, generator=gen).to(device)
    bias = (torch.randn(16, generator=gen) * 0.1).to(device)
    opcheck(OPS.moe_topk_route.default, (logits, 4, bias, 4, 2, "sigmoid", True, 2.0))
    opcheck(OPS.moe_topk_route.default, (logits, 3, None, 1, 1, "softmax", False, 1.0))
    w, ids = r1x.moe_topk_route(logits, 4, bias, 4, 2)
    x = torch.randn(7, 24, generator=gen).to(device)
    opcheck(OPS.moe_dispatch.default, (x, ids, 16))
    xs, offs, perm = r1x.moe_dispatch(x, ids, 16)
    opcheck(OPS.moe_combine.default, (xs, w, perm, 7))
    opcheck(OPS.moe_combine_backward.default, (torch.randn(7, 24, generator=gen).to(device), xs, w, perm))
    b = torch.randn(16, 10, 24, generator=gen).to(device)
    opcheck(OPS.grouped_gemm.default, (xs, b, offs))
    opcheck(OPS.grouped_gemm.default, (xs.bfloat16(), b.bfloat16(), offs))
    g = torch.randn(28, 10, generator=gen).to(device)
    opcheck(OPS.grouped_gemm_grad_a.default, (g, b, offs))
    opcheck(OPS.grouped_gemm_grad_b.default, (g, xs, offs, 16))
    a8, sa, b8, sb, o8 = fp8_grouped_samples(device, gen)[1]
    opcheck(OPS.fp8_grouped_gemm.default, (a8, sa, b8, sb, o8, torch.bfloat16),
            test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    before = [t.view(torch.uint8).clone() if t.dtype == FP8 else t.clone() for t in (a8, sa, b8, sb, o8)]
    out = r1x.fp8_grouped_gemm(a8, sa, b8, sb, o8)
    for t, bt in zip((a8, sa, b8, sb, o8), before):
        assert torch.equal(t.view(torch.uint8) if t.dtype == FP8 else t, bt)
    assert out.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in (a8, sa, b8, sb, o8)}


def test_torch_compile_fullgraph(device, gen):
    def layer(x, gate, w1, w2, bias):
        weights, ids = r1x.moe_topk_route(x @ gate.T, 2, bias, 2, 1)
        xs, offs, perm = r1x.moe_dispatch(x, ids, gate.shape[0])
        h = torch.nn.functional.silu(r1x.grouped_gemm(xs, w1, offs))
        return r1x.moe_combine(r1x.grouped_gemm(h, w2, offs), weights, perm, x.shape[0])

    e, hd, inter = 8, 32, 48
    gate = torch.randn(e, hd, generator=gen).to(device)
    w1 = (torch.randn(e, inter, hd, generator=gen) * 0.1).to(device)
    w2 = (torch.randn(e, hd, inter, generator=gen) * 0.1).to(device)
    bias = (torch.randn(e, generator=gen) * 0.1).to(device)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for t in (9, 4, 17):
        x = torch.randn(t, hd, generator=gen).to(device).requires_grad_()
        y = compiled(x, gate, w1, w2, bias)
        y_e = layer(x, gate, w1, w2, bias)
        torch.testing.assert_close(y, y_e, rtol=1e-5, atol=1e-5)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        (gx_e,) = torch.autograd.grad(y_e.square().sum(), x)
        torch.testing.assert_close(gx, gx_e, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
_raises = assert_raises_naming


def test_bad_input_route(device):
    logits = torch.randn(4, 8, device=device)
    route = r1x.moe_topk_route
    _raises(lambda: route(logits.int(), 2), "`logits`", "float32")
    _raises(lambda: route(logits[0], 2), "`logits`", "2-D")
    _raises(lambda: route(logits[:, :0], 1), "`logits`")
    _raises(lambda: route(logits, 0), "`top_k`")
    _raises(lambda: route(logits, 9), "`top_k`")
    _raises(lambda: route(logits, 5, n_group=4, topk_group=2), "`top_k`", "4")
    _raises(lambda: route(logits, 2, n_group=3), "`n_group`", "8")
    _raises(lambda: route(logits, 2, n_group=0), "`n_group`")
    _raises(lambda: route(logits, 2, n_group=2, topk_group=3), "`topk_group`")
    _raises(lambda: route(logits, 2, n_group=2, topk_group=0), "`topk_group`")
    _raises(lambda: route(logits, 2, score_func="relu"), "`score_func`", "relu")
    _raises(lambda: route(logits, 2, torch.zeros(7, device=device)), "`bias`", "[8]")
    _raises(lambda: route(logits, 2, torch.zeros(8, dtype=torch.int64, device=device)), "`bias`")
    _raises(lambda: route(logits, 2, torch.zeros(8, device="meta")), "`bias`")


def test_bad_input_dispatch_combine(device):
    x = torch.randn(4, 16, device=device)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]], dtype=torch.int32, device=device)
    d = r1x.moe_dispatch
    _raises(lambda: d(x.int(), ids, 4), "`x`")
    _raises(lambda: d(x[0], ids, 4), "`x`", "2-D")
    _raises(lambda: d(x, ids.float(), 4), "`ids`", "int32")
    _raises(lambda: d(x, ids[0], 4), "`ids`", "2-D")
    _raises(lambda: d(x, ids[:3], 4), "`ids`", "T")
    _raises(lambda: d(x, ids, 0), "`num_experts`")
    _raises(lambda: d(x, ids.to("meta"), 4), "`ids`")
    if device == "cpu":  # on CUDA the ids stay on the device (checking them would cost a host sync)
        _raises(lambda: d(x, ids, 3), "`ids`", "[0, num_experts = 3)")
        _raises(lambda: d(x, -ids, 4), "`ids`")
    xs, offs, perm = d(x, ids, 4)
    w = torch.rand(4, 2, device=device)
    c = r1x.moe_combine
    _raises(lambda: c(xs.int(), w, perm, 4), "`y_sorted`")
    _raises(lambda: c(xs, w.int(), perm, 4), "`weights`")
    _raises(lambda: c(xs, w, perm.long(), 4), "`perm`", "int32")
    _raises(lambda: c(xs[0], w, perm, 4), "`y_sorted`", "2-D")
    _raises(lambda: c(xs, w[0], perm, 4), "`weights`", "2-D")
    _raises(lambda: c(xs, w, perm, 3), "`weights`", "num_tokens")
    _raises(lambda: c(xs, w, perm, -1), "`num_tokens`")
    _raises(lambda: c(xs, w, perm[:7], 4), "`perm`", "[8]")
    _raises(lambda: c(xs[:7], w, perm, 4), "`y_sorted`", "8")
    _raises(lambda: c(xs, w.to("meta"), perm, 4), "`weights`")
    cb = OPS.moe_combine_backward
    _raises(lambda: cb(x[:3], xs, w, perm), "`grad_out`", "[4, 16]")
    _raises(lambda: cb(x.bfloat16(), xs, w, perm), "`grad_out`", "dtype")
    _raises(lambda: cb(x, xs, w, perm[:5]), "`perm`")
    if device == "cpu":
        _raises(lambda: c(xs, w, torch.zeros_like(perm), 4), "`perm`", "permutation")
        _raises(lambda: c(xs, w, perm + 1, 4), "`perm`")


def test_bad_input_grouped_gemm(device):
    a = torch.randn(10, 32, device=device)
    b = torch.randn(3, 8, 32, device=device)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32, device=device)
    g = r1x.grouped_gemm
    _raises(lambda: g(a.half(), b.half(), offs), "`a`", "float32 or bfloat16")
    _raises(lambda: g(a, b.bfloat16(), offs), "`b`", "dtype")
    _raises(lambda: g(a[0], b, offs), "`a`", "2-D")
    _raises(lambda: g(a, b[0], offs), "`b`", "3-D")
    _raises(lambda: g(a, b[:, :, :16], offs), "`b`", "K")
    _raises(lambda: g(a, b, offs.long()), "`offs`", "int32")
    _raises(lambda: g(a, b, offs[:2]), "`offs`", "[3]")
    _raises(lambda: g(a, b.to("meta"), offs), "`b`")
    _raises(lambda: g(a, b, offs.to("meta")), "`offs`")
    if device == "cpu":
        _raises(lambda: g(a, b, torch.tensor([3, 2, 10], dtype=torch.int32)), "`offs`", "nondecreasing")
        _raises(lambda: g(a, b, torch.tensor([3, 3, 11], dtype=torch.int32)), "`offs`", "[0, 10]")
        _raises(lambda: g(a, b, torch.tensor([-1, 3, 10], dtype=torch.int32)), "`offs`")


def test_bad_input_fp8_grouped_gemm(device):
    a = torch.randn(4, 256, device=device).to(FP8)
    sa = torch.ones(4, 2, device=device)
    b = torch.randn(2, 130, 256, device=device).to(FP8)
    sb = torch.ones(2, 2, 2, device=device)
    offs = torch.tensor([1, 4], dtype=torch.int32, device=device)
    g = r1x.fp8_grouped_gemm
    _raises(lambda: g(a.float(), sa, b, sb, offs), "`a`", "float8_e4m3fn")
    _raises(lambda: g(a, sa, b.float(), sb, offs), "`b`", "float8_e4m3fn")
    _raises(lambda: g(a, sa.double(), b, sb, offs), "`a_scale`", "float32")
    _raises(lambda: g(a, sa, b, sb.half(), offs), "`b_scale`", "float32")
    _raises(lambda: g(a, sa, b[0], sb, offs), "`b`", "3-D")
    _raises(lambda: g(a[None], sa, b, sb, offs), "`a`", "2-D")
    _raises(lambda: g(a[:, :128], sa[:, :1], b, sb, offs), "`b`", "K")
    _raises(lambda: g(a[:, :100], sa[:, :1], b[:, :, :100], sb[:, :, :1], offs), "multiple of 128")
    _raises(lambda: g(a, sa[:, :1], b, sb, offs), "`a_scale`", "[4, 2]")
    _raises(lambda: g(a, sa, b, sb[:, :1], offs), "`b_scale`", "[2, 2, 2]")
    _raises(lambda: g(a, sa, b, sb, offs[:1]), "`offs`", "[2]")
    _raises(lambda: g(a, sa, b, sb, offs, torch.float16), "`out_dtype`")
    _raises(lambda: g(a, sa, b, sb.to("meta"), offs), "`b_scale`")
    if device == "cpu":
        _raises(lambda: g(a, sa, b, sb, torch.tensor([3, 1], dtype=torch.int32)), "`offs`")


def test_bad_input_grouped_gemm_grads(device):
    g = torch.randn(10, 8, device=device)
    b = torch.randn(3, 8, 32, device=device)
    a = torch.randn(10, 32, device=device)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32, device=device)
    _raises(lambda: OPS.grouped_gemm_grad_a(g, b[:, :4], offs), "`b`", "N")
    _raises(lambda: OPS.grouped_gemm_grad_a(g, b.bfloat16(), offs), "`b`", "dtype")
    _raises(lambda: OPS.grouped_gemm_grad_b(g, a[:9], offs, 3), "`a`", "rows")
    _raises(lambda: OPS.grouped_gemm_grad_b(g, a, offs, 2), "`offs`", "[2]")
    _raises(lambda: OPS.grouped_gemm_grad_b(g, a, offs, -1), "`num_groups`")
