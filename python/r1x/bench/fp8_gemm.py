"""Benchmark of the FP8 block-scaled GEMM against baselines measured in the same run.

Shapes are DeepSeek-V3's (N, K) projections at several token counts M. Baselines:

* ``bf16``: torch bf16 matmul on weights dequantized ahead of time (what FP8 must beat to be
  worth it: half the weight bytes, same math); on the CPU's avx2 and generic paths ``fp32``
  instead, since oneDNN has no native bf16 there (``r1x bench --isa avx2`` caps torch to AVX2);
* ``dequant+bf16`` (``dequant+fp32``): dequantize the FP8 weight, then the same matmul, on every
  call (DeepSeek-V3's reference inference code does this by default);
* on a GPU, ``torch._scaled_mm`` with 1x128 / 128x128 blockwise scales where the installed
  torch supports it, and DeepGEMM's ``fp8_gemm_nt`` when ``deep_gemm`` is installed.

``r1x`` times :func:`r1x.fp8_gemm` on pre-quantized activations; ``r1x+quant`` adds the
per-token-group quantization of bf16 activations (the whole FP8Linear forward). On the CPU the
table also gives r1x's fraction of the machine's measured peak for the path's GEMM instruction
(``r1x._C.cpu_peak()``: VDPBF16PS on avx512, TDPBF16PS on amx, fp32 FMA on avx2), and ends with
the targets of that path.
"""

from __future__ import annotations

import argparse
import os

import torch

import r1x
from r1x import reference as ref
from r1x.bench import common
from r1x.bench.common import Timer, format_table, machine_info, result_name
from r1x.testing import calc_diff

NK_SHAPES = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]
M_VALUES = [1, 16, 128, 512, 4096]
# On the CPU the default skips M = 4096 on the two largest weights (minutes each with baselines).
CPU_SKIP = {(4096, 24576, 1536), (4096, 7168, 16384)}


def default_shapes(device: torch.device, full: bool = False) -> list[tuple[int, int, int]]:
    shapes = [(m, n, k) for (n, k) in NK_SHAPES for m in M_VALUES]
    if device.type == "cpu" and not full:
        shapes = [s for s in shapes if s not in CPU_SKIP]
    return shapes


