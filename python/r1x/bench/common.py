"""Timing and reporting shared by the microbenchmarks.

Timing follows DeepGEMM/FA3 practice: warm-up, then the median of many timed runs, each after
flushing the caches (a large buffer is rewritten between runs) so that every run reads its
inputs from memory, as a layer in a real model does.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch

# Per r1x CPU path, the like-for-like cap of torch's own CPU kernels: oneDNN (matmul, linear)
# through ONEDNN_MAX_CPU_ISA, ATen's vectorised kernels (softmax, elementwise) through
# ATEN_CPU_CAPABILITY. On an AMX Xeon, avx512 then measures what an AMD EPYC (AVX-512 +
# AVX512-BF16, no AMX) sees; avx2 what an older Xeon / Zen 2-3 / laptop sees, where the fair
# dense baseline is fp32 (oneDNN has no native bf16 below AVX512_CORE_BF16).
ONEDNN_ISA = {"amx": "AVX512_CORE_AMX", "avx512": "AVX512_CORE_BF16", "avx2": "AVX2", "generic": "SSE41"}
ATEN_CAPABILITY = {"amx": "avx512", "avx512": "avx512", "avx2": "avx2", "generic": "default"}
ISA_ORDER = ("generic", "avx2", "avx512", "amx")


def cap_cpu_isa(isa: str) -> str:
    """Runs r1x's CPU kernels on the ``isa`` path (generic, avx2, avx512, amx) and caps torch's
    CPU kernels to the same class, for this process and the subprocesses it starts; returns a
    one-line description for table headers.

    torch reads its caps when it first uses oneDNN / a vectorised kernel, so call this before
    anything is computed (``r1x bench --isa`` and the benchmark scripts do it first thing).
    Raises ``ValueError`` for an unknown path or one this CPU cannot run."""
    import r1x

    if isa not in ISA_ORDER:
        raise ValueError(f"isa must be one of {', '.join(ISA_ORDER)}, got {isa!r}")
    detected = r1x._C.detected_cpu_isa()
    if ISA_ORDER.index(isa) > ISA_ORDER.index(detected):
        raise ValueError(f"this CPU cannot run the {isa} path: it supports up to {detected}")
    os.environ["R1X_CPU_ISA"] = isa
    os.environ["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISA[isa]
    os.environ["ATEN_CPU_CAPABILITY"] = ATEN_CAPABILITY[isa]
    r1x._C.set_cpu_isa(isa)
    return baseline_note()


def baseline_note() -> str:
    """Which r1x CPU path runs and what torch's CPU kernels are capped at (for table headers)."""
    import r1x

    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    aten = torch.backends.cpu.get_cpu_capability()
    return (f"r1x CPU path: {r1x.cpu_isa()}; torch: oneDNN "
            + (f"capped at {onednn} (ONEDNN_MAX_CPU_ISA)" if onednn else "uncapped") + f", ATen {aten}")


def result_name(op: str, device: torch.device) -> str:
    """``<op>_cuda``, or ``<op>_cpu_<path>`` with the r1x CPU path that ran."""
    import r1x

    return f"{op}_cuda" if device.type == "cuda" else f"{op}_cpu_{r1x.cpu_isa()}"


def target_key(device: torch.device) -> str:
    """The key of a benchmark's per-path targets: ``cuda`` or ``cpu_<path>``."""
    import r1x

    return "cuda" if device.type == "cuda" else f"cpu_{r1x.cpu_isa()}"


def peak_gflops(device: torch.device) -> tuple[float, str] | None:
    """(GFLOP/s, instruction) of the active CPU path's GEMM instruction on all threads, measured
    now (about 50 ms); None on CUDA and on the generic path."""
    import r1x

    return None if device.type == "cuda" else r1x._C.cpu_peak()


def add_isa_argument(parser) -> None:
    parser.add_argument("--isa", choices=ISA_ORDER, default=None,
                        help="CPU: run r1x's kernels on this path and cap torch's oneDNN/ATen to the same "
                             "class (default: the best this CPU has, uncapped)")


