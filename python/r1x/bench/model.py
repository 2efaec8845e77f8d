"""Benchmark of the whole model (:class:`r1x.model.DeepSeekForCausalLM`) against baselines
measured in the same run, runs interleaved (one run of each method per round, the median of the
rounds; whole-model steps, so no cache flush between runs). Measurements:

* ``train``: one training step (forward with labels, so the MTP loss too, backward, AdamW step)
  on a packed batch of random tokens, ``tiny`` at 8 x 256 tokens and ``small`` at 2 x 256
  (``--full``: 4 x 512), in the preset's dtype (tiny float32, small bfloat16; reported).
  Baseline: the same model (a copy of the same weights, its own AdamW) with every op the layers
  call swapped for :mod:`r1x.reference`'s plain-PyTorch version by :func:`reference_ops` (MLA
  attention and decode, MoE routing, dispatch, combine, grouped GEMMs, the FP8 GEMM and
  quantizers). Note that the reference grouped GEMM and combine accumulate in float64 (they
  are the tests' oracles): the baseline is plain PyTorch, not a tuned one. Before timing the
  two models' losses on one batch are compared (eval mode; reported as the relative difference).
  Reported: ms per step, tokens/s, speed-up.
* ``decode``: greedy :meth:`~r1x.model.DeepSeekForCausalLM.generate` (paged latent cache,
  absorbed MLA decode) of 256 new tokens (``--full`` adds 512) for 4 prompts of 32 random tokens,
  no stop token. Baseline: no cache, re-running the full forward over the whole prefix
  ``[B, 32 + i]`` at every step and taking the argmax of the last logits. Reported: new
  tokens/s of each (B x new tokens / time, prefill included), speed-up, and whether the two
  greedy outputs are equal (otherwise how many sequences are and the first differing token:
  near-ties of random weights may resolve differently between the absorbed and the full path,
  most of all in bfloat16, and everything after follows from that token).
* ``spec``: MTP speculative decoding (``generate(..., speculative=True)``: the main model
  verifies the MTP module's draft each step) against plain greedy ``generate``, same prompts
  and length as ``decode``; reported: tokens/s, speed-up, acceptance rate, whether the outputs
  are equal. With random weights the MTP module drafts noise (acceptance ~0): these rows show
  the cost of speculation when it fails. To measure the mechanism, ``tiny`` is also trained
  briefly on a predictable synthetic stream (arithmetic sequences ``x_{t+1} = x_t + d`` modulo
  the vocabulary, the step d in {1, 2, 3} drawn per sequence, so the model must read it from the
  context) for a few hundred AdamW steps (at most ``train_seconds``), after which the main model
  and the MTP module predict the stream and acceptance is high; prompts are then drawn from the
  same stream. The speculation target applies only where acceptance >= 70%.
* ``cache``: KV-cache bytes per token (over the main model's layers, the preset's dtype) of
  the latent cache, ``layers * (kv_lora_rank + qk_rope_head_dim) * bytes`` (checked against
  :meth:`PagedLatentCache.bytes_per_token` for the models built here), against an MHA cache of
  the same model, ``layers * H * (qk_head_dim + v_head_dim) * bytes`` (keys and values of every
  head), for tiny, small, v2-lite and v3; computed, not timed.

TARGETS lists what each measurement should reach, per device; the table ends with them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time

import torch

from r1x.bench import common
from r1x.bench.common import device_tag, format_table, machine_info, publish

TITLE = "r1x model vs baselines"  # of the plots

PRESET_NAMES = ("tiny", "small")
CACHE_PRESETS = ("tiny", "small", "v2-lite", "v3")
TRAIN_SHAPES = {"tiny": (8, 256), "small": (2, 256)}
TRAIN_SHAPES_FULL = {"tiny": (8, 256), "small": (4, 512)}
DECODE_BATCH, PROMPT_LEN = 4, 32
NEW_TOKENS, NEW_TOKENS_FULL = [256], [256, 512]
DECODE_TARGET_TOKENS = 256
ACCEPT_MIN = 0.7

# (kind, metric, applies(record), goal, text); metric: rec["speedup"]
TARGETS = {
    "cpu": [("train", lambda r: True, 1.5, "training step >= 1.5x the reference-ops model"),
            ("decode", lambda r: r["new_tokens"] == DECODE_TARGET_TOKENS, 5.0,
             f"cached decode >= 5x no-cache at {DECODE_TARGET_TOKENS} new tokens"),
            ("spec", lambda r: r["acceptance"] >= ACCEPT_MIN, 1.3,
             f"MTP speculation >= 1.3x plain decode (acceptance >= {ACCEPT_MIN:.0%})")],
    "cuda": [("decode", lambda r: r["new_tokens"] == DECODE_TARGET_TOKENS, 5.0,
              f"cached decode >= 5x no-cache at {DECODE_TARGET_TOKENS} new tokens"),
             ("spec", lambda r: r["acceptance"] >= ACCEPT_MIN, 1.3,
              f"MTP speculation >= 1.3x plain decode (acceptance >= {ACCEPT_MIN:.0%})")],
}


# ----------------------------------------------------------------------------------------------
# reference ops
# ----------------------------------------------------------------------------------------------
def _op_sites():
    """``(module, names)`` of the module-level op names the model's layers call at run time."""
    import r1x.nn.fp8_linear
    import r1x.nn.mla
    import r1x.nn.moe

    return [(r1x.nn.mla, ("mla_attention", "mla_decode")),
            (r1x.nn.moe, ("moe_topk_route", "moe_dispatch", "moe_combine", "grouped_gemm", "fp8_grouped_gemm",
                          "fp8_gemm", "quant_fp8_per_block", "quant_fp8_per_token_group")),
            (r1x.nn.fp8_linear, ("fp8_gemm", "quant_fp8_per_block", "quant_fp8_per_token_group"))]