def _scaled_mm_blockwise(qa, sa, qb, sb):
    """torch._scaled_mm with (1x128, 128x128) scales, or None when this torch lacks it."""
    if not hasattr(torch, "_scaled_mm"):
        return None
    scale_a = sa.t().contiguous().t()  # [M, K/128], M-major
    scale_b = sb.t()  # [K/128, N/128]
    b = qb.t()  # [K, N] column-major
    try:
        torch._scaled_mm(qa, b, scale_a, scale_b, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return str(e).splitlines()[0][:120]
    return lambda: torch._scaled_mm(qa, b, scale_a, scale_b, out_dtype=torch.bfloat16)


def _deep_gemm(qa, sa, qb, sb):
    try:
        import deep_gemm  # noqa: F401
    except ImportError:
        return None
    out = torch.empty(qa.shape[0], qb.shape[0], dtype=torch.bfloat16, device=qa.device)
    try:
        fn = getattr(deep_gemm, "fp8_gemm_nt", None) or deep_gemm.gemm_fp8_fp8_bf16_nt
        fn((qa, sa), (qb, sb), out)
    except Exception as e:  # noqa: BLE001 (any DeepGEMM failure just drops this baseline)
        return str(e).splitlines()[0][:120]
    return lambda: fn((qa, sa), (qb, sb), out)


def dense_dtype(device: torch.device) -> torch.dtype:
    """The dense baseline's dtype: bf16, except on the CPU's avx2 and generic paths, where
    oneDNN has no native bf16 and the fair baseline is fp32."""
    if device.type == "cpu" and r1x.cpu_isa() in ("avx2", "generic"):
        return torch.float32
    return torch.bfloat16


def bench_shape(m: int, n: int, k: int, device: torch.device, timer: Timer, gen) -> dict:
    dense = dense_dtype(device)
    dn = "bf16" if dense == torch.bfloat16 else "fp32"
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(device, torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    qb, sb = r1x.quant_fp8_per_block(w)
    qa, sa = r1x.quant_fp8_per_token_group(x)
    del w
    w_deq = r1x.dequant_fp8(qb, sb, (128, 128)).to(dense)  # the pre-dequantized weight
    x_deq = r1x.dequant_fp8(qa, sa).to(dense)

    def dequant_matmul():
        wd = (qb.float().reshape(-1, 128, k // 128, 128) if n % 128 == 0 else None)
        if wd is not None:
            wd = (wd * sb[:, None, :, None]).reshape(n, k).to(dense)
        else:
            wd = ref.dequant_fp8(qb, sb, (128, 128)).to(dense)
        return x_deq @ wd.t()

    methods = {
        "r1x": lambda: r1x.fp8_gemm(qa, sa, qb, sb),
        "r1x+quant": lambda: r1x.fp8_gemm(*r1x.quant_fp8_per_token_group(x), qb, sb),
        dn: lambda: x_deq @ w_deq.t(),
        f"dequant+{dn}": dequant_matmul,
    }
    notes = {}
    if device.type == "cuda":
        for name, make in (("torch._scaled_mm", _scaled_mm_blockwise), ("deep_gemm", _deep_gemm)):
            fn = make(qa, sa, qb, sb)
            if callable(fn):
                methods[name] = fn
            elif fn is not None:
                notes[name] = fn

    flops = 2 * m * n * k
    rec = {"m": m, "n": n, "k": k, "flops": flops, "dense": dn, "times": {}, "notes": notes}
    rec["times"] = timer.compare(methods)
    t = rec["times"]["r1x"]["median_s"]
    rec["tflops"] = flops / t / 1e12
    rec["gbps"] = (m * k + n * k + 2 * m * n + 4 * (m * k // 128 + sb.numel())) / t / 1e9
    rec["speedup"] = {b: rec["times"][b]["median_s"] / t for b in rec["times"] if b != "r1x"}

    # numerics: against the float64 reference of the same formula, on up to 256 output
    # columns (the float64 operands of the largest weights would not fit in memory)
    cols = min(n, 256)
    out = r1x.fp8_gemm(qa, sa, qb[:cols], sb[: (cols + 127) // 128], out_dtype=torch.float32)
    exact = ref.fp8_gemm(qa, sa, qb[:cols], sb[: (cols + 127) // 128], out_dtype=torch.float64)
    rec["calc_diff"] = calc_diff(out, exact)
    rec["calc_diff_dense"] = calc_diff((x_deq.bfloat16() @ w_deq[:cols].bfloat16().t()).double(), exact)
    return rec


# (target key, baseline, applies to M, goal, text); the key is "cuda" or "cpu_<path>".
TARGETS = {
    "cpu_amx": [("bf16", lambda m: m <= 16, 2.0, "M <= 16: >= 2x bf16 matmul"),
                ("bf16", lambda m: m >= 512, 0.8, "M >= 512: >= 0.8x bf16 matmul")],
    "cpu_avx512": [("bf16", lambda m: m == 1, 2.0, "M = 1: >= 2x bf16 matmul"),
                   ("bf16", lambda m: m == 16, 1.5, "M = 16: >= 1.5x bf16 matmul"),
                   ("bf16", lambda m: m >= 128, 0.85, "M >= 128: >= 0.85x bf16 matmul"),
                   ("dequant+bf16", lambda m: True, 1.0, "never slower than dequantize-then-matmul")],
    "cpu_avx2": [("fp32", lambda m: m == 1, 2.0, "M = 1: >= 2x fp32 matmul"),
                 ("fp32", lambda m: m >= 128, 0.8, "M >= 128: >= 0.8x fp32 matmul")],
    "cuda": [],
}


def evaluate_targets(records: list[dict], device: torch.device) -> list[dict]:
    """Every target of this device / CPU path with each shape it applies to: ratio, met."""
    out = []
    for base, applies, goal, text in TARGETS.get(common.target_key(device), []):
        for r in records:
            if applies(r["m"]) and base in r["speedup"]:
                out.append({"target": text, "shape": f"{r['m']}x{r['n']}x{r['k']}", "ratio": r["speedup"][base],
                            "goal": goal, "met": r["speedup"][base] >= goal})
    return out


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def make_table(records: list[dict], targets: list[dict] | None = None, peak_gflops: float | None = None) -> str:
    dense = records[0].get("dense", "bf16") if records else "bf16"
    baselines = sorted({b for r in records for b in r["speedup"] if b != "r1x+quant"},
                       key=lambda b: (b != dense, b))
    headers = (["M", "N", "K", "r1x ms", "TFLOP/s"] + (["% peak"] if peak_gflops else []) + ["GB/s", "r1x+quant ms"]
               + [f"vs {b}" for b in baselines] + ["calc_diff", "bf16 matmul calc_diff"])
    rows = []
    for r in records:
        row = [r["m"], r["n"], r["k"], _fmt_ms(r["times"]["r1x"]["median_s"]), f"{r['tflops']:.3f}"]
        row += [f"{100 * r['tflops'] * 1e3 / peak_gflops:.0f}%"] if peak_gflops else []
        row += [f"{r['gbps']:.1f}", _fmt_ms(r["times"]["r1x+quant"]["median_s"])]
        row += [f"{r['speedup'][b]:.2f}x" if b in r["speedup"] else "-" for b in baselines]
        row += [f"{r['calc_diff']:.1e}", f"{r.get('calc_diff_dense', r.get('calc_diff_bf16_matmul')):.1e}"]
        rows.append(row)
    table = format_table(headers, rows)
    if targets:
        met = sum(t["met"] for t in targets)
        table += (f"\n\nTargets ({met} of {len(targets)} met):\n\n"
                  + format_table(["target", "shape", "ratio", "met"],
                                 [[t["target"], t["shape"], f"{t['ratio']:.2f}x", "met" if t["met"] else "NOT met"]
                                  for t in targets]))
    return table


def plot(records: list[dict], path: str, title: str) -> None:
    """Top row: TFLOP/s of every method per (N, K) against M; bottom row: r1x's speed-up over
    each baseline but dequantize-then-matmul (off the chart), with 1x marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nks = sorted({(r["n"], r["k"]) for r in records}, key=lambda nk: NK_SHAPES.index(nk) if nk in NK_SHAPES else 99)
    fig, axes = plt.subplots(2, len(nks), figsize=(4 * len(nks), 6.6), squeeze=False)
    methods = list(records[0]["times"])
    baselines = [b for b in records[0]["speedup"] if b != "r1x+quant" and not b.startswith("dequant+")]
    for col, (n, k) in enumerate(nks):
        rs = sorted((r for r in records if (r["n"], r["k"]) == (n, k)), key=lambda r: r["m"])
        ax = axes[0][col]
        for meth in methods:
            xs = [r["m"] for r in rs if meth in r["times"]]
            ys = [r["flops"] / r["times"][meth]["median_s"] / 1e12 for r in rs if meth in r["times"]]
            ax.plot(xs, ys, marker="o", label=meth, linewidth=2.5 if meth == "r1x" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"N={n}, K={k}")
        ax.grid(True, which="both", alpha=0.3)
        ax = axes[1][col]
        for b in baselines:
            xs = [r["m"] for r in rs if b in r["speedup"]]
            ax.plot(xs, [r["speedup"][b] for r in rs if b in r["speedup"]], marker="o", label=f"vs {b}")
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("M (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s")
    axes[1][0].set_ylabel("r1x speed-up (x)")
    axes[0][-1].legend(fontsize=8)
    axes[1][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


TITLE = "r1x fp8_gemm vs baselines"


def run(device: str = "cpu", shapes=None, full: bool = False, out_dir: str | None = None,
        budget_s: float = 1.0, seed: int = 0, quiet: bool = False) -> dict:
    """Times the shapes (default: DeepSeek-V3's) and writes ``fp8_gemm_<cpu_<path>|cuda>.*``."""
    dev = torch.device(device)
    shapes = shapes or default_shapes(dev, full)
    timer = Timer(dev, budget_s=budget_s)
    gen = torch.Generator().manual_seed(seed)
    meta = machine_info(dev)
    peak = common.peak_gflops(dev)
    if peak:
        meta["peak"] = f"{peak[0]:.0f} GFLOP/s ({peak[1]}, measured on {meta['cpu_threads']} threads)"
    records = []
    for m, n, k in shapes:
        rec = bench_shape(m, n, k, dev, timer, gen)
        records.append(rec)
        if not quiet:
            sp = " ".join(f"{b}={v:.2f}x" for b, v in rec["speedup"].items())
            print(f"M={m:5d} N={n:6d} K={k:6d}  r1x {_fmt_ms(rec['times']['r1x']['median_s']):>9} ms "
                  f"{rec['tflops']:8.3f} TFLOP/s  {sp}  calc_diff={rec['calc_diff']:.1e}", flush=True)
    targets = evaluate_targets(records, dev)
    table = make_table(records, targets, peak[0] if peak else None)
    return common.publish(out_dir, result_name("fp8_gemm", dev), meta, records, targets, table,
                          plot, f"{TITLE}: {meta['device']}", quiet)


def replot(json_path: str) -> str:
    """Redraws the PNG next to a results JSON (no re-measuring)."""
    return common.replot(json_path, plot, TITLE)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        m, n, k = (int(v) for v in item.lower().split("x"))
        out.append((m, n, k))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", type=parse_shapes, default=None, help="MxNxK,MxNxK,...")
    p.add_argument("--full", action="store_true", help="all shapes, also the slow ones on the CPU")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON/markdown/PNG")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per method")
    common.add_isa_argument(p)
    args = p.parse_args(argv)
    if args.isa:
        print(common.cap_cpu_isa(args.isa), flush=True)
    run(args.device, args.shapes, args.full, args.out, args.budget)


if __name__ == "__main__":
    main()
