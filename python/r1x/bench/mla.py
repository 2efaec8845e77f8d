"""Benchmark of the Multi-head Latent Attention ops (:func:`r1x.mla_attention`,
:func:`r1x.mla_decode`) against baselines measured in the same run, with runs interleaved
(:meth:`Timer.compare`) and caches flushed between runs. Every r1x result is checked against
its baseline's output (``calc_diff``, printed and saved). Measurements:

* ``train fwd`` and ``train fwd+bwd``: :func:`r1x.mla_attention` on packed ``[T, H, D]``
  equal-length causal sequences, H = 16, qk head dim 192, v head dim 128 (DeepSeek-V3),
  bfloat16 and float32; B x L = 4 x 512, 2 x 1024, 1 x 2048 on the CPU (``--full`` adds
  1 x 4096 and 1 x 8192), 16384 tokens per batch from L = 512 to 8192 on CUDA (``--full``
  adds 1 x 16384). Baseline: ``F.scaled_dot_product_attention(is_causal=True)`` on contiguous
  ``[B, H, L, D]`` tensors, once per SDPA backend (``sdpa_kernel`` with each ``SDPBackend``:
  math, flash, efficient, cudnn); a backend that refuses these dims or dtype, or whose
  score matrices would not fit in memory (math), is reported unavailable with its reason.
  Reported: ms, TFLOP/s of the causal FLOPs (forward ``2 * B * H * (L^2 / 2) * (Dqk + Dv)``,
  backward 2.5x that), the speed-up over each backend and over the fastest one; calc_diff of
  the output (and of dq, dk, dv for fwd+bwd; the largest is shown) against each backend.
* ``memory``: the extra peak memory of one r1x fwd+bwd (B = 1, H = 16, bf16) against the
  length, L = 1024, 2048, 4096, 8192 (``--full`` adds 16384; CUDA 1024 .. 16384, ``--full``
  adds 32768 and 65536), and of SDPA math where its L x L matrices fit. On the CPU each point
  runs in a fresh subprocess: peak resident memory during the call minus the resident memory
  before it (the process's own high-water mark, ``VmHWM``, reset through
  ``/proc/self/clear_refs``; ``ru_maxrss`` where /proc is missing: it also counts the
  parent's peak on Linux, inherited across exec). On CUDA, in process:
  ``max_memory_allocated - memory_allocated``. Reported: bytes per token and the ratio of
  successive points (linear growth: the length ratio, 2; quadratic: 4).
* ``decode`` (absorbed): :func:`r1x.mla_decode`, D = 576 (kv_lora_rank 512 + rope 64),
  dv = 512, block_size 64 with a randomly permuted block table, softmax scale 192^-0.5,
  bottom-right causal; B = 8, H = 16 at (Sq, context) = (1, 4096), (2, 4096), (1, 1024),
  bfloat16 and float32 (``--full`` adds context 16384); on CUDA also the H200 shapes, bf16:
  B = 128, H = 16, Sq = 1, context 8192 (GB/s) and B = 128, H = 128, Sq = 2, context 8192
  (TFLOP/s). Baselines: ``einsum``, the naive absorbed attention of DeepSeek-V3's inference
  code over a contiguous ``[B, ctx, D]`` copy of the cache (``einsum`` scores, fp32 softmax,
  ``einsum`` with the first dv columns); ``non-absorbed``, what a model without absorption
  does at every step: per sequence, decompress the latents with ``wkv_b [H * (128 + 128), 512]``
  into K (k_nope and the shared rope part, 192 per head) and V (128), then SDPA; it is timed
  against ``r1x+proj`` (the query absorbed through wkv_b's K half, :func:`r1x.mla_decode`, the
  output projected through its V half: the same [B, Sq, H, 128] result); on CUDA ``flash_mla``
  (FlashMLA's ``flash_mla_with_kvcache``) when importable. GB/s: bytes of the cache read once
  / time; TFLOP/s: ``2 * B * Sq * H * ctx * (D + dv)`` / time.

TARGETS lists what each measurement should reach, per device; the table ends with them.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F

import r1x
from r1x.bench import common
from r1x.bench.common import Timer, device_tag, format_table, machine_info, publish
from r1x.testing import calc_diff

TITLE = "r1x MLA vs baselines"  # of the plots

H, DQK, DV = 16, 192, 128  # training: heads, qk head dim (128 nope + 64 rope), v head dim
D_LATENT, D_ROPE, NOPE, VHEAD = 512, 64, 128, 128  # decode: kv_lora_rank, rope, per-head k_nope / v
D_DECODE = D_LATENT + D_ROPE  # 576
BLOCK = 64
DECODE_SCALE = (NOPE + D_ROPE) ** -0.5
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

TRAIN_SHAPES = {"cpu": [(4, 512), (2, 1024), (1, 2048)], "cpu_full": [(1, 4096), (1, 8192)],
                "cuda": [(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192)], "cuda_full": [(1, 16384)]}
MEM_LENS = {"cpu": [1024, 2048, 4096, 8192], "cpu_full": [16384],
            "cuda": [1024, 2048, 4096, 8192, 16384], "cuda_full": [32768, 65536]}
# (B, H, Sq, context)
DECODE_SHAPES = {"cpu": [(8, 16, 1, 4096), (8, 16, 2, 4096), (8, 16, 1, 1024)], "cpu_full": [(8, 16, 1, 16384)],
                 "cuda": [(8, 16, 1, 4096), (8, 16, 2, 4096), (8, 16, 1, 1024)], "cuda_full": [(8, 16, 1, 16384)]}
H200_DECODE = [(128, 16, 1, 8192), (128, 128, 2, 8192)]  # bf16 only (FlashMLA's dtype)

SDPA_BACKENDS = [("sdpa_math", "MATH"), ("sdpa_flash", "FLASH_ATTENTION"),
                 ("sdpa_efficient", "EFFICIENT_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")]
# SDPA math's peak in fp32 [B, H, L, L] matrices (fwd+bwd measured on the CPU: about 4 at bf16
# and fp32; these add a margin); points that would need over MEM_FRACTION of the free memory
# are skipped rather than left to the OOM killer
MATH_LL_FP32 = {"fwd": 2.5, "fwd+bwd": 5.0}
MEM_FRACTION = 0.6
MEM_CHILD_TIMEOUT_S = 1800


def _decode_h200(r):
    return (r["b"], r["h"], r["sq"], r["ctx"]) == (128, 16, 1, 8192) and r["dtype"] == "bfloat16"


def _decode_h128(r):
    return r["h"] == 128 and r["sq"] == 2 and r["dtype"] == "bfloat16"


# What each measurement should reach, per device: (kind, metric, key, applies(record), goal, text).
# metric "speedup": rec["speedup"][key] (r1x / baseline), "gbps"/"tflops": rec[metric][key].
# The key is "cuda" or "cpu_<path>" (the r1x CPU path that ran, torch capped alike).
def _decode_4096(r):
    return (r["b"], r["h"], r["sq"], r["ctx"]) == (8, 16, 1, 4096) and r["dtype"] == "bfloat16"


TARGETS = {
    "cpu_amx": [("decode", "speedup", "einsum", lambda r: True, 1.5, "decode >= 1.5x the naive absorbed einsum"),
                ("decode", "speedup", "non-absorbed", lambda r: True, 5.0,
                 "decode (absorbed, with projections) >= 5x the non-absorbed path"),
                ("train fwd+bwd", "speedup", "fastest", lambda r: True, 1.5,
                 "training fwd+bwd >= 1.5x the fastest SDPA backend")],
    "cpu_avx512": [("decode", "speedup", "einsum", _decode_4096, 1.5,
                    "decode bf16 (B=8, H=16, ctx 4096) >= 1.5x the naive absorbed einsum"),
                   ("decode", "speedup", "fp32", lambda r: r["dtype"] == "bfloat16", 1.0,
                    "decode bf16 no slower than fp32 (fp32 time / bf16 time)"),
                   ("train fwd+bwd", "speedup", "sdpa_math", lambda r: r["dtype"] == "bfloat16", 3.0,
                    "training fwd+bwd bf16 >= 3x sdpa_math")],
    "cuda": [("decode", "gbps", "r1x", _decode_h200, 3000.0, "decode >= 3000 GB/s (B=128, H=16, ctx 8192, Sq=1)"),
             ("decode", "tflops", "r1x", _decode_h128, 550.0, "decode >= 550 TFLOP/s (B=128, H=128, ctx 8192, Sq=2)"),
             ("train fwd", "tflops", "r1x", lambda r: r["dtype"] == "bfloat16" and r["l"] >= 4096, 450.0,
              "training forward >= 450 TFLOP/s (bf16, 192/128, L >= 4096)")],
}
# r1x's fwd+bwd memory counts as linear in L when each point is at most this times the length
# ratio over the previous one (quadratic growth gives 2x the length ratio)
LINEAR_SLACK = 1.25


def default_plan(device: torch.device, full: bool = False) -> dict:
    tag = device_tag(device)
    extra = (lambda table: table[f"{tag}_full"]) if full else (lambda table: [])  # noqa: E731
    decode = [(s, d) for d in ("bf16", "fp32") for s in DECODE_SHAPES[tag] + extra(DECODE_SHAPES)]
    if device.type == "cuda":
        decode += [(s, "bf16") for s in H200_DECODE]
    return {"train": TRAIN_SHAPES[tag] + extra(TRAIN_SHAPES), "memory": MEM_LENS[tag] + extra(MEM_LENS),
            "decode": decode}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _randn(shape, dtype, device, gen, scale=1.0):
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return (x * scale if scale != 1.0 else x).to(dtype)


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:140] if text else ''}"


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not skip


def _release(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _math_too_big(device, b, l, mode) -> str | None:
    need = MATH_LL_FP32[mode] * b * H * l * l * 4
    free = _free_bytes(device)
    if need > MEM_FRACTION * free:
        return f"skipped: its L x L matrices need about {need / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"
    return None


def sdpa_backends():
    """``(name, SDPBackend)`` for the backends this torch knows (whether they run here is
    tried on the real inputs)."""
    from torch.nn.attention import SDPBackend

    return [(name, getattr(SDPBackend, attr)) for name, attr in SDPA_BACKENDS if hasattr(SDPBackend, attr)]


def _sdpa(backend, q, k, v, scale):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def causal_flops(b: int, l: int, dqk: int = DQK, dv: int = DV) -> float:
    """Forward FLOPs of causal attention (half the L x L scores); the backward is 2.5x this."""
    return 2.0 * b * H * (l * l / 2) * (dqk + dv)


def _speedups(rec: dict, ours: str, bases) -> dict:
    t = rec["times"][ours]["median_s"]
    rec.setdefault("speedup", {}).update({b: rec["times"][b]["median_s"] / t for b in bases if b in rec["times"]})
    return rec


# ----------------------------------------------------------------------------------------------
# training attention
# ----------------------------------------------------------------------------------------------
def bench_train(b, l, dtype, mode, device, timer, gen) -> dict:
    """One (B, L, dtype) point, ``mode`` "fwd" or "fwd+bwd": r1x against each SDPA backend."""
    t = b * l
    scale = DQK ** -0.5
    rec = {"kind": f"train {mode}", "dtype": str(dtype).replace("torch.", ""), "b": b, "l": l, "h": H,
           "dqk": DQK, "dv": DV, "flops": causal_flops(b, l) * (3.5 if mode == "fwd+bwd" else 1.0),
           "times": {}, "speedup": {}, "calc_diff": {}, "notes": {}}
    q, k = _randn((t, H, DQK), dtype, device, gen), _randn((t, H, DQK), dtype, device, gen)
    v = _randn((t, H, DV), dtype, device, gen)
    cu = (torch.arange(b + 1, dtype=torch.int32) * l).to(device)
    bhld = lambda x: x.view(b, l, H, x.shape[-1]).transpose(1, 2).contiguous()  # noqa: E731
    packed = lambda x: x.transpose(1, 2).reshape(t, H, x.shape[-1])  # noqa: E731
    qs, ks, vs = bhld(q), bhld(k), bhld(v)

    if mode == "fwd":
        def r1x_fn():
            return r1x.mla_attention(q, k, v, cu, True, scale)

        def sdpa_fn(backend):
            return lambda: _sdpa(backend, qs, ks, vs, scale)

        def result(fn, is_r1x):
            out = fn()
            return [out if is_r1x else packed(out)]
        grad_mode = torch.no_grad
    else:
        g = _randn((t, H, DV), dtype, device, gen)
        gs = bhld(g)
        for x in (q, k, v, qs, ks, vs):
            x.requires_grad_()

        def r1x_fn():
            q.grad = k.grad = v.grad = None
            out = r1x.mla_attention(q, k, v, cu, True, scale)
            out.backward(g)
            return out

        def sdpa_fn(backend):
            def step():
                qs.grad = ks.grad = vs.grad = None
                out = _sdpa(backend, qs, ks, vs, scale)
                out.backward(gs)
                return out
            return step

        def result(fn, is_r1x):
            out = fn()
            if is_r1x:
                return [out.detach(), q.grad, k.grad, v.grad]
            return [packed(out.detach()), packed(qs.grad), packed(ks.grad), packed(vs.grad)]
        grad_mode = torch.enable_grad

    with grad_mode():
        try:
            ours = result(r1x_fn, True)
        except (RuntimeError, NotImplementedError) as e:
            rec["notes"]["r1x"] = _why(e)
            return rec
        methods = {"r1x": r1x_fn}
        for name, backend in sdpa_backends():
            why = _math_too_big(device, b, l, mode) if name == "sdpa_math" else None
            if why is None:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        theirs = result(sdpa_fn(backend), False)
                    rec["calc_diff"][name] = max(calc_diff(x, y) for x, y in zip(ours, theirs))
                    methods[name] = sdpa_fn(backend)
                    del theirs
                except (RuntimeError, NotImplementedError) as e:
                    why = "unavailable: " + _why(e)
            if why is not None:
                rec["notes"][name] = why
                _release(device)
        del ours
        rec["times"] = timer.compare(methods)
    rec["tflops"] = {m: rec["flops"] / v["median_s"] / 1e12 for m, v in rec["times"].items()}
    sdpa = [m for m in rec["times"] if m != "r1x"]
    _speedups(rec, "r1x", sdpa)
    if sdpa:
        rec["fastest"] = min(sdpa, key=lambda m: rec["times"][m]["median_s"])
        rec["speedup"]["fastest"] = rec["speedup"][rec["fastest"]]
    return rec


# ----------------------------------------------------------------------------------------------
# peak memory against the sequence length
# ----------------------------------------------------------------------------------------------
_MARK = "@@r1x-mla-memory@@"
_CHILD = ("import json, sys; from r1x.bench.mla import memory_point, _MARK; "
          "print(_MARK + json.dumps(memory_point(**json.loads(sys.argv[1]))), flush=True)")


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets this process's peak RSS (VmHWM) to its current RSS
        return _proc_status("VmHWM") is not None
    except OSError:
        return False


def memory_point(method: str, l: int, b: int = 1, h: int = H, dtype: str = "bfloat16", device: str = "cpu",
                 seed: int = 0) -> dict:
    """Extra peak memory of one fwd+bwd of ``method`` ("r1x" or "sdpa_math") at B x L; meant to
    run alone in a fresh process on the CPU (see the module docstring)."""
    import resource

    dev, dt = torch.device(device), getattr(torch, dtype)

    def setup(length):
        gen = torch.Generator(device=dev).manual_seed(seed)
        t = b * length
        cu = (torch.arange(b + 1, dtype=torch.int32) * length).to(dev)
        if method == "r1x":  # packed [T, H, D]
            shapes = [(t, h, DQK), (t, h, DQK), (t, h, DV), (t, h, DV)]
        else:  # [B, H, L, D]
            shapes = [(b, h, length, DQK), (b, h, length, DQK), (b, h, length, DV), (b, h, length, DV)]
        q, k, v, g = (_randn(s, dt, dev, gen) for s in shapes)
        for x in (q, k, v):
            x.requires_grad_()

        def step():
            if method == "r1x":
                out = r1x.mla_attention(q, k, v, cu, True, DQK ** -0.5)
            else:
                from torch.nn.attention import SDPBackend

                out = _sdpa(SDPBackend.MATH, q, k, v, DQK ** -0.5)
            out.backward(g)
        return step

    setup(min(l, 128))()  # lazy initialisation (thread pools, kernels) outside the measurement
    step = setup(l)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        peak, source = torch.cuda.max_memory_allocated(dev), "torch.cuda.max_memory_allocated"
    elif _reset_hwm():
        base = _proc_status("VmRSS")
        step()
        peak, source = _proc_status("VmHWM"), "VmHWM (reset by /proc/self/clear_refs) - VmRSS before"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss after - before"
    return {"base_bytes": base, "peak_bytes": peak, "extra_bytes": max(peak - base, 0), "source": source}


def measure_memory(method: str, l: int, device: torch.device, b: int = 1, dtype: str = "bfloat16") -> dict:
    """:func:`memory_point` in a fresh subprocess (CPU) or in this process (CUDA)."""
    kw = {"method": method, "l": l, "b": b, "h": H, "dtype": dtype, "device": device.type}
    if device.type == "cuda":
        _release(device)
        try:
            return memory_point(**kw)
        finally:
            _release(device)
    # glibc: a fixed mmap threshold (no dynamic growth) gives every large tensor its own mapping,
    # returned to the system when freed, so that no freed-but-resident heap memory is reused
    # unseen during the measured call
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    p = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(kw)], capture_output=True, text=True,
                       timeout=MEM_CHILD_TIMEOUT_S, env=env)
    for line in p.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (p.stderr.strip().splitlines() or [""])[-1][:160]
    raise RuntimeError(f"subprocess exit {p.returncode}" + (" (killed: out of memory?)" if p.returncode == -9 else "")
                       + (f": {tail}" if tail else ""))


def bench_memory(lens, device) -> list[dict]:
    """One record per L with each method's extra bytes, bytes per token and growth."""
    recs = []
    for l in sorted(lens):
        rec = {"kind": "memory", "dtype": "bfloat16", "b": 1, "l": l, "h": H, "extra_bytes": {},
               "bytes_per_token": {}, "ratio_prev": {}, "notes": {}}
        for method in ("r1x", "sdpa_math"):
            why = _math_too_big(device, 1, l, "fwd+bwd") if method == "sdpa_math" else None
            if why is None:
                try:
                    point = measure_memory(method, l, device)
                    rec["extra_bytes"][method] = point["extra_bytes"]
                    rec["bytes_per_token"][method] = point["extra_bytes"] / l
                    rec["source"] = point["source"]
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    why = _why(e)
            if why is not None:
                rec["notes"][method] = why
            prev = recs[-1] if recs else None
            if prev and method in prev["extra_bytes"] and method in rec["extra_bytes"] and prev["extra_bytes"][method]:
                rec["ratio_prev"][method] = rec["extra_bytes"][method] / prev["extra_bytes"][method]
        rec["length_ratio"] = l / recs[-1]["l"] if recs else None
        recs.append(rec)
    return recs


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
def naive_absorbed(q, cache, dv, scale, mask=None):
    """DeepSeek-V3's absorbed attention over a contiguous latent cache ``[B, ctx, D]``:
    einsum scores, fp32 softmax, einsum with the first ``dv`` columns."""
    scores = torch.einsum("bshc,btc->bsht", q, cache) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
    p = scores.softmax(dim=-1, dtype=torch.float32).type_as(q)
    return torch.einsum("bsht,btc->bshc", p, cache[..., :dv])


