"""Where each CPU path stands: every target of every committed CPU result
(``benchmarks/results/<op>_cpu_<path>.json``), one row per (path, op, target) with the range of
its measured ratios and how many of its cases meet it.

    python benchmarks/cpu_paths.py            # print the table
    python benchmarks/cpu_paths.py --readme   # also write it into README.md (between the
                                              # cpu_paths markers)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PATHS = ["amx", "avx512", "avx2", "generic"]
OPS = ["fp8_gemm", "moe", "mla", "model"]
BEGIN, END = "<!-- cpu_paths: begin -->", "<!-- cpu_paths: end -->"


def _value(t: dict) -> float | None:
    return t.get("ratio", t.get("value"))


def _fmt(v: float, text: str) -> str:
    if "share" in text:
        return f"{v:.1%}"
    if "linear" in text:
        return f"{v:.2f}"
    return f"{v:.2f}x"


def rows() -> tuple[list[list[str]], list[str]]:
    out, sources = [], []
    for path in PATHS:
        for op in OPS:
            f = os.path.join(RESULTS, f"{op}_cpu_{path}.json")
            if not os.path.exists(f):
                continue
            with open(f) as fh:
                data = json.load(fh)
            meta = data["meta"]
            sources.append(f"`{path}` {op}: {meta.get('device', '?')}, {meta.get('date', '?')}")
            targets = [t for r in data["results"] if r.get("kind") == "targets" for t in r["targets"]]
            by_text: dict[str, list[dict]] = {}
            for t in targets:
                by_text.setdefault(t["target"], []).append(t)
            if not by_text:
                out.append([f"`{path}`", op, "(no targets recorded in this result)", "-", "-"])
            for text, ts in by_text.items():
                vals = [_value(t) for t in ts if _value(t) is not None]
                rng = (_fmt(min(vals), text) if len(vals) == 1 or min(vals) == max(vals)
                       else f"{_fmt(min(vals), text)} - {_fmt(max(vals), text)}") if vals else "-"
                judged = [t for t in ts if t.get("met") is not None]
                met = sum(bool(t["met"]) for t in judged)
                status = "-" if not judged else ("**met**" if met == len(judged) else f"{met} of {len(judged)}")
                out.append([f"`{path}`", op, re.sub(r"\s+", " ", text), rng, status])
    return out, sources


def table() -> str:
    body, sources = rows()
    head = ["path", "op", "target", "measured", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n\nRuns: " + "; ".join(sources) + "."


def write_readme(text: str) -> None:
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        readme = f.read()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    with open(path, "w") as f:
        f.write(readme[:start] + "\n" + text + "\n" + readme[end:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = p.parse_args(argv)
    text = table()
    print(text)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
