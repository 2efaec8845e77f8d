"""The benchmark harness: per-path runs (``r1x bench --isa``), result naming, targets."""

import json
import os
import subprocess
import sys

import pytest
import torch

import r1x
from r1x.bench import common, fp8_gemm

PATHS = ["generic", "avx2", "avx512", "amx"]
DETECTED = r1x._C.detected_cpu_isa()


def test_cap_cpu_isa_rejects_unknown_and_unavailable_paths():
    with pytest.raises(ValueError, match="isa must be one of"):
        common.cap_cpu_isa("sse9")
    above = PATHS[PATHS.index(DETECTED) + 1:]
    for isa in above:
        with pytest.raises(ValueError, match=f"cannot run the {isa} path"):
            common.cap_cpu_isa(isa)


def test_cpu_peak_is_measured_per_path():
    for isa in PATHS[: PATHS.index(DETECTED) + 1]:
        with r1x.use_cpu_isa(isa):
            peak = r1x._C.cpu_peak()
        if isa == "generic":
            assert peak is None
        else:
            gflops, unit = peak
            assert gflops > 1.0 and unit


@pytest.mark.skipif(DETECTED == "generic", reason="needs a vector path")
def test_bench_isa_runs_the_path_against_capped_torch(tmp_path):
    """A fresh process (torch reads its caps once): the lowest vector path, fp8_gemm on one tiny
    shape; the result is named after the path and says how torch was capped."""
    env = dict(os.environ)
    for var in ("R1X_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "r1x.cli", "bench", "--device", "cpu", "--op", "fp8_gemm", "--isa", "avx2",
           "--shapes", "1x256x256,130x256x256", "--budget", "0.01", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "r1x CPU path: avx2" in res.stdout and "AVX2 (ONEDNN_MAX_CPU_ISA)" in res.stdout
    md = (tmp_path / "fp8_gemm_cpu_avx2.md").read_text()
    assert "capped at AVX2" in md and "ATen AVX2" in md and "vs fp32" in md
    data = json.loads((tmp_path / "fp8_gemm_cpu_avx2.json").read_text())
    recs = [r for r in data["results"] if r.get("kind") != "targets"]
    assert data["meta"]["cpu_isa"] == "avx2" and [r["m"] for r in recs] == [1, 130]
    assert all("fp32" in r["speedup"] and "dequant+fp32" in r["speedup"] for r in recs)
    assert all(r["calc_diff"] < 1e-10 for r in recs)
    targets = next(r for r in data["results"] if r.get("kind") == "targets")["targets"]
    assert {t["shape"] for t in targets} == {"1x256x256", "130x256x256"}


def test_bench_isa_refuses_a_path_the_cpu_lacks():
    if DETECTED == "amx":
        pytest.skip("this CPU runs every path")
    res = subprocess.run([sys.executable, "-m", "r1x.cli", "bench", "--device", "cpu", "--op", "fp8_gemm",
                          "--isa", "amx"], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "cannot run the amx path" in res.stderr


@pytest.mark.skipif(DETECTED not in ("avx512", "amx"), reason="needs the avx512 path")
def test_fp8_targets_follow_the_path():
    recs = [{"m": m, "n": 7168, "k": 2048, "speedup": {"bf16": v, "dequant+bf16": 3.0}}
            for m, v in ((1, 2.5), (16, 1.2), (128, 0.9))]
    with r1x.use_cpu_isa("avx512"):
        got = fp8_gemm.evaluate_targets(recs, torch.device("cpu"))
        by = {(t["target"], t["shape"]): t["met"] for t in got}
        assert by[("M = 1: >= 2x bf16 matmul", "1x7168x2048")]
        assert not by[("M = 16: >= 1.5x bf16 matmul", "16x7168x2048")]
        assert by[("M >= 128: >= 0.85x bf16 matmul", "128x7168x2048")]
        assert sum(t["target"].startswith("never slower") for t in got) == 3


def test_moe_bench_grouped_gemm_against_one_matmul():
    """The CPU grouped GEMM measurement: r1x.grouped_gemm against one matmul of the same FLOPs,
    with the issue target evaluated on the avx512 path."""
    from r1x.bench import moe

    dev = torch.device("cpu")
    timer = common.Timer(dev, budget_s=0.01)
    rec = moe.bench_grouped_gemm_cpu(dev, timer, torch.Generator().manual_seed(0), groups=3, rows=8, n=40, k=64)
    assert rec["kind"] == "grouped_gemm" and rec["t"] == 24 and set(rec["times"]) == {"r1x", "one matmul"}
    assert rec["speedup"]["one matmul"] > 0 and all(v > 0 for v in rec["tflops"].values())
    table = moe.make_table([rec])
    assert "3x8x40x64" in table and "one matmul" in table
    fake = dict(rec, t=8 * 512)
    with r1x.use_cpu_isa("generic"):  # no target on generic
        assert moe.evaluate_targets([fake], dev) == []