def non_absorbed(q_nope, q_pe, cache, wkv_b, scale, mask=None):
    """Decode without absorption: per sequence, decompress the latents into per-head K
    (k_nope + the shared rope part) and V with ``wkv_b``, then SDPA. ``[B, Sq, H, 128]``."""
    b, _, h, _ = q_nope.shape
    ctx = cache.shape[1]
    outs = []
    for i in range(b):
        kv = F.linear(cache[i, :, :D_LATENT], wkv_b).view(ctx, h, NOPE + VHEAD)
        k = torch.cat([kv[..., :NOPE], cache[i, :, None, D_LATENT:].expand(ctx, h, D_ROPE)], dim=-1)
        q = torch.cat([q_nope[i], q_pe[i]], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), kv[..., NOPE:].transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.stack(outs)


def absorb_query(q_nope, q_pe, w_k):
    return torch.cat([torch.einsum("bshd,hdc->bshc", q_nope, w_k), q_pe], dim=-1)


def flash_mla_fn(q, kv_cache, block_table, cache_seqlens, dv, scale):
    """FlashMLA's decode as a closure, or the reason it cannot run. Works with its first API
    (metadata from ``get_mla_metadata(cache_seqlens, Sq * H, 1)``) and the later one (which
    ignores those arguments and schedules on the first call)."""
    try:
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata
    except ImportError as e:
        return None, f"not importable ({e})"
    blocked = kv_cache.unsqueeze(2)  # [num_blocks, block_size, h_kv = 1, D]
    try:
        meta, splits = get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1)

        def fn():
            return flash_mla_with_kvcache(q, blocked, block_table, cache_seqlens, dv, meta, splits,
                                          softmax_scale=scale, causal=True)
        fn()
        return fn, None
    except Exception as e:  # noqa: BLE001 - any failure of a third-party baseline is a note
        return None, _why(e)