@contextlib.contextmanager
def reference_ops():
    """Within the block, the r1x layers (MLA, MoE, FP8Linear) call :mod:`r1x.reference`'s
    plain-PyTorch ops instead of r1x's (same signatures and semantics); restored on exit.
    (RMSNorm, the dense MLP and the embeddings are plain PyTorch either way.)"""
    from r1x import reference

    saved = []
    try:
        for mod, names in _op_sites():
            for name in names:
                if hasattr(mod, name) and hasattr(reference, name):
                    saved.append((mod, name, getattr(mod, name)))
                    setattr(mod, name, getattr(reference, name))
        yield
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)


def swapped_names() -> list[str]:
    from r1x import reference

    return [f"{mod.__name__}.{n}" for mod, names in _op_sites() for n in names
            if hasattr(mod, n) and hasattr(reference, n)]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def compare(fns: dict, dev: torch.device, budget_s: float, min_reps: int = 3, max_reps: int = 50,
            warmup: dict | None = None) -> dict:
    """Median seconds of each function, runs interleaved (one run of each per round) until
    ``budget_s`` of timed runs and at least ``min_reps`` rounds; ``warmup`` (default ``fns``)
    runs once each first."""
    for fn in (warmup or fns).values():
        fn()
    _sync(dev)
    times = {n: [] for n in fns}
    spent, rounds = 0.0, 0
    while rounds < max_reps and (rounds < min_reps or spent < budget_s):
        for n, fn in fns.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            t = time.perf_counter() - t0
            times[n].append(t)
            spent += t
        rounds += 1
    return {n: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "reps": len(ts)}
            for n, ts in times.items()}


def build_model(preset: str, dev: torch.device, seed: int):
    from r1x.model import DeepSeekConfig, DeepSeekForCausalLM

    cfg = DeepSeekConfig.preset(preset)
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(cfg, device=dev)


def _tokens(n_rows, n_cols, cfg, gen, dev):
    return torch.randint(2, cfg.vocab_size, (n_rows, n_cols), generator=gen).to(dev)  # no bos / eos


