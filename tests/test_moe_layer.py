"""r1x.nn.MoE against a plain per-expert loop (DeepSeek-V3's inference code, in float64):
outputs, gradients, edge cases, load balancing (bias update, sequence-wise loss), FP8 experts,
torch.compile, transformers' DeepseekV3MoE checkpoint layout, bad arguments."""

import copy

import pytest
import torch
import torch.nn.functional as F

import r1x
from r1x.nn import MoE
from r1x.testing import calc_diff

# (hidden, inter, E, top_k, shared, n_group, topk_group, score_func, norm, scale, with_bias)
CONFIGS = {
    "sigmoid": (64, 48, 8, 2, 1, 1, 1, "sigmoid", True, 1.0, False),
    "v3": (96, 40, 16, 4, 1, 4, 2, "sigmoid", True, 2.5, True),  # DeepSeek-V3 routing, scaled down
    "softmax": (72, 32, 12, 3, 2, 1, 1, "softmax", False, 1.0, False),  # DeepSeek-V2-Lite style
}

# e4m3 on both operands of two stacked GEMMs, routed and shared experts: measured calc_diff
# against the bf16 layer is 1.5e-3 - 2.4e-3 on these shapes over 36 seeds (one FP8 GEMM alone:
# ~7e-4; the shared experts dominate: with only the routed experts in FP8 it is ~4e-4, their
# errors average over the top-k); a scale applied to the wrong expert gives ~0.8.
FP8_LAYER_DIFF = 4e-3


def make_layer(cfg, dtype, device, gen, **kw):
    h, i, e, k, sh, ng, tg, func, norm, scale, with_bias = cfg
    layer = MoE(h, i, e, k, n_shared_experts=sh, n_group=ng, topk_group=tg, score_func=func,
                norm_topk_prob=norm, routed_scaling_factor=scale, dtype=dtype, device=device, **kw)
    with torch.no_grad():  # fresh random parameters from the test's generator
        for name, p in layer.named_parameters():
            fan_in = p.shape[-1]
            p.copy_((torch.randn(p.shape, generator=gen) * fan_in**-0.5).to(device, p.dtype))
        if with_bias:
            layer.gate.e_score_correction_bias.copy_(torch.randn(e, generator=gen) * 0.05)
    return layer


def params64(layer):
    """float64 leaf copies of every parameter and buffer (what the reference computes with)."""
    p = {n: t.detach().double().requires_grad_() for n, t in layer.named_parameters()}
    p["gate.e_score_correction_bias"] = layer.gate.e_score_correction_bias.detach().double()
    return p