def bench_decode(b, h, sq, ctx, dtype, device, timer, gen, cpu_gen) -> dict:
    rec = {"kind": "decode", "dtype": str(dtype).replace("torch.", ""), "b": b, "h": h, "sq": sq, "ctx": ctx,
           "d": D_DECODE, "dv": D_LATENT, "block_size": BLOCK, "times": {}, "speedup": {}, "calc_diff": {},
           "notes": {}}
    nb = math.ceil(ctx / BLOCK)
    kv_cache = _randn((b * nb, BLOCK, D_DECODE), dtype, device, gen)
    block_table = torch.randperm(b * nb, generator=cpu_gen).view(b, nb).to(device, torch.int32)
    cache = kv_cache[block_table.long()].view(b, nb * BLOCK, D_DECODE)[:, :ctx].contiguous()
    cache_seqlens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    wkv_b = _randn((h * (NOPE + VHEAD), D_LATENT), dtype, device, gen, D_LATENT ** -0.5)
    w = wkv_b.view(h, NOPE + VHEAD, D_LATENT)
    w_k, w_v = w[:, :NOPE], w[:, NOPE:]
    q_nope, q_pe = _randn((b, sq, h, NOPE), dtype, device, gen), _randn((b, sq, h, D_ROPE), dtype, device, gen)
    q = absorb_query(q_nope, q_pe, w_k)
    mask = None
    if sq > 1:  # bottom-right causal: query s sees tokens j <= ctx - sq + s
        j = torch.arange(ctx, device=device)
        mask = j[None, :] <= (ctx - sq + torch.arange(sq, device=device))[:, None]
    scale = DECODE_SCALE

    def ours():
        return r1x.mla_decode(q, kv_cache, block_table, cache_seqlens, D_LATENT, scale, True)[0]

    def ours_proj():
        o = r1x.mla_decode(absorb_query(q_nope, q_pe, w_k), kv_cache, block_table, cache_seqlens, D_LATENT,
                           scale, True)[0]
        return torch.einsum("bshc,hdc->bshd", o, w_v)

    def einsum():
        return naive_absorbed(q, cache, D_LATENT, scale, mask)

    def plain():
        return non_absorbed(q_nope, q_pe, cache, wkv_b, scale, mask)

    with torch.no_grad():
        try:
            out = ours()
        except (RuntimeError, NotImplementedError) as e:
            rec["notes"]["r1x"] = _why(e)
            return rec
        fast = {"r1x": ours, "r1x+proj": ours_proj, "einsum": einsum}
        rec["calc_diff"]["einsum"] = calc_diff(out, einsum())
        if device.type == "cuda":
            fn, why = flash_mla_fn(q, kv_cache, block_table, cache_seqlens, D_LATENT, scale)
            if fn is None:
                rec["notes"]["flash_mla"] = why
            else:
                fast["flash_mla"] = lambda: fn()[0]
                rec["calc_diff"]["flash_mla"] = calc_diff(out, fn()[0])
        rec["calc_diff"]["non-absorbed"] = calc_diff(ours_proj(), plain())
        del out
        rec["times"] = timer.compare(fast)
        # the non-absorbed path is 10-1000x slower: timed in its own interleaved pair so that
        # the fast methods get their full number of runs
        slow = timer.compare({"r1x+proj": ours_proj, "non-absorbed": plain})
    rec["times"]["non-absorbed"] = slow["non-absorbed"]
    rec["cache_bytes"] = b * ctx * D_DECODE * kv_cache.element_size()
    rec["flops"] = 2.0 * b * sq * h * ctx * (D_DECODE + D_LATENT)
    rec["gbps"] = {m: rec["cache_bytes"] / v["median_s"] / 1e9 for m, v in rec["times"].items()}
    rec["tflops"] = {m: rec["flops"] / v["median_s"] / 1e12 for m, v in rec["times"].items()}
    _speedups(rec, "r1x", [m for m in ("einsum", "flash_mla") if m in rec["times"]])
    rec["speedup"]["non-absorbed"] = slow["non-absorbed"]["median_s"] / slow["r1x+proj"]["median_s"]
    return rec


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def _ms(rec, m) -> str:
    return f"{rec['times'][m]['median_s'] * 1e3:.3f}" if m in rec.get("times", {}) else "-"