@dataclass
class Timer:
    device: torch.device
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 1.0  # stop after max(min_reps, what fits in this budget)
    flush_bytes: int = 0
    _flush: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.flush_bytes == 0:
            # larger than the last-level cache: 512 MB on the CPU (L3 is up to a few hundred
            # MB on servers), 256 MB on a GPU (L2 is 50-60 MB on Hopper)
            self.flush_bytes = (256 if self.device.type == "cuda" else 512) << 20
        self._flush = torch.empty(self.flush_bytes // 4, dtype=torch.float32, device=self.device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flush(self):
        self._flush.fill_(1.0)
        self._sync()

    def compare(self, fns: dict, flush: bool = True) -> dict:
        """Times several functions with their runs interleaved (one run of each per round), so
        that the machine's slow and fast moments fall on all of them alike; returns the
        median seconds (and min/max/runs) of each. Runs continue until ``budget_s`` of timed
        runs, at least ``min_reps`` rounds."""
        for fn in fns.values():  # warm-up
            fn()
            fn()
        times = {name: [] for name in fns}
        spent = 0.0
        rounds = 0
        while rounds < self.max_reps and (rounds < self.min_reps or spent < self.budget_s):
            for name, fn in fns.items():
                t = self._time_one(fn, flush)
                times[name].append(t)
                spent += t
            rounds += 1
        return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                       "reps": len(ts)} for name, ts in times.items()}

    def _time_one(self, fn, flush: bool) -> float:
        if flush:
            self.flush()
        if self.device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def __call__(self, fn, flush: bool = True) -> dict:
        """Median seconds of ``fn()`` (with min/max and the number of runs)."""
        return self.compare({"fn": fn}, flush)["fn"]


def machine_info(device: torch.device) -> dict:
    import r1x

    d = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "r1x": r1x.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        d["device"] = torch.cuda.get_device_name(device)
        d["cuda"] = torch.version.cuda
    else:
        d["device"] = _cpu_model()
        d["cpu_threads"] = torch.get_num_threads()
        d["cpu_isa"] = r1x.cpu_isa()
        d["baseline"] = baseline_note()
    return d


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def format_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_results(out_dir: str, name: str, meta: dict, records: list[dict], table: str) -> dict:
    """Writes <name>.json and <name>.md under out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "md": os.path.join(out_dir, f"{name}.md")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "results": records}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(f"# {name}\n\n")
        f.write(", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n")
        f.write(table + "\n")
    return paths


def publish(out_dir: str | None, name: str, meta: dict, records: list[dict], targets: list, table: str,
            plot_fn=None, title: str = "", quiet: bool = False) -> dict:
    """The end of a benchmark run: the result dict (meta, records, targets, table); with
    ``out_dir``, ``<name>.json`` and ``.md`` (targets appended to the records) and, when
    matplotlib is installed, ``plot_fn(records, png_path, title)``'s ``<name>.png``; the table
    printed unless ``quiet``."""
    result = {"meta": meta, "records": records, "targets": targets, "table": table}
    if out_dir:
        paths = write_results(out_dir, name, meta, records + [{"kind": "targets", "targets": targets}], table)
        if plot_fn is not None:
            png = os.path.join(out_dir, f"{name}.png")
            try:
                plot_fn(records, png, title)
                paths["png"] = png
            except ImportError:
                pass  # matplotlib missing: table and JSON only
        result["paths"] = paths
    if not quiet:
        print(table)
    return result


def replot(json_path: str, plot_fn, title: str) -> str:
    """Redraws the PNG next to a results JSON written by :func:`publish` (no re-measuring):
    ``plot_fn(records, png_path, f"{title}: <device>")``; returns the PNG's path."""
    with open(json_path) as f:
        data = json.load(f)
    png = os.path.splitext(json_path)[0] + ".png"
    plot_fn([r for r in data["results"] if r.get("kind") != "targets"], png, f"{title}: {data['meta']['device']}")
    return png