def reference_route_ids(logits32, bias, layer):
    """DeepSeek-V3's selection (transformers' router) in float32, written out independently."""
    e, k = layer.n_routed_experts, layer.num_experts_per_tok
    scores = logits32.sigmoid() if layer.score_func == "sigmoid" else logits32.softmax(-1)
    choice = scores + bias.float()
    if layer.n_group > 1:
        g = choice.view(-1, layer.n_group, e // layer.n_group)
        group_scores = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(layer.topk_group, dim=-1).indices, 1)
        choice = choice.masked_fill(keep.repeat_interleave(e // layer.n_group, dim=1) == 0, float("-inf"))
    return choice.topk(k, dim=-1).indices, choice


def check_layer_ids(layer, x2):
    """The layer's expert choice equals the independent router's (as sets per token; a swap
    between experts whose choice values tie to fp32 rounding is allowed). Returns the layer's."""
    _, _, ids = layer.route(x2)
    ids_ref, choice = reference_route_ids(layer.gate(x2).cpu(), layer.gate.e_score_correction_bias.cpu(), layer)
    a, b = ids.long().cpu().sort(1).values, ids_ref.sort(1).values
    for t in (a != b).any(1).nonzero().flatten().tolist():
        got = choice[t, a[t]].sort().values
        exp = choice[t, b[t]].sort().values
        assert torch.allclose(got, exp, rtol=1e-6, atol=1e-7), f"token {t}: {a[t]} vs {b[t]}"
    return ids


def assert_close(got, exp, rtol=1e-4, msg=None):
    """fp32 against float64: relative, with an absolute floor at 1e-5 of the largest value
    (a gradient that is exactly 0 in theory comes out at fp32 rounding level)."""
    atol = 1e-5 * max(exp.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), exp, rtol=rtol, atol=atol, msg=msg)


def reference_moe(layer, p, x, ids):
    """The DeepSeek-V3 inference loop in float64 from the parameters ``p`` (params64), with
    the expert choice ``ids`` given (the selection is not differentiable)."""
    cfg_h, i = layer.hidden_size, layer.moe_intermediate_size
    x64 = x.reshape(-1, cfg_h).double()
    ids = ids.long().to(x64.device)
    logits = x64 @ p["gate.weight"].T
    scores = logits.sigmoid() if layer.score_func == "sigmoid" else logits.softmax(-1)
    weights = scores.gather(1, ids)
    if layer.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * layer.routed_scaling_factor
    y = torch.zeros_like(x64)
    for e in range(layer.n_routed_experts):
        idx, top = torch.where(ids == e)
        if idx.numel() == 0:
            continue
        h = x64[idx] @ p["experts.gate_up_proj"][e].T
        out = (F.silu(h[:, :i]) * h[:, i:]) @ p["experts.down_proj"][e].T
        y = y.index_add(0, idx, out * weights[idx, top, None])
    if layer.shared_experts is not None:
        g = x64 @ p["shared_experts.gate_proj.weight"].T
        u = x64 @ p["shared_experts.up_proj.weight"].T
        y = y + (F.silu(g) * u) @ p["shared_experts.down_proj.weight"].T
    return y.view(x.shape)


# ----------------------------------------------------------------------------------------------
# forward and backward against the loop
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_loop_reference(device, cpu_isa, gen, name):
    for dtype, shape in ((torch.float32, (37,)), (torch.bfloat16, (3, 11))):
        layer = make_layer(CONFIGS[name], dtype, device, gen)
        x = torch.randn(*shape, layer.hidden_size, generator=gen).to(device, dtype)
        ids = check_layer_ids(layer, x.reshape(-1, layer.hidden_size))
        y = layer(x)
        assert y.shape == x.shape and y.dtype == dtype
        y_ref = reference_moe(layer, params64(layer), x, ids)
        if dtype == torch.float32:
            torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
        else:  # bf16 operands and intermediates, fp32 accumulation: measured 1e-5 - 3e-5
            assert calc_diff(y, y_ref) < 1e-4
            torch.testing.assert_close(y.double(), y_ref, rtol=0.05, atol=0.03 * y_ref.abs().max().item())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_loop_reference(device, gen, name):
    layer = make_layer(CONFIGS[name], torch.float32, device, gen)
    # T = 26 and 300: the shared experts on r1x.grouped_gemm (decode sizes) and on torch's matmul
    shape = (2, 13) if name != "softmax" else (300,)
    x = torch.randn(*shape, layer.hidden_size, generator=gen).to(device).requires_grad_()
    ids = check_layer_ids(layer, x.detach().reshape(-1, layer.hidden_size))  # before the bias update
    y = layer(x)
    p = params64(layer)
    x64 = x.detach().double().requires_grad_()
    y_ref = reference_moe(layer, p, x64, ids)
    g = torch.randn(y.shape, generator=gen).to(device)
    y.backward(g)
    y_ref.backward(g.double())
    grads = {"x": (x.grad, x64.grad)}
    grads.update({n: (t.grad, p[n].grad) for n, t in layer.named_parameters()})
    assert set(grads) == {"x", "gate.weight", "experts.gate_up_proj", "experts.down_proj"} | (
        {f"shared_experts.{n}_proj.weight" for n in ("gate", "up", "down")} if layer.shared_experts else set())
    for n, (got, exp) in grads.items():
        assert got is not None, n
        assert_close(got, exp, msg=n)


# ----------------------------------------------------------------------------------------------
# edge cases: T = 0, E = 1, top_k = E, idle experts
# ----------------------------------------------------------------------------------------------
def test_empty_input(device, gen):
    layer = make_layer(CONFIGS["v3"], torch.float32, device, gen, seq_aux_loss_alpha=0.01)
    bias0 = layer.gate.e_score_correction_bias.clone()
    x = torch.randn(0, layer.hidden_size, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, layer.hidden_size)
    (y.sum() + layer.aux_loss).backward()
    assert x.grad.shape == x.shape and float(layer.aux_loss) == 0.0
    assert torch.equal(layer.gate.e_score_correction_bias, bias0)  # no tokens, no update
    assert layer.expert_load.sum() == 0
    with torch.no_grad():
        assert layer.eval()(torch.randn(2, 0, layer.hidden_size, device=device)).shape == (2, 0, layer.hidden_size)


@pytest.mark.parametrize("cfg", [
    (32, 24, 1, 1, 0, 1, 1, "sigmoid", True, 1.0, False),   # E = 1
    (32, 24, 1, 1, 1, 1, 1, "softmax", False, 1.0, False),  # E = 1, softmax (weight 1)
    (40, 16, 6, 6, 0, 1, 1, "sigmoid", True, 2.0, True),    # top_k = E, no shared experts
    (40, 16, 6, 6, 1, 3, 3, "softmax", False, 1.0, False),  # top_k = E with groups
], ids=["E1", "E1-softmax", "topk=E", "topk=E-groups"])
def test_degenerate_configs(device, gen, cfg):
    layer = make_layer(cfg, torch.float32, device, gen)
    x = torch.randn(9, cfg[0], generator=gen).to(device).requires_grad_()
    _, _, ids = layer.route(x.detach())
    y = layer(x)
    assert torch.equal(ids.sort(1).values.cpu(), torch.arange(cfg[3]).expand(9, -1).int())
    x64 = x.detach().double().requires_grad_()
    p = params64(layer)
    y_ref = reference_moe(layer, p, x64, ids)
    assert_close(y, y_ref, rtol=1e-5)
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(x.grad, x64.grad)
    assert_close(layer.gate.weight.grad, p["gate.weight"].grad)


def test_idle_experts(device, gen):
    """Experts no token picks: zero gradient, no contribution, and the rest still right."""
    layer = make_layer(CONFIGS["sigmoid"], torch.float32, device, gen, bias_update_speed=0.0)
    idle = [0, 3, 4, 7]
    with torch.no_grad():
        layer.gate.e_score_correction_bias[idle] = -10.0  # never selected (scores are in (0, 1))
    x = torch.randn(21, layer.hidden_size, generator=gen).to(device).requires_grad_()
    _, _, ids = layer.route(x.detach())
    layer(x).square().sum().backward()
    assert not torch.isin(ids.cpu(), torch.tensor(idle, dtype=torch.int32)).any()
    gu, dn = layer.experts.gate_up_proj.grad, layer.experts.down_proj.grad
    assert gu[idle].abs().max() == 0 and dn[idle].abs().max() == 0
    p = params64(layer)
    x64 = x.detach().double().requires_grad_()
    reference_moe(layer, p, x64, ids).square().sum().backward()
    assert_close(x.grad, x64.grad)
    assert_close(gu, p["experts.gate_up_proj"].grad)
    assert layer.load_stats()["load"][idle].sum() == 0


# ----------------------------------------------------------------------------------------------
# load balancing
# ----------------------------------------------------------------------------------------------
def test_bias_update_and_load_stats(device, gen):
    speed = 0.01
    layer = make_layer(CONFIGS["sigmoid"], torch.float32, device, gen, bias_update_speed=speed)
    e = layer.n_routed_experts
    with torch.no_grad():
        layer.gate.e_score_correction_bias[2] = 5.0  # expert 2 takes every token
    bias0 = layer.gate.e_score_correction_bias.clone()
    x = torch.randn(40, layer.hidden_size, generator=gen).to(device)
    _, _, ids = layer.route(x)
    counts = torch.bincount(ids.long().flatten().cpu(), minlength=e).float()
    assert counts[2] == 40
    layer.train()(x)
    step = layer.gate.e_score_correction_bias.cpu() - bias0.cpu()
    expected = speed * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(step, expected)
    assert step[2] < 0  # the overloaded expert's bias goes down
    assert (step[counts < counts.mean()] > 0).all()  # the underloaded ones' go up
    assert torch.equal(layer.expert_load.cpu(), counts)
    stats = layer.load_stats()
    assert torch.equal(stats["load"], counts) and stats["total"] == 80
    assert stats["maxvio"] == pytest.approx((40 - 10) / 10)
    # eval mode and bias_update_speed = 0 leave the bias alone; the load keeps counting
    bias1 = layer.gate.e_score_correction_bias.clone()
    counts1 = torch.bincount(layer.route(x)[2].long().flatten().cpu(), minlength=e).float()  # the new bias
    with torch.no_grad():
        layer.eval()(x)
    assert torch.equal(layer.gate.e_score_correction_bias, bias1)
    assert torch.equal(layer.expert_load.cpu(), counts + counts1)
    layer.bias_update_speed = 0.0
    layer.train()(x)
    assert torch.equal(layer.gate.e_score_correction_bias, bias1)
    layer.reset_load_stats()
    assert layer.expert_load.sum() == 0 and layer.load_stats()["maxvio"] == 0.0
    assert "expert_load" not in layer.state_dict()  # not part of the checkpoint


def test_bias_update_balances_load(gen):
    """Repeated training forwards on the same skewed batch lower MaxVio (aux-loss-free balancing)."""
    layer = make_layer(CONFIGS["v3"], torch.float32, "cpu", gen, bias_update_speed=0.01)
    x = torch.randn(256, layer.hidden_size, generator=gen) + 1.0
    with torch.no_grad():
        layer.gate.weight[:4] += 0.002  # group 0 is favoured: its logits are higher by ~0.2
        layer.gate.e_score_correction_bias.zero_()
    with torch.no_grad():
        layer.train()(x)
        before = layer.load_stats()["maxvio"]
        for _ in range(60):
            layer(x)
        layer.reset_load_stats()
        layer(x)
    assert before > 0.5 and layer.load_stats()["maxvio"] < 0.4 * before  # 40 seeds: before >= 0.8, after <= 0.18x


def seq_aux_loss_loop(layer, x2, bounds):
    """Eq. 17-20 of the DeepSeek-V3 paper, one sequence at a time."""
    e, k = layer.n_routed_experts, layer.num_experts_per_tok
    losses = []
    for s, t in zip(bounds[:-1], bounds[1:]):
        if t == s:
            continue
        logits = layer.gate(x2[s:t])
        _, _, ids = layer.route(x2[s:t].detach())
        scores = logits.sigmoid() if layer.score_func == "sigmoid" else logits.softmax(-1)
        sn = scores / scores.sum(-1, keepdim=True)
        f = torch.zeros(e)
        for i in range(e):
            f[i] = e / (k * (t - s)) * (ids == i).any(dim=1).sum()
        P = sn.mean(0)
        losses.append((f.to(P.device) * P).sum())
    return layer.seq_aux_loss_alpha * torch.stack(losses).mean()


@pytest.mark.parametrize("name", ["v3", "softmax"])
def test_seq_aux_loss(device, gen, name):
    alpha = 0.003
    layer = make_layer(CONFIGS[name], torch.float32, device, gen, seq_aux_loss_alpha=alpha, bias_update_speed=0.0)
    h = layer.hidden_size
    cases = [
        (torch.randn(3, 10, h, generator=gen), None, [0, 10, 20, 30]),  # one sequence per row
        (torch.randn(17, h, generator=gen), None, [0, 17]),  # all tokens one sequence
        (torch.randn(23, h, generator=gen), [0, 5, 5, 6, 23], [0, 5, 5, 6, 23]),  # packed, an empty one
    ]
    for x, cu, bounds in cases:
        x = x.to(device)
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
        layer.zero_grad()
        layer.train()(x, cu_seqlens=cu_t)
        loss = layer.aux_loss
        assert loss.shape == () and loss.requires_grad
        loss.backward()
        g = layer.gate.weight.grad.clone()
        layer.zero_grad()
        exp = seq_aux_loss_loop(layer, x.reshape(-1, h), bounds)
        exp.backward()
        torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(g, layer.gate.weight.grad, rtol=1e-4, atol=1e-7)
        assert layer.experts.gate_up_proj.grad is None  # the loss reaches only the router
    # no loss in eval mode or with alpha = 0
    layer.eval()
    layer(torch.randn(4, h, device=device))
    assert layer.aux_loss.item() == 0.0 and not layer.aux_loss.requires_grad
    layer.train().seq_aux_loss_alpha = 0.0
    layer(torch.randn(4, h, device=device))
    assert layer.aux_loss.item() == 0.0


# ----------------------------------------------------------------------------------------------
# FP8 experts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden,inter", [(256, 128), (200, 72)])
def test_fp8_layer(device, gen, hidden, inter):
    cfg = (hidden, inter, 8, 3, 1, 2, 1, "sigmoid", True, 2.5, True)
    layer = make_layer(cfg, torch.bfloat16, device, gen).eval()
    with torch.no_grad():  # experts of very different magnitudes: a scale applied to the wrong expert shows
        mag = 10 ** (torch.rand(8, 1, 1, generator=gen) * 2 - 1)
        layer.experts.gate_up_proj.mul_(mag.to(device, torch.bfloat16))
        layer.experts.down_proj.mul_(mag.flip(0).to(device, torch.bfloat16))
    fp8 = copy.deepcopy(layer).to_fp8()
    assert fp8.is_fp8 and fp8.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert fp8.experts.gate_up_proj_scale_inv.shape == (8, -(-2 * inter // 128), -(-hidden // 128))
    assert fp8.experts.down_proj_scale_inv.shape == (8, -(-hidden // 128), -(-inter // 128))
    assert fp8.gate.weight.dtype == torch.float32  # the router is not quantized
    x = torch.randn(5, 7, hidden, generator=gen).to(device, torch.bfloat16)
    with torch.no_grad():
        y, y8 = layer(x), fp8(x)
    assert y8.dtype == torch.bfloat16 and y8.shape == x.shape
    assert calc_diff(y8, y) < FP8_LAYER_DIFF
    # the same layer from its FP8 checkpoint (fp8=True gives the buffers their shapes)
    fresh = MoE(hidden, inter, 8, 3, n_group=2, topk_group=1, routed_scaling_factor=2.5, fp8=True,
                dtype=torch.bfloat16, device=device).eval()
    fresh.load_state_dict(fp8.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), y8)
    # inference only
    with pytest.raises(RuntimeError, match="inference-only"):
        fp8(x.requires_grad_())


# ----------------------------------------------------------------------------------------------
# torch.compile, checkpoint layout, bad arguments
# ----------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_eval(device, gen):
    layer = make_layer(CONFIGS["v3"], torch.float32, device, gen).eval()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 9, layer.hidden_size, generator=gen).to(device)
    with torch.no_grad():
        y = compiled(x)
        y_e = layer(x)
    torch.testing.assert_close(y, y_e, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.expert_load, 2 * torch.bincount(layer.route(x.reshape(-1, layer.hidden_size))[2].long().flatten(), minlength=16).float())


def test_matches_transformers_deepseek_v3_moe(gen):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=64, moe_intermediate_size=24, n_routed_experts=16, num_experts_per_tok=4,
                           n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    hf = DeepseekV3MoE(cfg).eval()
    with torch.no_grad():
        for t in list(hf.parameters()) + [hf.gate.e_score_correction_bias]:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    layer = MoE(64, 24, 16, 4, n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5).eval()
    layer.load_state_dict(hf.state_dict(), strict=True)  # the same names and shapes
    x = torch.randn(2, 5, 64, generator=gen)
    with torch.no_grad():
        y, y_hf = layer(x), hf(x)
    torch.testing.assert_close(y, y_hf, rtol=1e-4, atol=1e-5 * y_hf.abs().max().item())


def test_bad_arguments():
    ok = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)

    def bad(name, **kw):
        with pytest.raises(ValueError, match=f"`{name}`"):
            MoE(**{**ok, **kw})

    bad("num_experts_per_tok", num_experts_per_tok=9)
    bad("num_experts_per_tok", num_experts_per_tok=0)
    bad("n_routed_experts", n_routed_experts=0)
    bad("hidden_size", hidden_size=-1)
    bad("n_group", n_group=3)
    bad("n_group", n_group=0)
    bad("topk_group", n_group=4, topk_group=5)
    bad("topk_group", n_group=4, topk_group=0)
    bad("num_experts_per_tok", n_group=4, topk_group=1, num_experts_per_tok=3)  # only 2 eligible
    bad("score_func", score_func="relu")
    bad("n_shared_experts", n_shared_experts=-1)
    bad("bias_update_speed", bias_update_speed=-0.1)
    bad("seq_aux_loss_alpha", seq_aux_loss_alpha=float("nan"))
    bad("routed_scaling_factor", routed_scaling_factor=0.0)
    bad("dtype", dtype=torch.float16)
    layer = MoE(**ok, seq_aux_loss_alpha=0.1)
    with pytest.raises(ValueError, match="`x`"):
        layer(torch.randn(3, 63))
    with pytest.raises(ValueError, match="`cu_seqlens`"):
        layer.train()(torch.randn(3, 64), cu_seqlens=torch.tensor([0.0, 3.0]))