# ----------------------------------------------------------------------------------------------
# training step
# ----------------------------------------------------------------------------------------------
def loss_check(model, batch) -> dict:
    """The loss of one batch (eval mode, no grad) with r1x ops and with the reference ops (and
    the largest difference of their logits)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            oa = model(batch, labels=batch)
            with reference_ops():
                ob = model(batch, labels=batch)
    finally:
        model.train(was)
    a, b = oa.loss.double().item(), ob.loss.double().item()
    return {"r1x": a, "reference": b, "rel_diff": abs(a - b) / max(abs(b), 1e-30),
            "logits_max_abs_diff": (oa.logits.float() - ob.logits.float()).abs().max().item()}


def bench_train(preset, b, s, dev, budget_s, seed) -> dict:
    model = build_model(preset, dev, seed)
    ref_model = copy.deepcopy(model)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    batch = _tokens(b, s, cfg, gen, dev)
    rec = {"kind": "train", "preset": preset, "dtype": cfg.torch_dtype, "b": b, "s": s, "tokens": b * s,
           "params": model.num_parameters(), "loss_check": loss_check(model, batch)}
    tol = 1e-4 if cfg.torch_dtype == "float32" else 2e-2
    rec["loss_check"]["ok"] = rec["loss_check"]["rel_diff"] <= tol
    opts = {"r1x": torch.optim.AdamW(model.parameters(), lr=1e-4),
            "reference": torch.optim.AdamW(ref_model.parameters(), lr=1e-4)}

    def step(m, opt):
        opt.zero_grad(set_to_none=True)
        m(batch, labels=batch).loss.backward()
        opt.step()

    def ref_step():
        with reference_ops():
            step(ref_model, opts["reference"])

    model.train()
    ref_model.train()
    rec["times"] = compare({"r1x": lambda: step(model, opts["r1x"]), "reference": ref_step}, dev, budget_s)
    rec["tokens_per_s"] = {m: rec["tokens"] / v["median_s"] for m, v in rec["times"].items()}
    rec["speedup"] = rec["times"]["reference"]["median_s"] / rec["times"]["r1x"]["median_s"]
    return rec


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_no_cache(model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Greedy decoding without a cache: the full forward over the whole prefix at every step."""
    seq = prompts
    for _ in range(new_tokens):
        nxt = model(seq).logits[:, -1].float().argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), dim=1)
    return seq[:, prompts.shape[1]:].tolist()


def _divergence(a, b) -> list:
    """Per sequence: None where the two outputs are equal, else the index of the first differing
    new token (everything after it follows from it)."""
    out = []
    for ra, rb in zip(a, b):
        if ra == rb:
            out.append(None)
        else:
            out.append(next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb))))
    return out


def _same(r) -> str:
    d = r["first_divergence"]
    bad = [i for i in d if i is not None]
    return "yes" if not bad else f"{len(d) - len(bad)}/{len(d)} (first diff at token {min(bad)})"


def bench_decode(model, label, prompts, new_tokens, dev, budget_s) -> dict:
    cfg = model.config
    model.eval()
    plist = prompts.tolist()
    outs = {}

    def cached():
        outs["cached"] = model.generate(plist, new_tokens, stop_token_ids=[])

    def no_cache():
        outs["no_cache"] = greedy_no_cache(model, prompts, new_tokens)

    short = max(2, min(8, new_tokens))
    warm = {"cached": lambda: model.generate(plist, short, stop_token_ids=[]),
            "no_cache": lambda: greedy_no_cache(model, prompts, short)}
    times = compare({"cached": cached, "no_cache": no_cache}, dev, budget_s, min_reps=1, warmup=warm)
    n = prompts.shape[0] * new_tokens
    return {"kind": "decode", "preset": label, "dtype": cfg.torch_dtype, "b": prompts.shape[0],
            "prompt_len": prompts.shape[1], "new_tokens": new_tokens, "times": times,
            "tokens_per_s": {m: n / v["median_s"] for m, v in times.items()},
            "speedup": times["no_cache"]["median_s"] / times["cached"]["median_s"],
            "first_divergence": _divergence(outs["cached"], outs["no_cache"])}


