"""Training step time under r1x.parallel.parallelize (FSDP2 + EP) for 1, 2 and 4 ranks, and the
share of it spent in the MoE all-to-all exchanges.

    python benchmarks/bench_dist.py [--ranks 1,2,4] [--steps 4] [--out benchmarks/results]
    python benchmarks/bench_dist.py --overhead [--preset v2-lite] [--tokens 1024,4096,16384]

Each rank count runs under torchrun (gloo on the CPU, one thread per rank; NCCL with one GPU per
rank when every rank has one), ep = ranks, the `small` preset shortened to --layers layers,
per_rank sequences of --seq tokens on every rank (weak scaling: the global batch grows with the
ranks). Reported per configuration: the median step (forward, backward, SGD) over --steps steps
after one warm-up, the time inside the all-to-all calls (token rows there and back, forward and
backward, counted on rank 0 by wrapping r1x.parallel's exchange), and tokens per second.

What the CPU figures can and cannot show: this machine has 2 cores, so 4 ranks oversubscribe it
and gloo moves the rows through local TCP. The step time cannot show scaling here; the all-to-all
share and its growth with the ranks are the part that carries over (bytes per token per layer
are the same on a GPU cluster, the bandwidth is not). On one GPU, EP over one rank is a no-op:
the ranks=1 row measures the layer without any exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def worker(args) -> None:
    import torch.distributed as dist

    import r1x.parallel as par
    from r1x.model import DeepSeekConfig, DeepSeekForCausalLM

    distributed = "RANK" in os.environ
    if distributed:
        use_cuda = torch.cuda.is_available() and int(os.environ["LOCAL_WORLD_SIZE"]) <= torch.cuda.device_count()
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, n = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda") if torch.cuda.is_available() and (not distributed or dist.get_backend() == "nccl") else torch.device("cpu")
    cfg = DeepSeekConfig.preset("small", num_hidden_layers=args.layers, torch_dtype="float32")
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(cfg, device=device).train()
    if distributed:
        par.parallelize(model, ep=n)
    a2a = [0.0]
    inner = par._all_to_all

    def timed(*a, **k):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = inner(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        a2a[0] += time.perf_counter() - t0
        return out

    par._all_to_all = timed
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    steps, shares = [], []
    for i in range(args.steps + 1):
        ids = torch.randint(0, cfg.vocab_size, (args.per_rank, args.seq), generator=g).to(device)
        if distributed:
            dist.barrier()
        a2a[0] = 0.0
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()  # the backward's exchanges run in autograd: see below
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i:  # the first step warms up
            steps.append(dt)
            shares.append(a2a[0])
    if rank == 0:
        tokens = args.per_rank * args.seq * n
        step = statistics.median(steps)
        with open(args.result, "w") as f:
            json.dump({"ranks": n, "ep": n, "step_s": step, "a2a_fwd_s": statistics.median(shares),
                       "tokens_per_s": tokens / step, "device": str(device),
                       "layers": args.layers, "per_rank": args.per_rank, "seq": args.seq}, f)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def overhead(args) -> int:
    """``--overhead``: one process, one MoE layer (``--preset``'s sizes), forward + backward of the
    plain layer against the same layer made expert-parallel over a group of one: the EP
    machinery (the count exchange, the split sizes read on the host, the row exchange, the
    regroup gathers) without any network, i.e. what EP adds on every rank before bandwidth.
    On one GPU this is the figure that can be measured (EP over one rank is otherwise a no-op)."""
    import copy

    import torch.distributed as dist

    from r1x.bench.common import format_table, machine_info, write_results
    from r1x.model import DeepSeekConfig
    from r1x.nn import MoE
    from r1x.parallel import expert_parallel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, **({"device_id": device} if device.type == "cuda" else {}))
    c = DeepSeekConfig.preset(args.preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    plain = MoE.from_config(c, dtype=dtype, device=device, bias_update_speed=0.0).train()
    ep = expert_parallel(copy.deepcopy(plain), dist.group.WORLD)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def once(layer, x) -> float:
        xi = x.detach().requires_grad_()
        sync()
        t0 = time.perf_counter()
        layer(xi).float().sum().backward()
        sync()
        layer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def timed(x) -> tuple[float, float]:
        """Medians, the two layers alternating rep by rep (a drifting machine biases neither)."""
        ta, tb = [], []
        for i in range(args.steps + 2):
            a, b = once(plain, x), once(ep, x)
            if i >= 2:  # two warm-ups
                ta.append(a)
                tb.append(b)
        return statistics.median(ta), statistics.median(tb)

    records = []
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, c.hidden_size, dtype=dtype, device=device)
        a, b = timed(x)
        records.append({"tokens": t, "plain_s": a, "ep1_s": b, "overhead_s": b - a, "overhead": b / a - 1,
                        "device": str(device), "preset": args.preset})
    rows = [[r["tokens"], f"{r['plain_s'] * 1e3:.2f}", f"{r['ep1_s'] * 1e3:.2f}", f"{r['overhead_s'] * 1e3:+.2f}",
             f"{100 * r['overhead']:+.1f}%"] for r in records]
    table = format_table(["tokens", "MoE fwd+bwd ms", "EP over 1 rank ms", "EP machinery ms", "overhead"], rows)
    meta = {**machine_info(device), "layer": f"{args.preset} MoE layer ({c.n_routed_experts} experts, top "
            f"{c.num_experts_per_tok}, hidden {c.hidden_size}, expert {c.moe_intermediate_size}), {dtype}",
            "note": "one process: r1x.parallel.expert_parallel over a group of one (no network) against the plain "
                    "layer; medians of --steps forward+backward passes after two warm-ups, the two layers alternating"}
    print(table)
    dist.destroy_process_group()
    if args.out:
        paths = write_results(args.out, f"bench_dist_overhead_{device.type}", meta, records, table)
        print("wrote", paths["md"])
    return 0


def run(ranks: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        me = [os.path.abspath(__file__), "--worker", "--result", result, "--layers", str(args.layers),
              "--per-rank", str(args.per_rank), "--seq", str(args.seq), "--steps", str(args.steps)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
        cmd = ([sys.executable, *me] if ranks == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *me])
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(result) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--per-rank", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None, help="write bench_dist_<device>.{json,md} here")
    p.add_argument("--overhead", action="store_true",
                   help="one process: the EP machinery's cost over the plain MoE layer (the one-GPU measurement)")
    p.add_argument("--preset", default="v2-lite", help="--overhead: the MoE layer's sizes (a DeepSeekConfig preset)")
    p.add_argument("--tokens", default="1024,4096,16384", help="--overhead: token counts")
    p.add_argument("--device", default=None, help="--overhead: cpu or cuda (default: cuda when available)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.overhead:
        return overhead(args)
    from r1x.bench.common import format_table, machine_info, write_results

    records = [run(int(r), args) for r in args.ranks.split(",")]
    base = records[0]
    rows = [[r["ranks"], r["ep"], f"{r['step_s'] * 1e3:.0f}", f"{r['tokens_per_s']:.0f}",
             f"{r['a2a_fwd_s'] * 1e3:.1f}", f"{100 * r['a2a_fwd_s'] / r['step_s']:.1f}%",
             f"{r['step_s'] / base['step_s']:.2f}x"] for r in records]
    table = format_table(["ranks", "ep", "step ms", "tokens/s", "all-to-all ms (fwd)", "all-to-all share",
                          "step vs 1 rank"], rows)
    device = torch.device(records[0]["device"])
    meta = {**machine_info(device), "model": f"small preset, {args.layers} layers, fp32",
            "batch": f"{args.per_rank} x {args.seq} tokens per rank",
            "note": "CPU: gloo over local TCP, ranks share the cores; the all-to-all is timed in forward only "
                    "(the backward's reverse exchange runs inside autograd)"}
    print(table)
    if args.out:
        paths = write_results(args.out, f"bench_dist_{device.type}", meta, records, table)
        print("wrote", paths["md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
