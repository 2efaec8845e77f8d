"""The ``r1x`` command.

    r1x pipeline [--config FILE] [--output-dir DIR] [--resume] [key=value ...]
                             the R1 recipe: SFT cold start -> GRPO -> distillation (default:
                             the tiny model on 3-digit arithmetic, about 7 minutes on 2 CPU cores)
    r1x sft|grpo|distill [--config FILE] [--output-dir DIR] [--resume] [key=value ...]
                             one stage (torchrun --nproc_per_node N -m r1x.cli ... for DDP)
    r1x export CHECKPOINT OUT
                             a trainer checkpoint (DDP or FSDP2 + EP, any number of ranks) in
                             the HF layout, in one process
    r1x info                 what r1x was built with and what this machine offers
    r1x bench [--op fp8_gemm|moe|mla|model|all] [--isa amx|avx512|avx2|generic] [--shapes MxNxK,...]
              [--tokens T,...] [--out DIR]
                             microbenchmarks against baselines (table, JSON, PNG); --isa runs r1x's
                             CPU kernels on one path and caps torch's oneDNN / ATen to the same class
"""

from __future__ import annotations

import argparse
import json
import os
import sys

BENCHMARKS = ("fp8_gemm", "moe", "mla", "model")


def _cmd_info(args) -> int:
    import r1x

    print(json.dumps(r1x.info(), indent=2))
    return 0


def _cmd_bench(args) -> int:
    import torch

    from r1x.bench import common, fp8_gemm, mla, moe
    from r1x.bench import model as model_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.isa:
        if device != "cpu":
            raise SystemExit("r1x bench: --isa is for the CPU (add --device cpu)")
        try:
            print(common.cap_cpu_isa(args.isa), flush=True)  # before torch computes anything
        except ValueError as e:
            raise SystemExit(f"r1x bench: {e}") from None
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


def _cmd_export(args) -> int:
    from r1x.train.common import export_checkpoint

    try:
        print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"r1x export: {e}") from None
    return 0


def _overrides(args) -> list[str]:
    over = list(args.overrides)
    if args.output_dir:
        over.append(f"output_dir={args.output_dir}")
    if args.resume:
        over.append("resume=true")
    if getattr(args, "threads", None):
        over.append(f"num_threads={args.threads}")
    return over


def _cmd_pipeline(args) -> int:
    from r1x.train.pipeline import PipelineConfig, run_pipeline

    over = _overrides(args)
    if args.quick:
        over = QUICK + over
    cfg = PipelineConfig.from_yaml(args.config, over)
    summary = run_pipeline(cfg)
    from r1x.train.dist import World

    world = World.from_env()
    if world.is_main:
        print()
        print(summary["table"])
        print(f"\n{summary['total_seconds']:.0f} s; wrote {cfg.output_dir}/summary.json, results.md, metrics.jsonl, "
              + ", ".join(os.path.basename(p) for p in summary.get("plots", [])))
    world.close()
    return 0


# a smoke-sized pipeline (tests, a first look): seconds, not minutes; accuracy is not the point
QUICK = ["sft.max_steps=6", "sft.num_train_examples=64", "grpo.max_steps=2", "grpo.per_device_train_batch_size=16",
         "grpo.num_generations=4", "grpo.eval_steps=0", "grpo.max_completion_length=24", "distill.num_prompts=16",
         "distill.max_steps=3", "eval_examples=16", "eval_max_new_tokens=24", "save_steps=0"]


def _cmd_stage(args) -> int:
    from r1x.train import (DistillConfig, DistillTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer)

    cfg_cls, trainer_cls = {"sft": (SFTConfig, SFTTrainer), "grpo": (GRPOConfig, GRPOTrainer),
                            "distill": (DistillConfig, DistillTrainer)}[args.command]
    cfg = cfg_cls.from_yaml(args.config, _overrides(args))
    trainer = trainer_cls(cfg)
    history = trainer.train()
    res = trainer.evaluate()  # every rank: the evaluation is sharded and averaged over ranks
    if trainer.world.is_main:
        print(json.dumps({"step": trainer.step, **(history[-1] if history else {}),
                          **{f"eval/{k}": v for k, v in res.items()}}, indent=1))
        print(f"final model: {os.path.join(cfg.output_dir, 'final')}")
    trainer.world.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1x", description="r1x: kernels and the DeepSeek-R1 recipe")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build and machine information").set_defaults(func=_cmd_info)
    ex = sub.add_parser("export", help="a trainer checkpoint in the HF layout")
    ex.add_argument("checkpoint", help="a checkpoint-<step> folder (written with or without `parallel`)")
    ex.add_argument("out", help="the output folder")
    ex.set_defaults(func=_cmd_export)
    b = sub.add_parser("bench", help="microbenchmarks against baselines")
    b.add_argument("--op", choices=("all",) + BENCHMARKS, default="all")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--isa", choices=("amx", "avx512", "avx2", "generic"), default=None,
                   help="CPU: run r1x's kernels on this path and cap torch's oneDNN/ATen to the same class "
                        "(ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY); results are named <op>_cpu_<path>")
    b.add_argument("--shapes", default=None, help="fp8_gemm: MxNxK,MxNxK,... (default: DeepSeek-V3 shapes)")
    b.add_argument("--tokens", default=None, help="moe: only these token counts T, e.g. 1,16 (default: all)")
    b.add_argument("--full", action="store_true", help="every default shape, also the slow CPU ones")
    b.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per method")
    b.add_argument("--out", default="r1x-bench", help="output folder (default: ./r1x-bench)")
    b.set_defaults(func=_cmd_bench)

    pl = sub.add_parser("pipeline", help="the R1 recipe: SFT -> GRPO -> distillation (+ the RL-only baseline)")
    pl.add_argument("--quick", action="store_true", help="a smoke-sized run (seconds)")
    for name, what in (("sft", "SFT cold start"), ("grpo", "GRPO with rule-based rewards"),
                       ("distill", "distillation into a smaller student")):
        sp = sub.add_parser(name, help=what)
        sp.set_defaults(func=_cmd_stage)
    for sp in (pl, *(sub.choices[n] for n in ("sft", "grpo", "distill"))):
        sp.add_argument("--config", default=None, help="a YAML file of config fields")
        sp.add_argument("--output-dir", default=None, help="output folder (overrides the config's)")
        sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        sp.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config fields (YAML values; the pipeline's stage fields as grpo.max_steps=50)")
    pl.set_defaults(func=_cmd_pipeline)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rc = args.func(args)
    # free what reference cycles keep (a sharded model's FSDP state holds the gloo work objects
    # of its last collectives) while the interpreter is whole: freed during its finalization
    # instead, their tensors can abort the process ("terminate called without an active exception")
    import gc

    gc.collect()
    return rc


if __name__ == "__main__":
    sys.exit(main())
