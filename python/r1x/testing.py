"""Helpers shared by r1x's tests and benchmarks (numerics metrics and input generators)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric in float64: ``1 - 2 sum(xy) / sum(x^2 + y^2)``.

    0 for identical tensors; about ``rel_err^2 / 2`` for small relative errors.
    """
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def scaled_randn(
    shape,
    group: int = 128,
    spread: float = 3.0,
    dtype=torch.float32,
    device="cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Normal values whose magnitude changes by up to ``10**±spread`` from one ``group``-wide
    block of the last dimension to the next (so per-block scales differ strongly)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    k = shape[-1]
    nblocks = (k + group - 1) // group
    mag = 10 ** ((torch.rand((*shape[:-1], nblocks), generator=generator, dtype=torch.float64) * 2 - 1) * spread)
    x = x * mag.repeat_interleave(group, dim=-1)[..., :k]
    return x.to(dtype=dtype, device=device)


def random_fp8(shape, device="cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Random finite e4m3 values (uniform over all finite bit patterns, subnormals included)."""
    bits = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    bits = torch.where((bits & 0x7F) == 0x7F, bits & 0xF0, bits)  # drop the NaN patterns
    return bits.view(torch.float8_e4m3fn).to(device)


def random_scales(shape, spread: float = 4.0, device="cpu", generator=None) -> torch.Tensor:
    """Positive float32 scales spread over ``10**±spread``."""
    e = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * spread
    return (10**e).float().to(device)


def assert_raises_naming(fn, *names) -> None:
    """``fn()`` must raise RuntimeError/ValueError/TypeError whose message contains every one
    of ``names`` (the argument it names, what was expected)."""
    try:
        fn()
    except (RuntimeError, ValueError, TypeError) as e:
        msg = str(e)
        for name in names:
            assert name in msg, f"error message does not name {name!r}: {msg}"
        return
    raise AssertionError(f"no error raised; expected one naming {names}")


# ---- error bounds of the FP8 GEMMs, per device ------------------------------------------------
# Every e4m3 x e4m3 product is exact in fp32 (4 + 4 significand bits, exponents well inside
# fp32's range), so the only error of fp8_gemm against the exact result is how the products are
# summed, bounded per element relative to S = sum_k |a_k scale_a| |b_k scale_b| (the sum of the
# terms' magnitudes: cancellation can make the result itself tiny).
#
# CPU: fp32 sums of exact products inside each 128-wide K block, promoted with the two scales into
#   an fp32 accumulator: at most K additions of relative error 2^-24 each, i.e. about 1.2e-7 * S
#   for K = 2048 and 2e-6 * S for K = 16384; the tests use 2e-6.
# CUDA (Hopper): the FP8 wgmma instruction (K = 32 per instruction) does not accumulate in fp32:
#   the products and the running accumulator are aligned to the largest exponent among them and
#   only about 13-14 significand bits are kept, the lower ones truncated (DeepSeek-V3 report,
#   3.3.2; the reason DeepGEMM and r1x's CUTLASS mainloop promote to fp32 after every 128-wide
#   K block, i.e. after 4 instructions). Taking 13 kept bits: one instruction truncates each of
#   its 32 products by at most min(|p|, 2^-13 max|p|), at most 32 * 2^-13 max|p| <= 2^-8 of the
#   sum of the magnitudes it adds (the worst case is one dominant product and 31 truncated
#   ones); each of the 4 additions into the block accumulator loses at most 2^-13 of the block's
#   magnitude sum, 2^-11 together. A block's result thus errs by at most (2^-8 + 2^-11) of its S,
#   and the fp32 promotion across blocks adds the CPU term. Typical errors are far smaller
#   (truncations of random data partly cancel), but this is the bound a correct kernel always
#   meets; a wrong scale layout misses it by orders of magnitude on most elements (the tests'
#   scales spread over 10^+-4, see test_fp8_gemm_one_scale_per_row_is_wrong).
FP8_GEMM_EPS = {"cpu": 2e-6, "cuda": 2.0**-8 + 2.0**-11 + 2e-6}


def fp8_gemm_error_bound(a, a_scale, b, b_scale, device, out_dtype=torch.float32) -> torch.Tensor:
    """Per-element bound on ``|fp8_gemm(...) - exact|`` (float64, on the CPU) for the kernels of
    ``device`` (``"cpu"`` or ``"cuda"``, see :data:`FP8_GEMM_EPS`), plus one rounding of the
    output to ``out_dtype`` (bf16: 2^-8 of the exact value)."""
    from r1x import reference as ref

    a, a_scale, b, b_scale = (t.detach().cpu() for t in (a, a_scale, b, b_scale))
    dev = torch.device(device).type
    if dev not in FP8_GEMM_EPS:
        raise ValueError(f"`device` must be cpu or cuda, got {device!r}")
    absa, absb = a.float().abs().to(a.dtype), b.float().abs().to(b.dtype)
    bound = FP8_GEMM_EPS[dev] * ref.fp8_gemm(absa, a_scale, absb, b_scale, out_dtype=torch.float64)
    # rounding to the output type: at most half an ulp of the computed value, i.e. u (|exact| +
    # the summation error), u = 2^-8 for bf16, 2^-11 for fp16
    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(out_dtype, 0.0)
    if u:
        bound = (1 + u) * bound + u * ref.fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.float64).abs()
    return bound


def fp8_grouped_gemm_error_bound(a, a_scale, b, b_scale, offs, device, out_dtype=torch.float32) -> torch.Tensor:
    """:func:`fp8_gemm_error_bound` of each group of :func:`r1x.fp8_grouped_gemm` (rows past the
    last offset: bound 0, the op writes zeros there)."""
    from r1x import reference as ref

    a, a_scale, b, b_scale = (t.detach().cpu() for t in (a, a_scale, b, b_scale))
    bound = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    for g, (lo, hi) in enumerate(ref._group_bounds(offs.cpu())):
        if hi > lo:
            bound[lo:hi] = fp8_gemm_error_bound(a[lo:hi], a_scale[lo:hi], b[g], b_scale[g], device, out_dtype)
    return bound


# gloo's teardown at interpreter exit can abort a process that has finished its work (a known
# upstream issue: work objects freed during finalization); such a run is repeated once
GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchrun(args, cwd, nproc: int = 2, timeout: float = 180) -> str:
    """Runs ``python -m torch.distributed.run --nproc_per_node nproc --standalone *args`` in
    ``cwd`` (one thread per process), stops it if it hangs (a collective one rank never joins),
    asserts it succeeded, and returns its stdout (stdout and stderr also land in ``cwd``). A run
    that failed only by gloo's abort at exit (:data:`GLOO_EXIT_ABORT` in its output) is repeated
    once; a second failure fails."""
    for attempt in (1, 2):
        code, stdout, stderr = _torchrun_once(args, cwd, nproc, timeout)
        if code == 0 or attempt == 2 or GLOO_EXIT_ABORT not in stderr:
            break
    assert code == 0, (f"torchrun failed or hung ({timeout} s)\nstdout:\n{stdout[-3000:]}\n"
                       f"stderr:\n{stderr[-6000:]}")
    return stdout


def _torchrun_once(args, cwd, nproc: int, timeout: float) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *args]
    out_path, err_path = os.path.join(cwd, "torchrun.out"), os.path.join(cwd, "torchrun.err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a collective that one rank never joins hangs
            proc.send_signal(signal.SIGTERM)  # torchrun stops its workers (their own sessions) on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with open(out_path) as f:
        stdout = f.read()
    with open(err_path) as f:
        stderr = f.read()
    return proc.returncode, stdout, stderr


def load_module(path, name: str | None = None):
    """Imports the Python file at ``path`` (a script, a build helper) as a module and returns it."""
    import importlib.util
    from pathlib import Path

    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