def _x(rec, b) -> str:
    return f"{rec['speedup'][b]:.2f}x" if b in rec.get("speedup", {}) else "-"


def _dt(rec) -> str:
    return {"bfloat16": "bf16", "float32": "fp32"}.get(rec["dtype"], rec["dtype"])


def _linearity(records) -> dict | None:
    """Largest (ratio of successive r1x points) / (length ratio), or None with < 2 points."""
    worst = None
    for r in records:
        if r["kind"] == "memory" and "r1x" in r["ratio_prev"] and r["length_ratio"]:
            rel = r["ratio_prev"]["r1x"] / r["length_ratio"]
            if worst is None or rel > worst["ratio"]:
                worst = {"ratio": rel, "l": r["l"]}
    return worst


def evaluate_targets(records: list[dict], device: torch.device) -> list[dict]:
    """Every target with the record it applies to: the measured value and met / not met."""
    out = []
    fp32_decode = {(r["b"], r["h"], r["sq"], r["ctx"]): r["times"]["r1x"]["median_s"]
                   for r in records if r["kind"] == "decode" and r["dtype"] == "float32"}
    for r in records:  # bf16 against fp32 on the same decode shape, as a speed-up ("fp32" key)
        if r["kind"] == "decode" and r["dtype"] == "bfloat16":
            t32 = fp32_decode.get((r["b"], r["h"], r["sq"], r["ctx"]))
            if t32 is not None:
                r["speedup"]["fp32"] = t32 / r["times"]["r1x"]["median_s"]
    for kind, metric, key, applies, goal, text in TARGETS.get(common.target_key(device), []):
        for r in records:
            if r["kind"] == kind and key in r.get(metric, {}) and applies(r):
                value = r[metric][key]
                out.append({"target": text, "where": _where(r), "metric": metric, "value": value, "goal": goal,
                            "met": value >= goal})
    lin = _linearity(records)
    if lin is not None:
        out.append({"target": f"r1x fwd+bwd memory linear in L (successive ratio <= {LINEAR_SLACK} x length ratio)",
                    "where": f"worst at L={lin['l']}", "metric": "linearity", "value": lin["ratio"],
                    "goal": LINEAR_SLACK, "met": lin["ratio"] <= LINEAR_SLACK})
    return out