def bench_spec(model, label, prompts, new_tokens, dev, budget_s, extra=None) -> dict:
    cfg = model.config
    model.eval()
    plist = prompts.tolist()
    outs, stats = {}, {}

    def plain():
        outs["plain"] = model.generate(plist, new_tokens, stop_token_ids=[])

    def spec():
        outs["spec"], stats["spec"] = model.generate(plist, new_tokens, stop_token_ids=[], speculative=True,
                                                     return_stats=True)

    short = max(2, min(8, new_tokens))
    warm = {"plain": lambda: model.generate(plist, short, stop_token_ids=[]),
            "spec": lambda: model.generate(plist, short, stop_token_ids=[], speculative=True)}
    times = compare({"plain": plain, "spec": spec}, dev, budget_s, min_reps=2, warmup=warm)
    st = stats["spec"]
    n = prompts.shape[0] * new_tokens
    rec = {"kind": "spec", "preset": label, "dtype": cfg.torch_dtype, "b": prompts.shape[0],
           "prompt_len": prompts.shape[1], "new_tokens": new_tokens, "times": times,
           "tokens_per_s": {m: n / v["median_s"] for m, v in times.items()},
           "speedup": times["plain"]["median_s"] / times["spec"]["median_s"],
           "acceptance": st.acceptance_rate, "drafted": st.drafted, "accepted": st.accepted,
           "decode_steps": st.decode_steps, "first_divergence": _divergence(outs["spec"], outs["plain"])}
    rec.update(extra or {})
    return rec


