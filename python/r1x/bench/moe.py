"""Benchmark of the DeepSeekMoE layer (:class:`r1x.nn.MoE`) against baselines measured in the
same run, with runs interleaved (:meth:`Timer.compare`) and caches flushed between runs.

Layers (bf16 experts, fp32 router): ``v2-lite`` (DeepSeek-V2-Lite: hidden 2048, 64 routed
experts of width 1408, 2 shared, top-6, softmax scores, no group limit) and ``small`` (hidden
512, 16 experts of width 256, 1 shared, top-4, sigmoid) for quick runs. Measurements:

* ``forward`` at T tokens: ``r1x`` (the layer) against ``loop`` (DeepSeek-V3's inference code:
  torch routing, then for every expert with tokens ``idx, top = torch.where(ids == e)`` and
  ``y[idx] += expert(x[idx]) * weights[idx, top, None]`` with torch matmuls, on the same
  parameters) and ``grouped_mm`` (torch routing, dispatch by ``argsort``, two
  ``torch._grouped_mm`` calls, ``index_add`` combine), where the installed torch has it;
* ``fwd+bwd`` (input and all parameter gradients) against ``loop``;
* ``fp8``: the layer with e4m3 experts (routed and shared; :meth:`r1x.nn.MoE.to_fp8`) against
  the bf16 layer, at decode sizes;
* ``breakdown``: the layer's pieces timed separately (router GEMM + ``moe_topk_route``,
  ``moe_dispatch``, the expert GEMMs, ``moe_combine``, the shared experts), to report the share
  of routing + dispatch + combine in the layer's time;
* on CUDA, ``grouped_gemm``: :func:`r1x.fp8_grouped_gemm` in TFLOP/s on 4 groups x 8192 rows,
  N = 4096, K = 7168, against ``torch._grouped_mm`` in bf16; on the CPU, :func:`r1x.grouped_gemm`
  (bf16, the v2-lite expert shape N = 1408, K = 2048) on 8 x 512, 8 x 64 and 64 x 32 rows
  against one torch matmul of the same FLOPs (``one matmul``: all rows times one expert).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn.functional as F

import r1x
from r1x.bench import common
from r1x.bench.common import Timer, device_tag, format_table, machine_info, publish
from r1x.nn import MoE
from r1x.testing import calc_diff

TITLE = "r1x MoE layer vs baselines"  # of the plots

LAYERS = {
    # hidden, moe_intermediate, routed experts, top_k, shared, n_group, topk_group, score_func, norm, scale
    "small": dict(hidden_size=512, moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4,
                  n_shared_experts=1),
    "v2-lite": dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6,
                    n_shared_experts=2, score_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0),
}
T_VALUES = [1, 16, 64, 512, 4096]
BWD_T = [64, 512]
FP8_T = [1, 16]
BREAKDOWN_T = 4096

# What each measurement should reach (ratios r1x / baseline), per device and CPU path (the key
# is "cuda" or "cpu_<path>", torch capped to the same class).
TARGETS = {
    "cpu_amx": [("forward", "loop", lambda t: t <= 64, 3.0, "forward >= 3x the loop for T <= 64"),
                ("forward", "loop", lambda t: t == 4096, 1.2, "forward >= 1.2x the loop at T = 4096"),
                ("fwd+bwd", "loop", lambda t: t == 512, 1.5, "fwd+bwd >= 1.5x the loop at T = 512"),
                ("fp8", "bf16", lambda t: t <= 16, 1.6, "FP8 experts >= 1.6x the bf16 layer for T <= 16")],
    "cpu_avx512": [("forward", "loop", lambda t: t <= 64, 1.5, "forward >= 1.5x the loop for T <= 64"),
                   ("forward", "loop", lambda t: t == 4096, 1.2, "forward >= 1.2x the loop at T = 4096"),
                   ("fwd+bwd", "loop", lambda t: t == 512, 1.5, "fwd+bwd >= 1.5x the loop at T = 512"),
                   ("grouped_gemm", "one matmul", lambda t: t == 8 * 512, 0.9,
                    "grouped_gemm bf16 8 x 512 rows (1408 x 2048) >= 0.9x one matmul of the same FLOPs")],
    "cuda": [],
}
SHARE_TARGET = {"cuda": 0.10}  # routing + dispatch + combine, of the layer's time at T = 4096


def default_plan(device: torch.device, full: bool = False) -> dict:
    """Which (layer, T) each measurement runs on. On the CPU the default skips v2-lite at
    T = 4096 (about a second per forward, tens with the loop baseline and backward)."""
    cpu = device.type == "cpu" and not full
    v2_t = [t for t in T_VALUES if t <= 512] if cpu else T_VALUES
    return {
        "forward": [("small", t) for t in T_VALUES] + [("v2-lite", t) for t in v2_t],
        "fwd+bwd": [(name, t) for name in LAYERS for t in BWD_T],
        "fp8": [("small", t) for t in FP8_T] + [("v2-lite", t) for t in FP8_T],
        "breakdown": [("small", BREAKDOWN_T)] + ([] if cpu else [("v2-lite", BREAKDOWN_T)]),
    }


def make_layer(name: str, device: torch.device, gen: torch.Generator) -> MoE:
    """The bf16 layer with random weights (std 1/sqrt(fan_in)), no bias update."""
    layer = MoE(**LAYERS[name], bias_update_speed=0.0, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5).to(device, p.dtype))
    return layer.eval()


# ----------------------------------------------------------------------------------------------
# baselines (plain torch on the layer's own parameters)
# ----------------------------------------------------------------------------------------------
def torch_route(layer: MoE, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's Gate in torch ops: ``(weights [T, k] in x's dtype, ids [T, k] int64)``."""
    logits = F.linear(x2.float(), layer.gate.weight)
    scores = logits.sigmoid() if layer.score_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores + layer.gate.e_score_correction_bias
    if layer.n_group > 1:
        e, g = layer.n_routed_experts, layer.n_group
        gs = choice.view(-1, g, e // g).topk(2, dim=-1).values.sum(-1)
        mask = torch.ones_like(gs, dtype=torch.bool).scatter_(1, gs.topk(layer.topk_group, dim=-1).indices, False)
        choice = choice.masked_fill(mask.repeat_interleave(e // g, dim=1), float("-inf"))
    ids = choice.topk(layer.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, ids)
    if layer.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * layer.routed_scaling_factor).to(x2.dtype), ids


def _shared(layer: MoE, x2: torch.Tensor) -> torch.Tensor:
    s = layer.shared_experts
    return s.down_proj(F.silu(s.gate_proj(x2)) * s.up_proj(x2))


def loop_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's inference MoE: a Python loop over the experts that received tokens."""
    x2 = x.reshape(-1, layer.hidden_size)
    weights, ids = torch_route(layer, x2)
    i = layer.moe_intermediate_size
    gate_up = layer.experts.gate_up_proj.unbind(0)  # one autograd node for all experts
    down = layer.experts.down_proj.unbind(0)
    y = torch.zeros_like(x2)
    counts = torch.bincount(ids.flatten(), minlength=layer.n_routed_experts).tolist()
    for e, c in enumerate(counts):
        if c == 0:
            continue
        idx, top = torch.where(ids == e)
        h = F.linear(x2[idx], gate_up[e])
        y[idx] += F.linear(F.silu(h[:, :i]) * h[:, i:], down[e]) * weights[idx, top, None]
    return (y + _shared(layer, x2)).view(x.shape)


def has_grouped_mm(device: torch.device) -> str | None:
    """None when ``torch._grouped_mm`` runs bf16 ``[M, K] x [E, K, N]`` with offs here, else why not."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    try:
        a = torch.randn(24, 64, device=device, dtype=torch.bfloat16)
        b = torch.randn(3, 32, 64, device=device, dtype=torch.bfloat16)
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        out = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)
        ok = torch.allclose(out[8:].float(), a[8:].float() @ b[2].float().T, rtol=0.05, atol=0.5)
        return None if ok else "torch._grouped_mm gives wrong results here"
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0][:120]


def grouped_mm_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Torch routing, dispatch by stable argsort, ``torch._grouped_mm`` for the experts,
    ``index_add`` (fp32) to combine."""
    x2 = x.reshape(-1, layer.hidden_size)
    weights, ids = torch_route(layer, x2)
    k, i = layer.num_experts_per_tok, layer.moe_intermediate_size
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    tok = torch.div(order, k, rounding_mode="floor")
    offs = torch.bincount(flat, minlength=layer.n_routed_experts).cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x2[tok], layer.experts.gate_up_proj.transpose(1, 2), offs=offs)
    ys = torch._grouped_mm(F.silu(h[:, :i]) * h[:, i:], layer.experts.down_proj.transpose(1, 2), offs=offs)
    ys = ys.float() * weights.flatten()[order].float().unsqueeze(1)
    y = torch.zeros(x2.shape, dtype=torch.float32, device=x.device).index_add_(0, tok, ys).to(x.dtype)
    return (y + _shared(layer, x2)).view(x.shape)


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def _tokens(layer: MoE, t: int, device, gen) -> torch.Tensor:
    return torch.randn(t, layer.hidden_size, generator=gen).to(device, torch.bfloat16)


def weight_bytes(layer: MoE, ids: torch.Tensor) -> int:
    """Bytes of weights one forward must read: the experts the tokens picked, the shared
    experts and the router (e4m3 weights count 1 byte plus their fp32 block scales)."""
    hit = int(torch.unique(ids).numel())
    e = layer.experts
    per_expert = sum(getattr(e, n)[0].numel() * getattr(e, n).element_size() for n in ("gate_up_proj", "down_proj"))
    if e.is_fp8:
        per_expert += sum(getattr(e, f"{n}_scale_inv")[0].numel() * 4 for n in ("gate_up_proj", "down_proj"))
    shared = sum(b.numel() * b.element_size() for b in layer.shared_experts.buffers()) if layer.shared_experts else 0
    shared += sum(p.numel() * p.element_size() for p in layer.shared_experts.parameters()) if layer.shared_experts else 0
    return hit * per_expert + shared + layer.gate.weight.numel() * 4


def bench_forward(layer, name, t, device, timer, gen, grouped_mm_note) -> dict:
    x = _tokens(layer, t, device, gen)
    methods = {"r1x": lambda: layer(x), "loop": lambda: loop_forward(layer, x)}
    if grouped_mm_note is None:
        methods["grouped_mm"] = lambda: grouped_mm_forward(layer, x)
    with torch.no_grad():
        rec = {"kind": "forward", "layer": name, "t": t, "times": timer.compare(methods)}
        y = layer(x)
        rec["calc_diff"] = {b: calc_diff(y, methods[b]()) for b in methods if b != "r1x"}
        rec["weight_bytes"] = weight_bytes(layer, layer.route(x)[2])
    rec["gbps"] = rec["weight_bytes"] / rec["times"]["r1x"]["median_s"] / 1e9
    if grouped_mm_note is not None:
        rec["notes"] = {"grouped_mm": grouped_mm_note}
    return _speedups(rec, "r1x")


def bench_fwd_bwd(layer, name, t, device, timer, gen) -> dict:
    x = _tokens(layer, t, device, gen).requires_grad_()
    g = torch.randn(x.shape, generator=gen).to(device, x.dtype)
    layer.train()

    def step(fwd):
        def run():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            fwd(layer, x).backward(g)
        return run

    try:
        rec = {"kind": "fwd+bwd", "layer": name, "t": t,
               "times": timer.compare({"r1x": step(MoE.__call__), "loop": step(loop_forward)})}
    finally:
        layer.zero_grad(set_to_none=True)
        layer.eval()
    return _speedups(rec, "r1x")


def bench_fp8(layer, layer8, name, t, device, timer, gen) -> dict:
    x = _tokens(layer, t, device, gen)
    with torch.no_grad():
        rec = {"kind": "fp8", "layer": name, "t": t,
               "times": timer.compare({"fp8": lambda: layer8(x), "bf16": lambda: layer(x)})}
        rec["calc_diff"] = {"bf16": calc_diff(layer8(x), layer(x))}
        rec["weight_bytes"] = weight_bytes(layer8, layer8.route(x)[2])
    rec["gbps"] = rec["weight_bytes"] / rec["times"]["fp8"]["median_s"] / 1e9
    return _speedups(rec, "fp8")


def bench_breakdown(layer, name, t, device, timer, gen) -> dict:
    """The layer's forward split into its ops, each timed on its real inputs."""
    x = _tokens(layer, t, device, gen)
    with torch.no_grad():
        _, weights, ids = layer.route(x)
        xs, offs, perm = r1x.moe_dispatch(x, ids, layer.n_routed_experts)
        ys = layer.experts(xs, offs)
        methods = {
            "layer": lambda: layer(x),
            "route": lambda: layer.route(x),
            "dispatch": lambda: r1x.moe_dispatch(x, ids, layer.n_routed_experts),
            "experts": lambda: layer.experts(xs, offs),
            "combine": lambda: r1x.moe_combine(ys, weights, perm, t),
        }
        if layer.shared_experts is not None:
            methods["shared"] = lambda: layer.shared_experts(x)
        rec = {"kind": "breakdown", "layer": name, "t": t, "times": timer.compare(methods)}
    med = {k: v["median_s"] for k, v in rec["times"].items()}
    rec["share"] = (med["route"] + med["dispatch"] + med["combine"]) / med["layer"]
    rec["speedup"] = {}
    return rec


def bench_grouped_gemm(device, timer, gen, groups=4, rows=8192, n=4096, k=7168) -> dict:
    """fp8_grouped_gemm against torch._grouped_mm (bf16) on equal groups (CUDA)."""
    a = torch.randn(groups * rows, k, generator=gen).to(device, torch.bfloat16)
    b = (torch.randn(groups, n, k, generator=gen) * k**-0.5).to(device, torch.bfloat16)
    offs = torch.arange(1, groups + 1, dtype=torch.int32, device=device) * rows
    qa, sa = r1x.quant_fp8_per_token_group(a)
    qs = [r1x.quant_fp8_per_block(b[e]) for e in range(groups)]
    qb, sb = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    methods = {"r1x fp8": lambda: r1x.fp8_grouped_gemm(qa, sa, qb, sb, offs)}
    note = has_grouped_mm(device)
    if note is None:
        bt = b.transpose(1, 2)
        methods["torch._grouped_mm bf16"] = lambda: torch._grouped_mm(a, bt, offs=offs)
    flops = 2 * groups * rows * n * k
    rec = {"kind": "grouped_gemm", "layer": f"{groups}x{rows}x{n}x{k}", "t": groups * rows,
           "times": timer.compare(methods), "flops": flops}
    rec["tflops"] = {m: flops / v["median_s"] / 1e12 for m, v in rec["times"].items()}
    if note is not None:
        rec["notes"] = {"torch._grouped_mm": note}
    return _speedups(rec, "r1x fp8")


CPU_GROUPED = [(8, 512), (8, 64), (64, 32)]  # (groups, rows per group) at N = 1408, K = 2048


def bench_grouped_gemm_cpu(device, timer, gen, groups: int, rows: int, n: int = 1408, k: int = 2048) -> dict:
    """r1x.grouped_gemm (bf16) on equal groups against one torch matmul of the same FLOPs."""
    a = torch.randn(groups * rows, k, generator=gen).to(device, torch.bfloat16)
    b = (torch.randn(groups, n, k, generator=gen) * k**-0.5).to(device, torch.bfloat16)
    offs = torch.arange(1, groups + 1, dtype=torch.int32, device=device) * rows
    w = b[0].t()
    flops = 2 * groups * rows * n * k
    rec = {"kind": "grouped_gemm", "layer": f"{groups}x{rows}x{n}x{k}", "t": groups * rows, "flops": flops,
           "times": timer.compare({"r1x": lambda: r1x.grouped_gemm(a, b, offs), "one matmul": lambda: a @ w})}
    rec["tflops"] = {m: flops / v["median_s"] / 1e12 for m, v in rec["times"].items()}
    return _speedups(rec, "r1x")


def read_bandwidth(device: torch.device, timer: Timer) -> float:
    """GB/s of a sum over 512 MB (cold): the memory roof the decode-sized forwards approach."""
    buf = torch.ones(128 << 20, dtype=torch.float32, device=device)
    t = timer(lambda: buf.sum())["median_s"]
    return buf.numel() * 4 / t / 1e9


def _speedups(rec: dict, ours: str) -> dict:
    t = rec["times"][ours]["median_s"]
    rec["speedup"] = {b: v["median_s"] / t for b, v in rec["times"].items() if b != ours}
    return rec


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def _ms(rec, m) -> str:
    return f"{rec['times'][m]['median_s'] * 1e3:.3f}" if m in rec["times"] else "-"


def _x(rec, b) -> str:
    return f"{rec['speedup'][b]:.2f}x" if b in rec.get("speedup", {}) else "-"


def evaluate_targets(records: list[dict], device: torch.device) -> list[dict]:
    """Every target with the (layer, T) it applies to: the ratio and met / not met."""
    out = []
    for kind, base, applies, goal, text in TARGETS.get(common.target_key(device), []):
        for r in records:
            if r["kind"] == kind and applies(r["t"]) and base in r["speedup"]:
                out.append({"target": text, "layer": r["layer"], "t": r["t"], "ratio": r["speedup"][base],
                            "goal": goal, "met": r["speedup"][base] >= goal})
    goal = SHARE_TARGET.get(device_tag(device))
    for r in records:
        if r["kind"] == "breakdown":
            out.append({"target": "route + dispatch + combine share of the layer at T = 4096"
                        + (f" < {goal:.0%}" if goal else " (reported)"),
                        "layer": r["layer"], "t": r["t"], "ratio": r["share"], "goal": goal,
                        "met": None if goal is None else r["share"] < goal})
    return out


def make_table(records: list[dict], targets: list[dict] | None = None) -> str:
    parts = []
    fwd = [r for r in records if r["kind"] == "forward"]
    if fwd:
        rows = [[r["layer"], r["t"], _ms(r, "r1x"), f"{r['gbps']:.1f}", _ms(r, "loop"), _ms(r, "grouped_mm"),
                 _x(r, "loop"), _x(r, "grouped_mm"), f"{r['calc_diff'].get('loop', float('nan')):.1e}"] for r in fwd]
        parts.append("Forward (bf16; GB/s: weights read per forward / r1x time):\n\n" + format_table(
            ["layer", "T", "r1x ms", "GB/s", "loop ms", "grouped_mm ms", "vs loop", "vs grouped_mm",
             "calc_diff vs loop"], rows))
    bwd = [r for r in records if r["kind"] == "fwd+bwd"]
    if bwd:
        rows = [[r["layer"], r["t"], _ms(r, "r1x"), _ms(r, "loop"), _x(r, "loop")] for r in bwd]
        parts.append("Forward + backward (bf16, all gradients):\n\n"
                     + format_table(["layer", "T", "r1x ms", "loop ms", "vs loop"], rows))
    f8 = [r for r in records if r["kind"] == "fp8"]
    if f8:
        rows = [[r["layer"], r["t"], _ms(r, "fp8"), f"{r['gbps']:.1f}", _ms(r, "bf16"), _x(r, "bf16"),
                 f"{r['calc_diff']['bf16']:.1e}"] for r in f8]
        parts.append("FP8 experts (routed + shared e4m3) vs the bf16 layer:\n\n"
                     + format_table(["layer", "T", "fp8 ms", "GB/s", "bf16 ms", "vs bf16", "calc_diff vs bf16"], rows))
    br = [r for r in records if r["kind"] == "breakdown"]
    if br:
        cols = ["layer", "route", "dispatch", "experts", "combine", "shared"]
        rows = [[r["layer"], r["t"]] + [_ms(r, c) for c in cols] + [f"{r['share']:.1%}"] for r in br]
        parts.append("Where the forward's time goes (ms; route = router GEMM + moe_topk_route):\n\n" + format_table(
            ["layer", "T", "layer ms", "route", "dispatch", "experts", "combine", "shared", "route+dispatch+combine"],
            rows))
    gg = [r for r in records if r["kind"] == "grouped_gemm"]
    if gg:
        prec = 1 if any(v > 10 for r in gg for v in r["tflops"].values()) else 3
        rows = [[r["layer"], m, _ms(r, m), f"{r['tflops'][m]:.{prec}f}", _x(r, m) if m in r["speedup"] else "-"]
                for r in gg for m in r["times"]]
        parts.append("Grouped GEMM (groups x rows x N x K; vs: r1x's speed-up over the method):\n\n" + format_table(
            ["shape", "method", "ms", "TFLOP/s", "vs"], rows))
    if targets:
        rows = [[t["target"], t["layer"], t["t"],
                 f"{t['ratio']:.1%}" if "share" in t["target"] else f"{t['ratio']:.2f}x",
                 "-" if t["met"] is None else ("met" if t["met"] else "NOT met")] for t in targets]
        parts.append("Targets:\n\n" + format_table(["target", "layer", "T", "measured", "status"], rows))
    return "\n\n".join(parts)


def plot(records: list[dict], path: str, title: str) -> None:
    """One panel per layer: r1x's speed-up over each baseline against T (log2 T axis), 1x marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [n for n in LAYERS if any(r.get("layer") == n for r in records)]
    fig, axes = plt.subplots(1, max(len(layers), 1), figsize=(5.5 * max(len(layers), 1), 4.2), squeeze=False)
    series = [("forward", "loop", "forward vs loop"), ("forward", "grouped_mm", "forward vs torch._grouped_mm"),
              ("fwd+bwd", "loop", "fwd+bwd vs loop"), ("fp8", "bf16", "FP8 experts vs bf16 layer")]
    for ax, name in zip(axes[0], layers):
        for color, (kind, base, label) in enumerate(series):
            rs = sorted((r for r in records if r.get("layer") == name and r["kind"] == kind
                         and base in r.get("speedup", {})),
                        key=lambda r: r["t"])
            if rs:
                ax.plot([r["t"] for r in rs], [r["speedup"][base] for r in rs], marker="o", label=label,
                        color=f"C{color}")
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("T (tokens)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("r1x speed-up (x)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replot(json_path: str) -> str:
    """Redraws the PNG next to a results JSON (no re-measuring)."""
    return common.replot(json_path, plot, TITLE)


def _line(rec: dict) -> str:
    times = " ".join(f"{m}={v['median_s'] * 1e3:.3f}ms" for m, v in rec["times"].items())
    sp = " ".join(f"vs {b}={v:.2f}x" for b, v in rec.get("speedup", {}).items())
    extra = f" share={rec['share']:.1%}" if "share" in rec else ""
    return f"{rec['kind']:<12} {rec['layer']:<8} T={rec['t']:<5} {times}  {sp}{extra}"


def run(device: str = "cpu", full: bool = False, out_dir: str | None = None, budget_s: float = 1.0,
        seed: int = 0, quiet: bool = False, layers=None, tokens=None) -> dict:
    """Runs the plan (``layers``/``tokens`` restrict it) and writes ``moe_<cpu_<path>|cuda>.*``."""
    dev = torch.device(device)
    plan = default_plan(dev, full)
    keep = lambda pairs: [(n, t) for n, t in pairs  # noqa: E731
                          if (layers is None or n in layers) and (tokens is None or t in tokens)]
    timer = Timer(dev, budget_s=budget_s)
    gen = torch.Generator().manual_seed(seed)
    note = has_grouped_mm(dev)
    records = []
    for _ in range(3):  # the first fills of the flush buffer fault its pages in
        timer.flush()

    def add(rec):
        records.append(rec)
        if not quiet:
            print(_line(rec), flush=True)

    for name in LAYERS:
        wanted = {kind: [t for n, t in keep(plan[kind]) if n == name]
                  for kind in ("forward", "fwd+bwd", "fp8", "breakdown")}
        if not any(wanted.values()):
            continue
        layer = make_layer(name, dev, gen)
        for t in wanted["forward"]:
            add(bench_forward(layer, name, t, dev, timer, gen, note))
        for t in wanted["breakdown"]:
            add(bench_breakdown(layer, name, t, dev, timer, gen))
        for t in wanted["fwd+bwd"]:
            add(bench_fwd_bwd(layer, name, t, dev, timer, gen))
        if wanted["fp8"]:
            layer8 = copy.deepcopy(layer).to_fp8()
            for t in wanted["fp8"]:
                add(bench_fp8(layer, layer8, name, t, dev, timer, gen))
            del layer8
        del layer
    if layers is None and tokens is None:
        if dev.type == "cuda":
            add(bench_grouped_gemm(dev, timer, gen))
        else:
            for groups, rows in CPU_GROUPED:
                add(bench_grouped_gemm_cpu(dev, timer, gen, groups, rows))

    meta = machine_info(dev)
    meta["mem_read_gbps"] = round(read_bandwidth(dev, timer), 1)
    targets = evaluate_targets(records, dev)
    table = make_table(records, targets)
    return publish(out_dir, common.result_name("moe", dev), meta, records, targets, table, plot,
                   f"{TITLE}: {meta['device']}", quiet)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="also v2-lite at T = 4096 on the CPU")
    p.add_argument("--layers", default=None, help=f"comma-separated subset of {','.join(LAYERS)}")
    p.add_argument("--tokens", type=_ints, default=None, help="only these T values, e.g. 1,16")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON/markdown/PNG")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per method")
    common.add_isa_argument(p)
    args = p.parse_args(argv)
    if args.isa:
        print(common.cap_cpu_isa(args.isa), flush=True)
    layers = args.layers.split(",") if args.layers else None
    run(args.device, args.full, args.out, args.budget, layers=layers, tokens=args.tokens)


if __name__ == "__main__":
    main()
