"""Run under torchrun (gloo, CPU, 2 ranks; `sft` also 4) by tests/test_parallel.py: the trainers with
``parallel: {ep: 2}`` (FSDP2 + expert parallelism).

``sft OUT``: SFT under DDP and under FSDP2 + EP from the same seed and data shards: the same
losses, gradient norms and final weights (to fp32 rounding); a run resumed from the FSDP run's
step-2 checkpoint continues bit-identically; a run resumed there and stopped at step 2 exports
the step-2 weights (for the single-process resharding check in the test).

``grpo_resume OUT``: GRPO resumed between the two iterations of a rollout, under DDP and FSDP2 +
EP: the uninterrupted run's losses exactly.

``distill OUT``: token-level distillation under DDP and under FSDP2 + EP: the same losses.

``grpo OUT``: a tiny GRPO run with a rule reward (the share of digits in the completion) under
FSDP2 + EP, with the KL term and two iterations per rollout; prints the rewards per step.
"""

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

from r1x.train import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def weights(out):
    from r1x.model import DeepSeekForCausalLM

    return DeepSeekForCausalLM.from_pretrained(os.path.join(out, "final")).state_dict()


def sft(out):
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    # no aux-loss-free bias update: under DDP each rank would update it from its own tokens
    # (rank 0's wins, by DDP's buffer broadcast), under FSDP2 from all ranks' tokens
    common = dict(max_steps=4, per_device_train_batch_size=4, num_train_examples=32, gradient_accumulation_steps=2,
                  logging_steps=1, progress=False, num_threads=1, eval_examples=4, eval_steps=2,
                  eval_max_new_tokens=6, model_overrides={"bias_update_speed": 0.0}, learning_rate=3e-3)
    # bad input, on every rank, before anything is written: an EP size that does not divide
    # the experts, a dp_shard that is not the world size
    for spec, overrides, match in (({"ep": 2}, {"n_routed_experts": 3, "n_group": 1, "topk_group": 1}, "divide"),
                                   ({"dp_shard": 2 * int(os.environ["WORLD_SIZE"])}, {}, "world size")):
        try:
            SFTTrainer(SFTConfig(output_dir=os.path.join(out, "bad"), parallel=spec,
                                 **{**common, "model_overrides": overrides}))
        except ValueError as e:
            assert match in str(e) and "parallel" in str(e), e
        else:
            raise AssertionError(f"parallel={spec} was accepted")
        assert not os.path.exists(os.path.join(out, "bad"))
    ddp = SFTTrainer(SFTConfig(output_dir=os.path.join(out, "ddp"), **common))
    ddp.train()
    par = SFTTrainer(SFTConfig(output_dir=os.path.join(out, "fsdp"), save_steps=2, parallel={"ep": 2}, **common))
    assert par.model.r1x_mesh.shape == (int(os.environ["WORLD_SIZE"]) // 2, 2)  # (edp, ep)
    par.train()
    resumed = SFTTrainer(SFTConfig(output_dir=os.path.join(out, "resumed"), parallel={"ep": 2},
                                   resume=os.path.join(out, "fsdp", "checkpoint-2"), **common))
    resumed.train()
    at2 = SFTTrainer(SFTConfig(output_dir=os.path.join(out, "at2"), parallel={"ep": 2},
                               resume=os.path.join(out, "fsdp", "checkpoint-2"), **{**common, "max_steps": 2}))
    at2.train()
    dist.barrier()
    if rank == 0:
        a, b, c = metrics(os.path.join(out, "ddp")), metrics(os.path.join(out, "fsdp")), metrics(os.path.join(out, "resumed"))
        for ra, rb in zip(a, b):
            for k in ("loss", "grad_norm", "lm_loss", "mtp_loss"):
                assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (k, ra, rb)
        assert [r["step"] for r in b] == [1, 2, 3, 4] and "eval/accuracy" in b[1]
        assert [(r["step"], r["loss"], r["grad_norm"]) for r in c] == [(r["step"], r["loss"], r["grad_norm"]) for r in b]
        wa, wb, wc = weights(os.path.join(out, "ddp")), weights(os.path.join(out, "fsdp")), weights(os.path.join(out, "resumed"))
        worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
        assert worst <= 2e-5, worst
        assert all(torch.equal(wb[k], wc[k]) for k in wb)
        assert sorted(n for n in os.listdir(os.path.join(out, "fsdp")) if n.startswith("checkpoint")) == \
            ["checkpoint-2", "checkpoint-4"]
        print(f"TRAINER SFT OK ddp-vs-fsdp worst {worst:.3g}", flush=True)
    dist.barrier()
    # FP8 training (FP8Linear over the master weights) sharded the same way
    fp8 = dict(common, max_steps=2, eval_steps=0, fp8=True)
    h = {name: SFTTrainer(SFTConfig(output_dir=os.path.join(out, f"fp8-{name}"), parallel=spec, **fp8)).train()
         for name, spec in (("ddp", {}), ("fsdp", {"ep": 2}))}
    if rank == 0:
        diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(h["ddp"], h["fsdp"])]
        assert len(diffs) == 2 and max(diffs) <= 1e-3, (h["ddp"], h["fsdp"])
        print(f"TRAINER SFT FP8 OK worst {max(diffs):.3g}", flush=True)
    dist.barrier()
    par.world.close()