def _where(r) -> str:
    if r["kind"] == "decode":
        return f"{_dt(r)} B={r['b']} H={r['h']} Sq={r['sq']} ctx={r['ctx']}"
    return f"{_dt(r)} {r['b']}x{r['l']}"


def _value(t) -> str:
    return {"speedup": f"{t['value']:.2f}x", "gbps": f"{t['value']:.0f} GB/s", "tflops": f"{t['value']:.1f} TFLOP/s",
            "linearity": f"{t['value']:.2f} x length ratio"}[t["metric"]]


def _notes_text(records, kinds) -> str:
    seen = {}
    for r in records:
        if r["kind"] in kinds:
            for m, why in r.get("notes", {}).items():
                seen.setdefault((m, why), []).append(_where(r))
    return "\n".join(f"- {m}: {why} ({', '.join(where[:4])}{', ...' if len(where) > 4 else ''})"
                     for (m, why), where in seen.items())


def make_table(records: list[dict], targets: list[dict] | None = None) -> str:
    parts = []
    tr = [r for r in records if r["kind"].startswith("train")]
    if tr:
        backends = [n for n, _ in SDPA_BACKENDS if any(n in r.get("times", {}) for r in tr)]
        rows = [[r["kind"][6:], _dt(r), f"{r['b']}x{r['l']}", _ms(r, "r1x"),
                 f"{r['tflops']['r1x']:.2f}" if "tflops" in r else "-"]
                + [_ms(r, n) for n in backends]
                + [r.get("fastest", "-"), _x(r, "fastest"),
                   f"{max(r['calc_diff'].values()):.1e}" if r["calc_diff"] else "-"] for r in tr]
        text = (f"Training attention (H={H}, qk {DQK}, v {DV}, causal; TFLOP/s of the causal FLOPs, bwd = 2.5x fwd; "
                "vs fastest: over the fastest SDPA backend; calc_diff: largest of out (and dq, dk, dv) vs the "
                "backends):\n\n" + format_table(
                    ["mode", "dtype", "B x L", "r1x ms", "r1x TFLOP/s"] + [f"{n} ms" for n in backends]
                    + ["fastest", "vs fastest", "calc_diff"], rows))
        notes = _notes_text(records, ("train fwd", "train fwd+bwd"))
        parts.append(text + ("\n\nNot measured:\n" + notes if notes else ""))
    mem = [r for r in records if r["kind"] == "memory"]
    if mem:
        def cells(r, m):
            if m not in r["extra_bytes"]:
                return ["-", "-", "-"]
            ratio = f"{r['ratio_prev'][m]:.2f}" if m in r["ratio_prev"] else "-"
            return [f"{r['extra_bytes'][m] / 2**20:.1f}", f"{r['bytes_per_token'][m]:.0f}", ratio]
        rows = [[r["l"], f"{r['length_ratio']:.1f}" if r["length_ratio"] else "-"] + cells(r, "r1x")
                + cells(r, "sdpa_math") for r in mem]
        text = ("Peak extra memory of one fwd+bwd (B=1, H=16, bf16; " + mem[0].get("source", "") + "; ratio: over "
                "the previous L):\n\n" + format_table(
                    ["L", "L ratio", "r1x MiB", "r1x B/token", "r1x ratio", "math MiB", "math B/token", "math ratio"],
                    rows))
        notes = _notes_text(records, ("memory",))
        parts.append(text + ("\n\nNot measured:\n" + notes if notes else ""))
    dec = [r for r in records if r["kind"] == "decode"]
    if dec:
        flash = any("flash_mla" in r.get("times", {}) for r in dec)
        rows = []
        for r in dec:
            ok = "gbps" in r
            row = [_dt(r), r["b"], r["h"], r["sq"], r["ctx"], _ms(r, "r1x"),
                   f"{r['gbps']['r1x']:.1f}" if ok else "-", f"{r['tflops']['r1x']:.2f}" if ok else "-",
                   _ms(r, "einsum"), _x(r, "einsum"), _ms(r, "r1x+proj"), _ms(r, "non-absorbed"),
                   _x(r, "non-absorbed")]
            if flash:
                row += [_ms(r, "flash_mla"), _x(r, "flash_mla")]
            row.append(" ".join(f"{k}:{v:.0e}" for k, v in r["calc_diff"].items()) or "-")
            rows.append(row)
        head = ["dtype", "B", "H", "Sq", "ctx", "r1x ms", "GB/s", "TFLOP/s", "einsum ms", "vs einsum",
                "r1x+proj ms", "non-absorbed ms", "vs non-absorbed"]
        head += ["flash_mla ms", "vs flash_mla"] if flash else []
        text = ("Absorbed decode (D=576, dv=512, block 64, permuted block table; GB/s: cache bytes read once; "
                "vs non-absorbed: r1x+proj, the absorbed step with its query and output projections, against "
                "decompress + SDPA):\n\n" + format_table(head + ["calc_diff"], rows))
        notes = _notes_text(records, ("decode",))
        parts.append(text + ("\n\nNot measured:\n" + notes if notes else ""))
    if targets:
        rows = [[t["target"], t["where"], _value(t), "met" if t["met"] else "NOT met"] for t in targets]
        parts.append("Targets:\n\n" + format_table(["target", "where", "measured", "status"], rows))
    return "\n\n".join(parts)