# ----------------------------------------------------------------------------------------------
# a briefly trained tiny model (for speculation with real acceptance)
# ----------------------------------------------------------------------------------------------
def arithmetic_stream(n_rows: int, n_cols: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Rows ``x_t = 2 + (x_0 + t * d) mod (vocab - 2)`` (token ids >= 2: no bos / eos), x_0 random,
    d in {1, 2, 3} per row."""
    v = vocab - 2
    x0 = torch.randint(0, v, (n_rows, 1), generator=gen)
    d = torch.randint(1, 4, (n_rows, 1), generator=gen)
    return 2 + (x0 + d * torch.arange(n_cols).unsqueeze(0)) % v


def train_synthetic(dev, seed, max_steps=300, max_seconds=60.0, b=8, s=320, lr=3e-3, quiet=False):
    """The tiny model trained on :func:`arithmetic_stream` with AdamW (r1x ops) for at most
    ``max_steps`` steps or ``max_seconds``; returns ``(model, info)``."""
    model = build_model("tiny", dev, seed)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    steps, out = 0, None
    while steps < max_steps and time.perf_counter() - t0 < max_seconds:
        batch = arithmetic_stream(b, s, cfg.vocab_size, gen).to(dev)
        for g in opt.param_groups:  # linear warm-up over 20 steps, then constant
            g["lr"] = lr * min(1.0, (steps + 1) / 20)
        opt.zero_grad(set_to_none=True)
        out = model(batch, labels=batch)
        out.loss.backward()
        opt.step()
        steps += 1
        if not quiet and steps % 50 == 0:
            print(f"  synthetic training: step {steps}, lm loss {out.lm_loss.item():.3f}, "
                  f"mtp loss {out.mtp_loss.item():.3f}", flush=True)
    info = {"train_steps": steps, "train_s": time.perf_counter() - t0, "train_batch": f"{b}x{s}",
            "final_lm_loss": out.lm_loss.item() if out is not None else None,
            "final_mtp_loss": out.mtp_loss.item() if out is not None else None}
    model.eval()
    return model, info


# ----------------------------------------------------------------------------------------------
# cache bytes per token
# ----------------------------------------------------------------------------------------------
def cache_bytes(preset: str) -> dict:
    from r1x.model import DeepSeekConfig

    cfg = DeepSeekConfig.preset(preset)
    nbytes = torch.empty((), dtype=cfg.dtype).element_size()
    n = cfg.num_hidden_layers
    latent = n * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * nbytes
    mha = n * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * nbytes
    return {"kind": "cache", "preset": preset, "dtype": cfg.torch_dtype, "layers": n,
            "heads": cfg.num_attention_heads, "latent_dim": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            "mha_dim": cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim),
            "latent_bytes": latent, "mha_bytes": mha, "ratio": mha / latent}


def _cache_check(model) -> int:
    from r1x.nn.cache import PagedLatentCache

    attn = model.model.layers[0].self_attn
    c = PagedLatentCache(1, 16, attn.latent_dim, len(model.model.layers), dtype=attn.dtype, device=model.device)
    return c.bytes_per_token()


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def evaluate_targets(records, dev) -> list[dict]:
    out = []
    for kind, applies, goal, text in TARGETS.get(device_tag(dev), []):
        for r in records:
            if r["kind"] == kind and "speedup" in r and applies(r):
                out.append({"target": text, "where": _where(r), "value": r["speedup"], "goal": goal,
                            "met": r["speedup"] >= goal})
    return out


def _where(r) -> str:
    if r["kind"] == "train":
        return f"{r['preset']} {r['dtype']} {r['b']}x{r['s']}"
    if r["kind"] == "cache":
        return r["preset"]
    return f"{r['preset']} {r['dtype']} B={r['b']} new={r['new_tokens']}"


def _tps(r, m):
    return f"{r['tokens_per_s'][m]:.1f}" if m in r.get("tokens_per_s", {}) else "-"


def _ms(r, m):
    return f"{r['times'][m]['median_s'] * 1e3:.1f}" if m in r.get("times", {}) else "-"


def make_table(records, targets) -> str:
    parts = []
    tr = [r for r in records if r["kind"] == "train"]
    if tr:
        rows = [[r["preset"], r["dtype"], f"{r['b']}x{r['s']}", _ms(r, "r1x"), _tps(r, "r1x"), _ms(r, "reference"),
                 _tps(r, "reference"), f"{r['speedup']:.2f}x", f"{r['loss_check']['rel_diff']:.1e}"
                 + ("" if r["loss_check"]["ok"] else " (!)")] for r in tr]
        parts.append("Training step (fwd + bwd + AdamW; reference: the same model on r1x.reference's ops; "
                     "loss diff: relative, one batch, eval mode):\n\n" + format_table(
                         ["preset", "dtype", "B x S", "r1x ms", "r1x tok/s", "ref ms", "ref tok/s", "speed-up",
                          "loss diff"], rows))
    dec = [r for r in records if r["kind"] == "decode"]
    if dec:
        rows = [[r["preset"], r["dtype"], r["b"], r["prompt_len"], r["new_tokens"], _tps(r, "cached"),
                 _tps(r, "no_cache"), f"{r['speedup']:.2f}x",
                 _same(r)] for r in dec]
        parts.append("Greedy decode, latent cache vs no cache (full forward over the prefix each step; "
                     "tok/s: new tokens over all prompts, prefill included):\n\n" + format_table(
                         ["model", "dtype", "B", "prompt", "new", "cached tok/s", "no-cache tok/s", "speed-up",
                          "same output"], rows))
    sp = [r for r in records if r["kind"] == "spec"]
    if sp:
        rows = [[r["preset"], r["dtype"], r["b"], r["new_tokens"], _tps(r, "spec"), _tps(r, "plain"),
                 f"{r['speedup']:.2f}x", f"{r['acceptance']:.1%}", r["decode_steps"],
                 _same(r)] for r in sp]
        notes = [f"- {r['preset']}: trained {r['train_steps']} steps ({r['train_s']:.0f} s, {r['train_batch']}) on "
                 f"arithmetic sequences, final lm loss {r['final_lm_loss']:.3f}, mtp loss {r['final_mtp_loss']:.3f}"
                 for r in sp if "train_steps" in r]
        parts.append("MTP speculative decoding vs plain greedy decode (both with the cache):\n\n" + format_table(
            ["model", "dtype", "B", "new", "spec tok/s", "plain tok/s", "speed-up", "acceptance", "steps",
             "same output"], rows) + ("\n\n" + "\n".join(notes) if notes else ""))
    ca = [r for r in records if r["kind"] == "cache"]
    if ca:
        rows = [[r["preset"], r["dtype"], r["layers"], r["heads"], r["latent_dim"], r["mha_dim"],
                 f"{r['latent_bytes']:,}", f"{r['mha_bytes']:,}", f"{r['ratio']:.1f}x"] for r in ca]
        parts.append("KV cache bytes per token (main model layers): latent (kv_lora_rank + rope) vs MHA "
                     "(H x (qk_head_dim + v_head_dim)):\n\n" + format_table(
                         ["preset", "dtype", "layers", "H", "latent dim", "MHA dim", "latent B/token",
                          "MHA B/token", "MHA / latent"], rows))
    if targets:
        rows = [[t["target"], t["where"], f"{t['value']:.2f}x", "met" if t["met"] else "NOT met"] for t in targets]
        parts.append("Targets:\n\n" + format_table(["target", "where", "measured", "status"], rows))
    elif any(r["kind"] == "spec" for r in records):
        parts.append(f"Targets: none applicable (speculation: no run reached {ACCEPT_MIN:.0%} acceptance)")
    return "\n\n".join(parts)


def plot(records, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    bars = [(f"train {_where(r)}", r["speedup"]) for r in records if r["kind"] == "train"]
    bars += [(f"cache vs none {_where(r)}", r["speedup"]) for r in records if r["kind"] == "decode"]
    bars += [(f"MTP spec {_where(r)} acc {r['acceptance']:.0%}", r["speedup"]) for r in records if r["kind"] == "spec"]
    if bars:
        xs = range(len(bars))
        ax.bar(xs, [v for _, v in bars], color=[f"C{0 if n.startswith('train') else 1 if n.startswith('cache') else 2}"
                                                for n, _ in bars])
        for x, (_, v) in zip(xs, bars):
            ax.annotate(f"{v:.2f}x", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([n for n, _ in bars], rotation=40, ha="right", fontsize=7)
        ax.set_yscale("log")
    ax.axhline(1.0, color="gray", linewidth=1)
    ax.set_ylabel("speed-up over the baseline (x)")
    ax.set_title("r1x model: speed-ups", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax = axes[1]
    ca = [r for r in records if r["kind"] == "cache"]
    if ca:
        xs = range(len(ca))
        ax.bar([x - 0.2 for x in xs], [r["latent_bytes"] for r in ca], 0.4, label="latent (MLA)")
        ax.bar([x + 0.2 for x in xs], [r["mha_bytes"] for r in ca], 0.4, label="MHA")
        for x, r in zip(xs, ca):
            ax.annotate(f"{r['ratio']:.1f}x", (x + 0.2, r["mha_bytes"]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{r['preset']} ({r['dtype']})" for r in ca], fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_ylabel("KV cache bytes per token")
    ax.set_title("cache bytes per token", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _line(r) -> str:
    if r["kind"] == "cache":
        return f"cache  {r['preset']:<8} latent {r['latent_bytes']} B/token, MHA {r['mha_bytes']} B/token ({r['ratio']:.1f}x)"
    tps = " ".join(f"{m}={v:.1f} tok/s" for m, v in r["tokens_per_s"].items())
    extra = ""
    if r["kind"] == "train":
        extra = (f" loss rel diff {r['loss_check']['rel_diff']:.1e}, logits max abs diff "
                 f"{r['loss_check']['logits_max_abs_diff']:.1e}")
    elif r["kind"] in ("decode", "spec"):
        extra = f" same output: {_same(r)}"
        if r["kind"] == "spec":
            extra += f" acceptance {r['acceptance']:.1%}"
    return f"{r['kind']:<6} {_where(r):<34} {tps} speed-up {r['speedup']:.2f}x{extra}"


def run(device: str = "cpu", full: bool = False, out_dir: str | None = None, budget_s: float = 1.0,
        seed: int = 0, quiet: bool = False, parts=None, presets=None, train_shapes=None, new_tokens=None,
        batch: int = DECODE_BATCH, prompt_len: int = PROMPT_LEN, train_steps: int = 300,
        train_seconds: float = 60.0) -> dict:
    """Runs the plan and writes ``model_<cpu_<path>|cuda>.*``. ``parts``: subset of train, decode,
    spec, cache; ``presets``: of tiny, small (train, decode, spec on random weights);
    ``train_shapes``: {preset: (B, S)}; ``new_tokens``: [N] for decode and spec; ``train_steps``
    / ``train_seconds``: the synthetic training of tiny for speculation (0 steps: skipped)."""
    dev = torch.device(device)
    parts = set(parts or ("train", "decode", "spec", "cache"))
    if parts - {"train", "decode", "spec", "cache"}:
        raise ValueError(f"unknown parts {sorted(parts - {'train', 'decode', 'spec', 'cache'})}")
    presets = list(presets or PRESET_NAMES)
    shapes = dict(TRAIN_SHAPES_FULL if full else TRAIN_SHAPES)
    shapes.update(train_shapes or {})
    news = list(new_tokens or (NEW_TOKENS_FULL if full else NEW_TOKENS))
    records = []

    def add(rec):
        records.append(rec)
        if not quiet:
            print(_line(rec), flush=True)

    if "train" in parts:
        for p in presets:
            add(bench_train(p, *shapes[p], dev, budget_s, seed))
    if "decode" in parts or "spec" in parts:
        gen = torch.Generator().manual_seed(seed + 2)
        for p in presets:
            model = build_model(p, dev, seed)
            prompts = _tokens(batch, prompt_len, model.config, gen, dev)
            for n in news:
                if "decode" in parts:
                    add(bench_decode(model, p, prompts, n, dev, budget_s))
                if "spec" in parts:
                    add(bench_spec(model, p + " (random)", prompts, n, dev, budget_s))
            del model
        if "spec" in parts and train_steps > 0:
            model, info = train_synthetic(dev, seed, train_steps, train_seconds, quiet=quiet)
            prompts = arithmetic_stream(batch, prompt_len, model.config.vocab_size, gen).to(dev)
            for n in news:
                add(bench_spec(model, "tiny (trained)", prompts, n, dev, budget_s, extra=info))
    if "cache" in parts:
        for p in CACHE_PRESETS:
            rec = cache_bytes(p)
            if p in PRESET_NAMES:
                rec["paged_cache_bytes_per_token"] = _cache_check(build_model(p, torch.device("cpu"), seed))
                assert rec["paged_cache_bytes_per_token"] == rec["latent_bytes"], rec
            add(rec)

    meta = machine_info(dev)
    meta["reference_ops"] = ", ".join(swapped_names())
    targets = evaluate_targets(records, dev)
    table = make_table(records, targets)
    return publish(out_dir, common.result_name("model", dev), meta, records, targets, table, plot,
                   f"{TITLE}: {meta['device']}", quiet)


def replot(json_path: str) -> str:
    """Redraws the PNG next to a results JSON (no re-measuring)."""
    return common.replot(json_path, plot, TITLE)


def _train_shapes(text: str) -> dict:
    out = {}
    for item in text.split(","):
        name, _, dims = item.partition("=")
        try:
            b, s = (int(v) for v in dims.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected PRESET=BxS, e.g. small=4x512") from None
        out[name] = (b, s)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="larger small-model training batch, also 512 new tokens")
    p.add_argument("--parts", default=None, help="comma-separated subset of train,decode,spec,cache (default: all)")
    p.add_argument("--presets", default=None, help="comma-separated subset of tiny,small (default: both)")
    p.add_argument("--train-shapes", type=_train_shapes, default=None, help="e.g. tiny=8x256,small=4x512")
    p.add_argument("--new-tokens", default=None, help="comma-separated new-token counts (default: 256)")
    p.add_argument("--batch", type=int, default=DECODE_BATCH, help="decode prompts")
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    p.add_argument("--train-steps", type=int, default=300, help="synthetic training of tiny for speculation (0: skip)")
    p.add_argument("--train-seconds", type=float, default=60.0, help="time cap of that training")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON/markdown/PNG")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per measurement")
    common.add_isa_argument(p)
    args = p.parse_args(argv)
    if args.isa:
        print(common.cap_cpu_isa(args.isa), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = lambda s: s.split(",") if s else None  # noqa: E731
    run(args.device, args.full, args.out, args.budget, parts=split(args.parts), presets=split(args.presets),
        train_shapes=args.train_shapes, new_tokens=[int(v) for v in args.new_tokens.split(",")] if args.new_tokens else None,
        batch=args.batch, prompt_len=args.prompt_len, train_steps=args.train_steps, train_seconds=args.train_seconds)


if __name__ == "__main__":
    main()
