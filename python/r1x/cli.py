"""The ``r1x`` command.

    r1x info                 what r1x was built with and what this machine offers
    r1x bench [--op fp8_gemm|moe|mla|model|all] [--shapes MxNxK,...] [--tokens T,...] [--out DIR]
                             microbenchmarks against baselines (table, JSON, PNG)
"""

from __future__ import annotations

import argparse
import json
import sys

BENCHMARKS = ("fp8_gemm", "moe", "mla", "model")


def _cmd_info(args) -> int:
    import r1x

    print(json.dumps(r1x.info(), indent=2))
    return 0


def _cmd_bench(args) -> int:
    import torch

    from r1x.bench import fp8_gemm, mla, moe
    from r1x.bench import model as model_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = BENCHMARKS if args.op == "all" else (args.op,)
    for op in ops:
        print(f"== {op} on {device} ==", flush=True)
        if op == "fp8_gemm":
            shapes = fp8_gemm.parse_shapes(args.shapes) if args.shapes else None
            res = fp8_gemm.run(device, shapes, args.full, args.out, args.budget)
        elif op == "moe":
            tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
            res = moe.run(device, args.full, args.out, args.budget, tokens=tokens)
        elif op == "mla":
            res = mla.run(device, args.full, args.out, args.budget)
        elif op == "model":
            res = model_bench.run(device, args.full, args.out, args.budget)
        for kind, path in res.get("paths", {}).items():
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1x", description="r1x: kernels and the DeepSeek-R1 recipe")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build and machine information").set_defaults(func=_cmd_info)
    b = sub.add_parser("bench", help="microbenchmarks against baselines")
    b.add_argument("--op", choices=("all",) + BENCHMARKS, default="all")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--shapes", default=None, help="fp8_gemm: MxNxK,MxNxK,... (default: DeepSeek-V3 shapes)")
    b.add_argument("--tokens", default=None, help="moe: only these token counts T, e.g. 1,16 (default: all)")
    b.add_argument("--full", action="store_true", help="every default shape, also the slow CPU ones")
    b.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per method")
    b.add_argument("--out", default="r1x-bench", help="output folder (default: ./r1x-bench)")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
