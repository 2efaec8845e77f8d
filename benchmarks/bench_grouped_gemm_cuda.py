#!/usr/bin/env python3
"""Throughput of r1x's CUDA grouped GEMMs on a Hopper GPU (the H200 check of the MoE kernels).

    python benchmarks/bench_grouped_gemm_cuda.py --out /tmp/grouped_gemm_cuda.json
    python benchmarks/bench_grouped_gemm_cuda.py --groups 4 --rows 8192 --n 4096 --k 7168

Times with CUDA events (median of the timed runs after warm-up, L2 flushed before each run):
  fp8_grouped_gemm (bf16 out)   vs DeepGEMM's m_grouped_fp8_gemm_nt_contiguous if it imports
  grouped_gemm (bf16)           vs torch._grouped_mm if this torch has it
for equal groups (the target shape: 4 x 8192 rows, N = 4096, K = 7168; >= 1100 TFLOP/s for FP8
on an H200) and for uneven groups (sizes that are not multiples of 128, one empty group). Each
r1x result is also checked against a per-group reference (fp8_gemm / torch.matmul) and reported
as calc_diff. Prints a table and writes the numbers as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


class CudaTimer:
    def __init__(self, reps: int, warmup: int, flush_mb: int = 256):
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(flush_mb << 18, dtype=torch.float32, device="cuda")

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.fill_(1.0)
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def group_sizes(kind: str, groups: int, rows: int) -> list[int]:
    if kind == "equal":
        return [rows] * groups
    # uneven: same total, sizes off the 128 grid, one empty group
    sizes = [0] + [rows + (37 * (i + 1) if i % 2 else -53 * (i + 1)) for i in range(groups - 1)]
    sizes[-1] += groups * rows - sum(sizes)
    return sizes


def offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).cuda()


def deep_gemm_fp8(qa, sa, qb, sb, sizes):
    """DeepGEMM's contiguous-layout grouped FP8 GEMM (groups padded to its M alignment), or a
    string saying why not."""
    try:
        import deep_gemm
    except ImportError:
        return None
    try:
        align = 128
        for name in ("get_mk_alignment_for_contiguous_layout",
                     "get_m_alignment_for_contiguous_layout"):
            if hasattr(deep_gemm, name):
                align = getattr(deep_gemm, name)()
                break
        padded = [(s + align - 1) // align * align for s in sizes]
        m_pad = sum(padded)
        k = qa.shape[1]
        a_p = torch.empty(m_pad, k, dtype=qa.dtype, device=qa.device)
        a_p.view(torch.uint8).zero_()
        s_p = torch.ones(m_pad, k // 128, dtype=torch.float32, device=qa.device)
        idx = torch.full((m_pad,), -1, dtype=torch.int32, device=qa.device)
        src = dst = 0
        for g, (s, p) in enumerate(zip(sizes, padded)):
            a_p[dst:dst + s] = qa[src:src + s]
            s_p[dst:dst + s] = sa[src:src + s]
            idx[dst:dst + s] = g
            src += s
            dst += p
        out = torch.empty(m_pad, qb.shape[1], dtype=torch.bfloat16, device=qa.device)
        fn = getattr(deep_gemm, "m_grouped_fp8_gemm_nt_contiguous", None) or \
            deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous
        fn((a_p, s_p), (qb, sb), out, idx)
        return lambda: fn((a_p, s_p), (qb, sb), out, idx)
    except Exception as e:  # noqa: BLE001 (any DeepGEMM failure just drops this baseline)
        return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def torch_grouped_mm(a, b, offs):
    if not hasattr(torch, "_grouped_mm"):
        return None
    bt = b.transpose(-2, -1)  # [G, K, N], column-major as _grouped_mm wants
    try:
        torch._grouped_mm(a, bt, offs=offs)
    except Exception as e:  # noqa: BLE001
        return str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    return lambda: torch._grouped_mm(a, bt, offs=offs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8192, help="rows per group (equal case)")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=7168)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_grouped_gemm_cuda: no CUDA device", file=sys.stderr)
        return 1
    import r1x  # noqa: F401 (registers torch.ops.r1x)

    ops = torch.ops.r1x
    g, n, k = args.groups, args.n, args.k
    gen = torch.Generator().manual_seed(0)
    timer = CudaTimer(args.reps, args.warmup)
    w = (torch.randn(g, n, k, generator=gen) * k**-0.5).to("cuda", torch.bfloat16)
    qb = torch.empty(g, n, k, dtype=torch.float8_e4m3fn, device="cuda")
    sb = torch.empty(g, (n + 127) // 128, k // 128, dtype=torch.float32, device="cuda")
    for e in range(g):
        q, s = ops.quant_fp8_per_block(w[e], 128, False)
        qb[e].copy_(q)
        sb[e].copy_(s)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "groups": g, "n": n, "k": k}
    records = []

    for kind in ("equal", "uneven"):
        sizes = group_sizes(kind, g, args.rows)
        m = sum(sizes)
        offs = offsets(sizes)
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        qa, sa = ops.quant_fp8_per_token_group(x, 128, False)
        flops = 2.0 * m * n * k
        bounds = offs.tolist()
        starts = [0] + bounds[:-1]

        # ---- FP8
        out = ops.fp8_grouped_gemm(qa, sa, qb, sb, offs, torch.bfloat16)
        ref = torch.cat([ops.fp8_gemm(qa[s:e], sa[s:e], qb[i], sb[i], torch.float32)
                         for i, (s, e) in enumerate(zip(starts, bounds)) if e > s])
        diff = calc_diff(out[:bounds[-1]].float(), ref)
        t = timer(lambda: ops.fp8_grouped_gemm(qa, sa, qb, sb, offs, torch.bfloat16))
        rec = {"op": "fp8_grouped_gemm", "case": kind, "sizes": sizes, "impl": "r1x",
               "tflops": flops / t["median_s"] / 1e12, "calc_diff": diff, **t}
        records.append(rec)
        dg = deep_gemm_fp8(qa, sa, qb, sb, sizes)
        if callable(dg):
            t = timer(dg)
            records.append({"op": "fp8_grouped_gemm", "case": kind, "sizes": sizes,
                            "impl": "deep_gemm", "tflops": flops / t["median_s"] / 1e12, **t})
        elif dg is not None:
            records.append({"op": "fp8_grouped_gemm", "case": kind, "impl": "deep_gemm",
                            "skipped": dg})

        # ---- bf16
        out = ops.grouped_gemm(x, w, offs)
        ref = torch.cat([x[s:e].float() @ w[i].float().T
                         for i, (s, e) in enumerate(zip(starts, bounds)) if e > s])
        diff = calc_diff(out[:bounds[-1]].float(), ref)
        t = timer(lambda: ops.grouped_gemm(x, w, offs))
        records.append({"op": "grouped_gemm_bf16", "case": kind, "sizes": sizes, "impl": "r1x",
                        "tflops": flops / t["median_s"] / 1e12, "calc_diff": diff, **t})
        tg = torch_grouped_mm(x, w, offs)
        if callable(tg):
            t = timer(tg)
            records.append({"op": "grouped_gemm_bf16", "case": kind, "sizes": sizes,
                            "impl": "torch._grouped_mm", "tflops": flops / t["median_s"] / 1e12,
                            **t})
        elif tg is not None:
            records.append({"op": "grouped_gemm_bf16", "case": kind, "impl": "torch._grouped_mm",
                            "skipped": tg})
        del x, qa, sa, out, ref

    print(f"{meta['device']}: groups={g} N={n} K={k}")
    print(f"{'op':<20} {'case':<7} {'impl':<18} {'ms':>9} {'TFLOP/s':>9} {'calc_diff':>10}")
    for r in records:
        if "skipped" in r:
            print(f"{r['op']:<20} {r['case']:<7} {r['impl']:<18} skipped: {r['skipped']}")
            continue
        cd = f"{r['calc_diff']:.2e}" if "calc_diff" in r else ""
        print(f"{r['op']:<20} {r['case']:<7} {r['impl']:<18} {r['median_s'] * 1e3:9.3f} "
              f"{r['tflops']:9.1f} {cd:>10}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": records}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