def grpo(out):
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])

    def digits(prompts, completions, **kw):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    # dynamic sampling leaves rank 1 nothing to train on (its rewards are constant): it still
    # joins every sharded forward/backward (FSDP's gathers and EP's exchanges), so nobody hangs
    def rank0_only(prompts, completions, **kw):
        return digits(prompts, completions) if rank == 0 else [0.0] * len(completions)

    idle = GRPOTrainer(GRPOConfig(output_dir=out + "-idle", max_steps=2, per_device_train_batch_size=8,
                                  num_generations=4, max_completion_length=6, num_train_examples=16,
                                  dynamic_sampling=True, gradient_accumulation_steps=2, logging_steps=1,
                                  progress=False, num_threads=1, parallel={"ep": 2}), reward_funcs=[rank0_only])
    kept = [r["num_kept_completions"] for r in idle.train()]
    if rank == 0:
        print(f"GRPO idle-rank OK kept {kept}", flush=True)
    cfg = GRPOConfig(output_dir=out, max_steps=int(os.environ.get("R1X_TEST_GRPO_STEPS", "16")),
                     per_device_train_batch_size=16, num_generations=8, max_completion_length=8,
                     num_train_examples=32, learning_rate=2e-2, warmup_ratio=0.0, beta=0.02, num_iterations=2,
                     logging_steps=1, progress=False, num_threads=1, eval_steps=0, parallel={"ep": 2})
    trainer = GRPOTrainer(cfg, reward_funcs=[digits])
    hist = trainer.train()
    if rank == 0:
        print("GRPO rewards " + " ".join(f"{r['reward']:.4f}" for r in hist), flush=True)
        print(f"GRPO OK steps {len(hist)}", flush=True)
    trainer.world.close()


def grpo_resume(out):
    """GRPO with two iterations per rollout, under DDP and under FSDP2 + EP: a run resumed from
    the step-1 checkpoint (taken between the two iterations: each rank's rollout is in flight)
    repeats the uninterrupted run's losses exactly."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])

    def digits(prompts, completions, **kw):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    common = dict(max_steps=3, per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  num_train_examples=16, num_iterations=2, beta=0.02, logging_steps=1, progress=False,
                  num_threads=1, save_steps=1, save_total_limit=0)
    for name, spec in (("ddp", {}), ("fsdp", {"ep": 2})):
        a = GRPOTrainer(GRPOConfig(output_dir=os.path.join(out, name), parallel=spec, **common), reward_funcs=[digits])
        ha = a.train()
        b = GRPOTrainer(GRPOConfig(output_dir=os.path.join(out, name + "-resumed"), parallel=spec,
                                   resume=os.path.join(out, name, "checkpoint-1"), **common), reward_funcs=[digits])
        hb = b.train()
        got = [(r["step"], r["loss"], r["reward"]) for r in hb]
        want = [(r["step"], r["loss"], r["reward"]) for r in ha]
        assert got == want, (name, rank, got, want)
        if rank == 0:
            print(f"GRPO resume OK {name}", flush=True)
    b.world.close()


def distill(out):
    """Token-level distillation (on the student's own samples half of the steps) under DDP and
    under FSDP2 + EP: the same losses. The teacher's data is the train set's own completions (an
    untrained teacher solves nothing)."""
    import r1x.train.distill as D
    from r1x.model import DeepSeekConfig, DeepSeekForCausalLM

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    D.teacher_samples = lambda teacher, tok, examples, rewards, **kw: ([dict(e) for e in examples], {"teacher/kept": len(examples)})
    torch.manual_seed(1)
    teacher = DeepSeekForCausalLM(DeepSeekConfig.preset("tiny"))
    common = dict(max_steps=4, per_device_train_batch_size=4, num_prompts=32, mode="token", loss="jsd",
                  on_policy_fraction=0.5, max_new_tokens=8, logging_steps=1, progress=False, num_threads=1,
                  eval_examples=2, eval_max_new_tokens=4, learning_rate=3e-3,
                  model_overrides={"bias_update_speed": 0.0, "num_hidden_layers": 2})
    hist = {}
    for name, spec in (("ddp", {}), ("fsdp", {"ep": 2})):
        t = D.DistillTrainer(D.DistillConfig(output_dir=os.path.join(out, name), parallel=spec, **common),
                             teacher_model=teacher)
        hist[name] = t.train()
    if rank == 0:
        a, b = hist["ddp"], hist["fsdp"]
        assert [r["on_policy"] for r in a] == [r["on_policy"] for r in b] and 0 < sum(r["on_policy"] for r in a) < 4
        for ra, rb in zip(a, b):
            assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * max(1.0, abs(ra["loss"])), (ra, rb)
        print("DISTILL OK " + " ".join(f"{r['loss']:.5f}/{q['loss']:.5f}" for r, q in zip(a, b)), flush=True)
    t.world.close()


if __name__ == "__main__":
    {"sft": sft, "grpo": grpo, "grpo_resume": grpo_resume, "distill": distill}[sys.argv[1]](sys.argv[2])
    gc.collect()  # cycles (FSDP state, gloo work objects) freed before interpreter shutdown, not during it
