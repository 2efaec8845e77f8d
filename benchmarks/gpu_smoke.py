"""One small case of every op of one family on a device, against r1x.reference in float64.

    python benchmarks/gpu_smoke.py --family fp8|moe|mla|errors [--device cuda] [--small]

Prints one line per case, ``PASS``/``FAIL``/``ERROR``, its largest error over its bound and the
time it took, and exits 1 when any case did not pass. A crash (a sticky CUDA error, a fault)
kills the process: ``benchmarks/gpu_check.sh`` runs each family in its own process with
``CUDA_LAUNCH_BLOCKING=1`` and reports that as ``CRASH``. ``--small`` keeps only the smallest
case per op (the compute-sanitizer pass); ``--device cpu`` runs the same cases on the CPU
kernels (the dry run of the check script in CI).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

import r1x
from r1x import reference as ref
from r1x.testing import fp8_gemm_error_bound, fp8_grouped_gemm_error_bound, random_fp8, random_scales

FP8 = torch.float8_e4m3fn


class Smoke:
    def __init__(self, device: str, small: bool):
        self.device, self.small, self.failed = device, small, 0
        self.gen = torch.Generator().manual_seed(int(os.environ.get("R1X_TEST_SEED", "1234")))

    def case(self, name: str, fn) -> None:
        """``fn()`` returns ``(worst error / bound, detail)``: PASS when the ratio is <= 1."""
        t0 = time.perf_counter()
        try:
            ratio, detail = fn()
            if self.device == "cuda":
                torch.cuda.synchronize()
            ok = ratio <= 1.0
            status = "PASS" if ok else "FAIL"
            msg = f"err/bound {ratio:.3g}  {detail}"
        except Exception as e:  # noqa: BLE001 - reported, the next case still runs
            ok, status = False, "ERROR"
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            traceback.print_exc(file=sys.stderr)
        self.failed += not ok
        print(f"{status:5s} {name:44s} {msg}  ({(time.perf_counter() - t0) * 1e3:.0f} ms)", flush=True)

    def to(self, *ts):
        return [t.to(self.device) for t in ts]


def err_ratio(got: torch.Tensor, expected: torch.Tensor, bound) -> tuple[float, str]:
    """max |got - expected| / bound (bound a tensor or a number), NaN-aware."""
    got, expected = got.detach().cpu().double(), expected.detach().cpu().double()
    if got.shape != expected.shape:
        raise AssertionError(f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if got.numel() == 0:
        return 0.0, "empty"
    same = (got == expected) | (got.isnan() & expected.isnan())  # also -inf where both are
    bad = ~same & ~(torch.isfinite(got) & torch.isfinite(expected))
    if bad.any():
        return float("inf"), f"{int(bad.sum())} non-finite values where the reference differs"
    diff = torch.where(same, torch.zeros_like(got), got - expected).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu()
    ratio = (diff / bound.clamp_min(1e-300)).max().item()
    return ratio, f"max abs err {diff.max().item():.3g}"


# ---- families ---------------------------------------------------------------------------------
def fp8_family(s: Smoke) -> None:
    g = s.gen
    shapes = [(5, 256, 384)] if s.small else [(5, 256, 384), (130, 300, 1024), (1, 7168, 2048)]
    for m, n, k in shapes:
        x = torch.randn(m, k, generator=g) * 3

        def quant(x=x):
            q, sc = r1x.quant_fp8_per_token_group(*s.to(x))
            qr, scr = ref.quant_fp8_per_token_group(x)
            back = ref.dequant_fp8(q.cpu(), sc.cpu())
            return err_ratio(back, ref.dequant_fp8(qr, scr), 1e-6 * x.abs().max().item())
        s.case(f"quant_fp8_per_token_group {m}x{k}", quant)

        w = torch.randn(n, k, generator=g) * 0.05

        def quant_block(w=w):
            q, sc = r1x.quant_fp8_per_block(*s.to(w))
            qr, scr = ref.quant_fp8_per_block(w)
            back = ref.dequant_fp8(q.cpu(), sc.cpu(), (128, 128))
            return err_ratio(back, ref.dequant_fp8(qr, scr, (128, 128)), 1e-6 * w.abs().max().item())
        s.case(f"quant_fp8_per_block {n}x{k}", quant_block)

        a, b = random_fp8((m, k), generator=g), random_fp8((n, k), generator=g)
        sa = random_scales((m, (k + 127) // 128), generator=g)
        sb = random_scales(((n + 127) // 128, (k + 127) // 128), generator=g)

        def dequant(b=b, sb=sb):
            out = r1x.dequant_fp8(*s.to(b, sb), block=(128, 128))
            return err_ratio(out, ref.dequant_fp8(b, sb, (128, 128)), 1e-30)  # exact
        s.case(f"dequant_fp8 {n}x{k}", dequant)

        for out_dtype in (torch.float32, torch.bfloat16):
            def gemm(a=a, sa=sa, b=b, sb=sb, out_dtype=out_dtype):
                out = r1x.fp8_gemm(*s.to(a, sa, b, sb), out_dtype=out_dtype)
                exact = ref.fp8_gemm(a, sa, b, sb, out_dtype=torch.float64)
                bound = fp8_gemm_error_bound(a, sa, b, sb, s.device, out_dtype)
                return err_ratio(out, exact, bound)
            s.case(f"fp8_gemm {m}x{n}x{k} -> {str(out_dtype)[6:]}", gemm)


def _offs(m: int, e: int, g) -> torch.Tensor:
    cuts = torch.sort(torch.randint(0, m + 1, (e - 1,), generator=g)).values
    return torch.cat([cuts, torch.tensor([m])]).to(torch.int32)


def moe_family(s: Smoke) -> None:
    g = s.gen
    t, e, k, h = (9, 8, 2, 64) if s.small else (300, 16, 4, 256)
    logits = torch.randn(t, e, generator=g)
    bias = torch.randn(e, generator=g) * 0.1

    def route():
        w, ids = r1x.moe_topk_route(*s.to(logits), k, bias=bias.to(s.device), n_group=4, topk_group=2)
        wr, idr = ref.moe_topk_route(logits, k, bias=bias, n_group=4, topk_group=2)
        if not torch.equal(ids.cpu(), idr):
            return float("inf"), "ids differ"
        return err_ratio(w, wr, 1e-6)
    s.case(f"moe_topk_route T={t} E={e} k={k}", route)

    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)

    def dispatch():
        xs, offs, perm = r1x.moe_dispatch(*s.to(x, ids), e)
        xr, offr, permr = ref.moe_dispatch(x, ids, e)
        if not (torch.equal(offs.cpu(), offr) and torch.equal(perm.cpu(), permr)):
            return float("inf"), "offs or perm differ"
        return err_ratio(xs, xr, 1e-30)
    s.case(f"moe_dispatch T={t} E={e}", dispatch)

    y = torch.randn(t * k, h, generator=g)
    wts = torch.rand(t, k, generator=g)
    perm = ref.moe_dispatch(x, ids, e)[2]

    def combine():
        out = r1x.moe_combine(*s.to(y, wts, perm), t)
        return err_ratio(out, ref.moe_combine(y.double(), wts, perm, t), 1e-5 * (y.abs().max() * k).item())
    s.case(f"moe_combine T={t} k={k}", combine)

    m, n, kk, groups = (37, 40, 72, 3) if s.small else (700, 264, 520, 5)
    for dt in (torch.bfloat16, torch.float32):
        a = torch.randn(m, kk, generator=g).to(dt)
        b = torch.randn(groups, n, kk, generator=g).to(dt)
        offs = _offs(m, groups, g)
        offs[1] = offs[0]  # one empty group

        def gg(a=a, b=b, offs=offs, dt=dt):
            out = r1x.grouped_gemm(*s.to(a, b, offs))
            exact = ref.grouped_gemm(a.double(), b.double(), offs)
            terms = ref.grouped_gemm(a.double().abs(), b.double().abs(), offs)
            eps = 2**-8 if dt == torch.bfloat16 else 2**-20
            return err_ratio(out, exact, eps * terms + 1e-30)
        s.case(f"grouped_gemm {str(dt)[6:]} {m}x{n}x{kk} G={groups}", gg)

    a8, b8 = random_fp8((m, 256), generator=g), random_fp8((groups, n, 256), generator=g)
    sa8 = random_scales((m, 2), generator=g)
    sb8 = random_scales((groups, (n + 127) // 128, 2), generator=g)
    offs8 = _offs(m, groups, g)

    def fgg():
        out = r1x.fp8_grouped_gemm(*s.to(a8, sa8, b8, sb8, offs8), out_dtype=torch.float32)
        exact = ref.fp8_grouped_gemm(a8, sa8, b8, sb8, offs8, out_dtype=torch.float64)
        bound = fp8_grouped_gemm_error_bound(a8, sa8, b8, sb8, offs8, s.device, torch.float32)
        return err_ratio(out, exact, bound + 1e-30)
    s.case(f"fp8_grouped_gemm {m}x{n}x256 G={groups}", fgg)


def mla_family(s: Smoke) -> None:
    g = s.gen
    lens = [5, 3] if s.small else [130, 1, 77]
    for dt, dqk, dv in ([(torch.bfloat16, 192, 128)] if s.small else
                        [(torch.bfloat16, 192, 128), (torch.float16, 64, 64), (torch.float32, 40, 24)]):
        t, h = sum(lens), 4
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
        q, k = (torch.randn(t, h, dqk, generator=g).to(dt) for _ in range(2))
        v = torch.randn(t, h, dv, generator=g).to(dt)
        tol = 2e-2 if dt != torch.float32 else 1e-5

        def fwd_bwd(q=q, k=k, v=v, cu=cu, tol=tol):
            qd, kd, vd = (x.detach().clone().to(s.device).requires_grad_() for x in (q, k, v))
            out = r1x.mla_attention(qd, kd, vd, cu.to(s.device))
            go = torch.randn(out.shape, generator=g).to(out.dtype)
            out.backward(go.to(s.device))
            q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
            o64 = ref.mla_attention(q64, k64, v64, cu)
            o64.backward(go.double())
            ratios = [err_ratio(a, b, tol * (b.abs().max().item() + 1))[0]
                      for a, b in ((out, o64), (qd.grad, q64.grad), (kd.grad, k64.grad), (vd.grad, v64.grad))]
            return max(ratios), "out, dq, dk, dv"
        s.case(f"mla_attention fwd+bwd {str(dt)[6:]} {dqk}/{dv} lens={lens}", fwd_bwd)

    b, hq, d, dvv, bs = (2, 16, 576, 512, 64)
    seqlens = [3, 70] if s.small else [1, 700, 4096 if not s.small else 64]
    b = len(seqlens)
    blocks = sum((n + bs - 1) // bs for n in seqlens) + 2
    for dt, sq in ((torch.bfloat16, 1), (torch.bfloat16, 2), (torch.float32, 1))[: 1 if s.small else 3]:
        cache = torch.randn(blocks, bs, d, generator=g).to(dt)
        per = [(n + bs - 1) // bs for n in seqlens]
        table = torch.zeros(b, max(per), dtype=torch.int32)
        order = torch.randperm(blocks, generator=g)
        used = 0
        for i, n in enumerate(per):
            table[i, :n] = order[used:used + n]
            used += n
        qd = torch.randn(b, sq, hq, d, generator=g).to(dt)
        lens_t = torch.tensor(seqlens, dtype=torch.int32)
        tol = 2e-2 if dt != torch.float32 else 1e-5

        def decode(cache=cache, table=table, qd=qd, lens_t=lens_t, tol=tol, dt=dt):
            out, lse = r1x.mla_decode(*s.to(qd, cache, table, lens_t), dvv)
            o64, l64 = ref.mla_decode(qd.double(), cache.double(), table, lens_t, dvv)
            return max(err_ratio(out, o64, tol * (o64.abs().max().item() + 1))[0],
                       err_ratio(lse, l64, tol)[0]), "out, lse"
        s.case(f"mla_decode {str(dt)[6:]} Sq={sq} L={seqlens}", decode)


def errors_family(s: Smoke) -> None:
    """Error paths, in an order that tells causes apart when one crashes the process (the first
    GPU run crashed with SIGSEGV in every r1x error message that printed a number): torch's own
    and r1x's errors on the CPU before the device is touched, then the same after, then r1x's
    on the device. Each case passes when the expected exception arrives with its message."""

    def expect(fn, *needles):
        def run():
            try:
                fn()
            except (ValueError, TypeError, RuntimeError, IndexError) as e:
                missing = [n for n in needles if n not in str(e)]
                if missing:
                    raise AssertionError(f"message lacks {missing}: {e}") from e
                return 0.0, f"{type(e).__name__}: {str(e)[:60]}"
            raise AssertionError("no exception")

        return run

    x = torch.randn(4, 256, generator=s.gen)
    s.case("torch error with a number, host", expect(lambda: x.view(3, 5), "[3, 5]"))
    s.case("r1x error with text only, host", expect(lambda: r1x.quant_fp8_per_token_group(x.int()), "`x`"))
    s.case("r1x error with a number, host", expect(lambda: r1x.quant_fp8_per_token_group(x[:, :200]), "200"))
    if s.device != "cpu":
        xd = x.to(s.device)
        torch.cuda.synchronize()
        with open("/proc/self/maps") as f:  # which C++ runtimes the process holds once CUDA is up
            libs = sorted({line.split()[-1] for line in f if "stdc++" in line or "libc++" in line})
        print(f"# C++ runtimes mapped after CUDA init: {' '.join(libs) or 'none'}", flush=True)
        s.case("torch error with a number, host, after init", expect(lambda: x.view(3, 5), "[3, 5]"))
        s.case("r1x error with a number, host, after init", expect(lambda: r1x.quant_fp8_per_token_group(x[:, :200]), "200"))
        s.case("torch error with a number, device", expect(lambda: xd.view(3, 5), "[3, 5]"))
        s.case("r1x error with text only, device", expect(lambda: r1x.quant_fp8_per_token_group(xd.int()), "`x`"))
        s.case("r1x error with a number, device", expect(lambda: r1x.quant_fp8_per_token_group(xd[:, :200]), "200"))
        s.case("r1x error with a shape, device", expect(lambda: r1x.moe_topk_route(xd[0], 2), "[256]"))


FAMILIES = {"fp8": fp8_family, "moe": moe_family, "mla": mla_family, "errors": errors_family}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(FAMILIES), required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="the smallest case per op only")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("ERROR no CUDA device visible to torch", flush=True)
        return 1
    s = Smoke(args.device, args.small)
    print(f"# {args.family} on {args.device} (r1x {r1x.__version__}, torch {torch.__version__})", flush=True)
    FAMILIES[args.family](s)
    print(f"# {args.family}: {'all passed' if not s.failed else f'{s.failed} not passed'}", flush=True)
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