def plot(records: list[dict], path: str, title: str) -> None:
    """Speed-up bars (training, decode; log scale, 1x marked, values written on the bars) and
    the fwd+bwd memory against L (log-log, with a linear-growth guide through r1x's first point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.2, 1.4, 1]})
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    times = FuncFormatter(lambda v, _: f"{v:g}x")

    def bars(ax, groups, names, heading):
        """groups: [(label, {series name: speed-up})]; one bar per series and group."""
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            pts = [(j + (i - (len(names) - 1) / 2) * width, vals[name]) for j, (_, vals) in enumerate(groups)
                   if vals.get(name) is not None]
            if pts:
                ax.bar([x for x, _ in pts], [y for _, y in pts], width, label=name, color=f"C{i}")
                for x, y in pts:
                    ax.annotate(f"{y:.1f}x" if y < 100 else f"{y:.0f}x", (x, y), ha="center", va="bottom",
                                fontsize=6, xytext=(0, 1), textcoords="offset points")
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g for g, _ in groups], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("r1x speed-up (x)")
        ax.set_title(heading, fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if any(vals for _, vals in groups):
            ax.legend(fontsize=7)

    train = {}
    for r in records:
        if r["kind"].startswith("train") and "fastest" in r.get("speedup", {}):
            train.setdefault(f"{_dt(r)} {r['b']}x{r['l']}", {})[f"{r['kind'][6:]} vs fastest SDPA"] = \
                r["speedup"]["fastest"]
    bars(axes[0], list(train.items()), ["fwd vs fastest SDPA", "fwd+bwd vs fastest SDPA"],
         "training attention (causal, qk 192 / v 128)")
    names = {"einsum": "vs naive absorbed einsum", "non-absorbed": "vs non-absorbed (decompress + SDPA)",
             "flash_mla": "vs FlashMLA"}
    dec = [(f"{_dt(r)} B{r['b']} H{r['h']} Sq{r['sq']} ctx {r['ctx']}",
            {text: r["speedup"].get(key) for key, text in names.items()})
           for r in records if r["kind"] == "decode" and r.get("speedup")]
    bars(axes[1], dec, list(names.values()), "absorbed decode")

    ax = axes[2]
    mem = [r for r in records if r["kind"] == "memory"]
    for i, (m, text) in enumerate((("r1x", "r1x"), ("sdpa_math", "SDPA math"))):
        pts = [(r["l"], r["extra_bytes"][m] / 2**20) for r in mem if r["extra_bytes"].get(m)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=text, color=f"C{i}")
            if m == "r1x":
                l0, y0 = pts[0]
                ax.plot([p[0] for p in pts], [y0 * p[0] / l0 for p in pts], linestyle="--", color="gray",
                        linewidth=1, label="linear in L (through r1x's first point)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("L (B = 1, H = 16, bf16)")
    ax.set_ylabel("peak extra memory of fwd+bwd (MiB)")
    ax.set_title("memory vs sequence length", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if mem:
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replot(json_path: str) -> str:
    """Redraws the PNG next to a results JSON (no re-measuring)."""
    return common.replot(json_path, plot, TITLE)


def _line(rec: dict) -> str:
    if rec["kind"] == "memory":
        mib = " ".join(f"{m}={v / 2**20:.1f}MiB ({rec['bytes_per_token'][m]:.0f} B/token"
                       + (f", x{rec['ratio_prev'][m]:.2f}" if m in rec["ratio_prev"] else "") + ")"
                       for m, v in rec["extra_bytes"].items())
        notes = " ".join(f"[{m}: {w}]" for m, w in rec["notes"].items())
        return f"{'memory':<14} L={rec['l']:<6} {mib} {notes}"
    times = " ".join(f"{m}={v['median_s'] * 1e3:.3f}ms" for m, v in rec.get("times", {}).items())
    sp = " ".join(f"vs {b}={v:.2f}x" for b, v in rec.get("speedup", {}).items())
    diff = " ".join(f"{k}={v:.1e}" for k, v in rec.get("calc_diff", {}).items())
    notes = rec.get("notes", {})
    off = [m for m, w in notes.items() if w.startswith("unavailable")]
    other = " ".join(f"[{m}: {w}]" for m, w in notes.items() if m not in off)
    notes = (f" unavailable: {', '.join(off)}" if off else "") + (f" {other}" if other else "")
    return f"{rec['kind']:<14} {_where(rec):<28} {times}  {sp}  calc_diff: {diff or '-'}{notes}".rstrip()


def run(device: str = "cpu", full: bool = False, out_dir: str | None = None, budget_s: float = 1.0,
        seed: int = 0, quiet: bool = False, parts=None, dtypes=None, train_shapes=None, mem_lens=None,
        decode_shapes=None) -> dict:
    """Runs the plan and writes ``mla_<cpu_<path>|cuda>.*``. ``parts`` (subset of train, memory,
    decode), ``dtypes`` ("bf16", "fp32"), ``train_shapes`` [(B, L)], ``mem_lens`` [L] and
    ``decode_shapes`` [(B, H, Sq, ctx)] restrict or replace the default plan."""
    dev = torch.device(device)
    plan = default_plan(dev, full)
    parts = set(parts or ("train", "memory", "decode"))
    if parts - {"train", "memory", "decode"}:
        raise ValueError(f"unknown parts {sorted(parts - {'train', 'memory', 'decode'})}: use train, memory, decode")
    dts = [d for d in ("bf16", "fp32") if dtypes is None or d in dtypes]
    train = train_shapes if train_shapes is not None else plan["train"]
    decode = ([(s, d) for d in dts for s in decode_shapes] if decode_shapes is not None
              else [(s, d) for s, d in plan["decode"] if d in dts])
    timer = Timer(dev, budget_s=budget_s)
    gen = torch.Generator(device=dev).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(3):  # the first fills of the flush buffer fault its pages in
        timer.flush()

    def add(rec):
        records.append(rec)
        if not quiet:
            print(_line(rec), flush=True)

    if "train" in parts:
        for d in dts:
            for b, l in train:
                for mode in ("fwd", "fwd+bwd"):
                    add(bench_train(b, l, DTYPES[d], mode, dev, timer, gen))
                    _release(dev)
    if "memory" in parts:
        timer._flush = None  # the measured processes need the memory more than the flush buffer
        _release(dev)
        for rec in bench_memory(mem_lens if mem_lens is not None else plan["memory"], dev):
            add(rec)
        timer._flush = torch.empty(timer.flush_bytes // 4, dtype=torch.float32, device=dev)
    if "decode" in parts:
        for (b, h, sq, ctx), d in decode:
            add(bench_decode(b, h, sq, ctx, DTYPES[d], dev, timer, gen, cpu_gen))
            _release(dev)

    meta = machine_info(dev)
    meta.update({"train": f"H={H}, qk {DQK}, v {DV}, causal", "decode": f"D={D_DECODE}, dv={D_LATENT}, block {BLOCK}"})
    targets = evaluate_targets(records, dev)
    table = make_table(records, targets)
    return publish(out_dir, common.result_name("mla", dev), meta, records, targets, table, plot,
                   f"{TITLE}: {meta['device']}", quiet)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _shapes(n: int):
    def parse(text: str) -> list[tuple]:
        out = []
        for s in text.split(","):
            dims = tuple(int(v) for v in s.lower().split("x"))
            if len(dims) != n:
                raise argparse.ArgumentTypeError(f"{s!r}: expected {n} numbers joined by 'x'")
            out.append(dims)
        return out
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="also the longer sequences and contexts")
    p.add_argument("--parts", default=None, help="comma-separated subset of train,memory,decode (default: all)")
    p.add_argument("--dtypes", default=None, help="comma-separated subset of bf16,fp32 (default: both)")
    p.add_argument("--train", type=_shapes(2), default=None, help="training shapes BxL,..., e.g. 4x512,1x2048")
    p.add_argument("--mem-lens", type=_ints, default=None, help="memory points L,..., e.g. 1024,2048")
    p.add_argument("--decode", type=_shapes(4), default=None,
                   help="decode shapes BxHxSqxCTX,..., e.g. 8x16x1x4096 (replace the default ones)")
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON/markdown/PNG")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per measurement")
    common.add_isa_argument(p)
    args = p.parse_args(argv)
    if args.isa:
        print(common.cap_cpu_isa(args.isa), flush=True)
    split = lambda s: s.split(",") if s else None  # noqa: E731
    run(args.device, args.full, args.out, args.budget, parts=split(args.parts), dtypes=split(args.dtypes),
        train_shapes=args.train, mem_lens=args.mem_lens, decode_shapes=args.decode)


if __name__ == "__main__":
    main()
