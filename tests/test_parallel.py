"""r1x.parallel on the CPU with gloo, under torchrun with 2 and 4 processes: expert parallelism
(forward and backward equal the full layer on the same weights and tokens) and FSDP2 + EP
training (gradients, losses and weights equal single-process training on the global batch)."""

import math
import os
import re
from pathlib import Path

import pytest
import torch

import r1x
from r1x.nn import MoE
from r1x.parallel import expert_parallel
from r1x.testing import load_module, torchrun

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
SCRIPT = Path(__file__).parent / "dist" / "ep_moe.py"


@pytest.fixture(autouse=True)
def no_process_group_left():
    """A test that starts a process group of one in this process (a trainer with `parallel`)
    and fails before closing it must not leave it to the next test."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
TRAIN_SCRIPT = Path(__file__).parent / "dist" / "fsdp_ep_train.py"
DCP_SCRIPT = Path(__file__).parent / "dist" / "dcp_reshard.py"


@needs_gloo
@pytest.mark.parametrize("nproc", [2, 4])
def test_expert_parallel_equals_the_full_layer(tmp_path, nproc):
    out = torchrun([str(SCRIPT)], cwd=tmp_path, nproc=nproc, timeout=300)
    # ranks print concurrently: their lines may run together
    assert sorted(re.findall(r"EP OK rank \d+ of \d+", out)) == [f"EP OK rank {r} of {nproc}" for r in range(nproc)]


@needs_gloo
@pytest.mark.parametrize("nproc, ep", [(2, 2), (4, 2), (4, 1)])
def test_fsdp2_ep_training_equals_single_process(tmp_path, nproc, ep):
    out = torchrun([str(TRAIN_SCRIPT), str(ep)], cwd=tmp_path, nproc=nproc, timeout=300)
    oks = re.findall(rf"FSDP2\+EP OK rank (\d+) of {nproc} ep {ep} worst \S+ dense (\d+)/(\d+)", out)
    assert sorted(int(r) for r, _, _ in oks) == list(range(nproc)), out
    for _, local, total in oks:  # each rank holds 1/nproc of the dense parameters
        assert int(local) * nproc == int(total)


@needs_gloo
def test_dcp_checkpoint_saved_on_4_ranks_resumes_on_2_and_1(tmp_path):
    import os
    import subprocess
    import sys

    ckpt = str(tmp_path / "ckpt")
    out = torchrun([str(DCP_SCRIPT), "save", ckpt, "2"], cwd=tmp_path, nproc=4, timeout=300)
    assert len(re.findall(r"DCP save OK rank \d of 4 ep 2", out)) == 4
    assert os.path.isdir(ckpt) and not os.path.exists(ckpt + ".tmp")  # renamed once complete
    for ep in ("2", "1"):
        out = torchrun([str(DCP_SCRIPT), "load", ckpt, ep], cwd=tmp_path, nproc=2, timeout=300)
        assert len(re.findall(rf"DCP load OK rank \d of 2 ep {ep}", out)) == 2
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(DCP_SCRIPT), "load", ckpt, "1"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "DCP load OK rank 0 of 1" in r.stdout, r.stderr[-3000:]


def test_load_checkpoint_bad_input(tmp_path):
    from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
    from r1x.parallel import load_checkpoint

    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_checkpoint(DeepSeekForCausalLM(DeepSeekConfig.preset("tiny")), str(tmp_path / "nothing"))


@needs_gloo
def test_parallelize_bad_input(tmp_path):
    import torch.distributed as dist

    from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
    from r1x.parallel import parallelize

    model = DeepSeekForCausalLM(DeepSeekConfig.preset("tiny"))
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallelize(model)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="`ep` \\(2\\) must be a positive integer dividing the world size \\(1\\)"):
            parallelize(model, ep=2)
        with pytest.raises(ValueError, match="`dp_shard` \\(2\\) must equal the world size \\(1\\)"):
            parallelize(model, dp_shard=2)
        with pytest.raises(TypeError, match="DeepSeekForCausalLM"):
            parallelize(torch.nn.Linear(2, 2))
        # a world of one: sharded over one rank, the same outputs (eval: no bias update between)
        model.eval()
        ids = torch.randint(0, 256, (2, 9))
        want = model(ids, labels=ids).loss
        parallelize(model)
        torch.testing.assert_close(model(ids, labels=ids).loss, want)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_bad_input():
    with pytest.raises(TypeError, match="r1x.nn.MoE"):
        expert_parallel(torch.nn.Linear(2, 2))
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            expert_parallel(MoE(16, 8, 4, 2))


def test_single_rank_layer_is_untouched():
    moe = MoE(16, 8, 4, 2)
    assert moe.ep_group is None and moe.ep_size == 1 and "expert_parallel" not in repr(moe)
    assert r1x.parallel.expert_parallel is expert_parallel


def test_memory_table_shards_everything_and_readme_is_current():
    mem = load_module(Path(__file__).resolve().parents[1] / "benchmarks" / "dist_memory.py")
    from r1x.model import DeepSeekConfig

    c = mem.count(DeepSeekConfig.preset("tiny"))
    assert 0 < c["experts"] < c["total"]
    one, four = mem.per_rank(c, 1, 1), mem.per_rank(c, 4, 2)
    assert four["params"] * 4 == one["params"] == c["total"]
    assert four["state_gb"] * 4 == pytest.approx(one["state_gb"]) == pytest.approx(c["total"] * 16 / 1e9)
    assert mem.a2a_bytes(DeepSeekConfig.preset("v3")) == 2 * 8 * 7168 * 2
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert mem.table(["v2-lite", "v3"]) in readme, "README's memory table is stale: python benchmarks/dist_memory.py"


@needs_gloo
def test_bench_dist_runs(tmp_path):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dist.py"
    r = subprocess.run([sys.executable, str(script), "--ranks", "1,2", "--layers", "1", "--seq", "16", "--steps", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "bench_dist_cpu.json").read_text())
    assert [rec["ranks"] for rec in data["results"]] == [1, 2]
    assert data["results"][0]["a2a_fwd_s"] == 0 < data["results"][1]["a2a_fwd_s"]


# ---------------------------------------------------------------------------------------------
# the trainers with `parallel` (FSDP2 + EP)
# ---------------------------------------------------------------------------------------------
TRAINER_SCRIPT = Path(__file__).parent / "dist" / "trainer_parallel.py"
SFT_COMMON = dict(per_device_train_batch_size=4, num_train_examples=32, gradient_accumulation_steps=2,
                  logging_steps=1, progress=False, eval_examples=4, eval_steps=2, eval_max_new_tokens=6,
                  model_overrides={"bias_update_speed": 0.0}, learning_rate=3e-3)  # as the script's


def weights_in(folder):
    from r1x.model import DeepSeekForCausalLM

    return DeepSeekForCausalLM.from_pretrained(folder).state_dict()


def final_weights(out):
    return weights_in(Path(out) / "final")


@needs_gloo
@pytest.mark.parametrize("nproc", [2, 4])
def test_sft_under_fsdp2_ep_matches_ddp_and_reshards(tmp_path, nproc):
    """2 ranks (mesh (edp, ep) = (1, 2)) and 4 ranks ((2, 2): the experts also FSDP-sharded): SFT
    with `parallel: {ep: 2}` equals DDP (losses, gradient norms, exported weights); a resume from
    its checkpoint continues bit-identically (in the script). Here, one process: that checkpoint
    loads with `parallel` (resharded to one rank) and without it, to the very weights the run had
    at that step, and trains on from its optimizer state."""
    from r1x.train import SFTConfig, SFTTrainer

    out = torchrun([str(TRAINER_SCRIPT), "sft", str(tmp_path)], cwd=tmp_path, nproc=nproc, timeout=600)
    assert "TRAINER SFT OK" in out and "TRAINER SFT FP8 OK" in out, out[-3000:]
    ckpt = tmp_path / "fsdp" / "checkpoint-2"
    assert sorted(os.listdir(ckpt)) == ["config.json", "dcp", *(f"rank{r}.pt" for r in range(nproc)), "trainer_state.pt"]
    want = final_weights(tmp_path / "at2")
    # the sharded checkpoint in the HF layout, in this process: the step-2 weights exactly
    from r1x.cli import main as cli

    assert cli(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    got = weights_in(tmp_path / "exported")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(os.listdir(tmp_path / "exported")) == sorted(os.listdir(tmp_path / "at2" / "final"))
    with pytest.raises(SystemExit, match="not a trainer checkpoint"):
        cli(["export", str(tmp_path), str(tmp_path / "nothing")])
    for name, spec in (("one_fsdp", {"ep": 1}), ("one_plain", {})):
        t = SFTTrainer(SFTConfig(output_dir=str(tmp_path / name), max_steps=2, resume=str(ckpt), parallel=spec,
                                 **SFT_COMMON))
        t.train()
        got = final_weights(tmp_path / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
        # the Adam state came along: one more step continues from step 2's moments
        t2 = SFTTrainer(SFTConfig(output_dir=str(tmp_path / name), max_steps=3, resume=True, parallel=spec,
                                  **SFT_COMMON))
        hist = t2.train()
        assert hist[-1]["step"] == 3 and math.isfinite(hist[-1]["loss"])
        steps = {float(st["step"]) for st in t2.optimizer.state.values()}
        assert steps == {3.0}, steps
        t2.world.close()


@needs_gloo
def test_trainer_checkpoint_bad_input(tmp_path):
    """A checkpoint of another model config, or a one-file (DDP) checkpoint under `parallel`:
    a ValueError before anything is written; a `parallel` key or value that is wrong: at once."""
    from r1x.train import SFTConfig, SFTTrainer

    base = dict(SFT_COMMON, eval_steps=0)
    SFTTrainer(SFTConfig(output_dir=str(tmp_path / "plain"), max_steps=1, **base)).train()
    SFTTrainer(SFTConfig(output_dir=str(tmp_path / "sharded"), max_steps=1, parallel={"ep": 1}, **base)).train()
    other = dict(base, model_overrides={"bias_update_speed": 0.0, "moe_intermediate_size": 48})
    for src, spec in (("plain", {}), ("sharded", {"ep": 1})):
        t = SFTTrainer(SFTConfig(output_dir=str(tmp_path / f"x{src}"), max_steps=2, parallel=spec,
                                 resume=str(tmp_path / src / "checkpoint-1"), **other))
        with pytest.raises(ValueError, match="another model: its config has moe_intermediate_size"):
            t.train()
        assert not (tmp_path / f"x{src}").exists()
    t = SFTTrainer(SFTConfig(output_dir=str(tmp_path / "y"), max_steps=2, parallel={"ep": 1},
                             resume=str(tmp_path / "plain" / "checkpoint-1"), **base))
    with pytest.raises(ValueError, match="written without `parallel`"):
        t.train()
    assert not (tmp_path / "y").exists()
    t.world.close()
    with pytest.raises(ValueError, match=r"`parallel` has unknown key\(s\) \['tp'\]"):
        SFTConfig.from_dict(parallel={"tp": 2})
    with pytest.raises(ValueError, match="`parallel.ep` must be a positive integer"):
        SFTConfig.from_dict(parallel={"ep": 0})
    with pytest.raises(ValueError, match="`parallel.mixed_precision`"):
        SFTConfig.from_dict(parallel={"mixed_precision": "fp16"})
    with pytest.raises(ValueError, match="`parallel` must be a mapping"):
        SFTConfig.from_dict(parallel=2)


@needs_gloo
def test_grpo_under_fsdp2_ep_reward_rises(tmp_path):
    """`torchrun --nproc_per_node 2` GRPO with `parallel: {ep: 2}` (KL to a gathered reference,
    two iterations per rollout, rollouts generated on the gathered weights): it completes and
    its reward (the share of digits in the completion) rises."""
    out = torchrun([str(TRAINER_SCRIPT), "grpo", str(tmp_path / "grpo")], cwd=tmp_path, nproc=2, timeout=600)
    assert "GRPO idle-rank OK" in out and "GRPO OK steps 16" in out, out[-3000:]
    rewards = [float(x) for x in re.search(r"GRPO rewards ([\d. ]+)", out).group(1).split()]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.05, rewards
    assert (tmp_path / "grpo" / "final" / "config.json").exists()


@needs_gloo
def test_distill_under_fsdp2_ep_matches_ddp(tmp_path):
    out = torchrun([str(TRAINER_SCRIPT), "distill", str(tmp_path)], cwd=tmp_path, nproc=2, timeout=600)
    assert "DISTILL OK" in out, out[-3000:]


@needs_gloo
def test_pipeline_under_torchrun_with_fsdp2_ep(tmp_path):
    """`torchrun -m r1x.cli pipeline --quick parallel={ep: 2}`: every stage runs sharded; rank 0
    alone evaluates and writes the summary, table and plot."""
    import json

    out = tmp_path / "pipe"
    stdout = torchrun(["-m", "r1x.cli", "pipeline", "--quick", "--output-dir", str(out), "parallel={ep: 2}",
                       "progress=false"], cwd=tmp_path, nproc=2, timeout=600)
    assert stdout.count("wrote ") == 1, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["parallel"] == {"ep": 2}
    for stage in ("sft", "grpo", "baseline_sft", "baseline_grpo"):
        assert "accuracy" in summary["stages"][stage], stage
        assert (out / stage / "final" / "config.json").exists()
        ckpts = [n for n in os.listdir(out / stage) if n.startswith("checkpoint-")]
        assert ckpts and all((out / stage / n / "dcp").is_dir() for n in ckpts), (stage, ckpts)
    assert (out / "results.md").exists()


@needs_gloo
def test_grpo_resume_mid_rollout_is_exact_under_ddp_and_fsdp2(tmp_path):
    """Each rank's in-flight rollout and RNG are checkpointed as its own (rank<r>.pt): a GRPO run
    resumed between the two iterations of a rollout repeats the uninterrupted run exactly."""
    out = torchrun([str(TRAINER_SCRIPT), "grpo_resume", str(tmp_path)], cwd=tmp_path, nproc=2, timeout=600)
    assert "GRPO resume OK ddp" in out and "GRPO resume OK fsdp" in out, out[-3000:]
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoint-1")) == ["config.json", "rank1.pt", "trainer_state.pt"]


@needs_gloo
def test_bench_dist_overhead_runs(tmp_path):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dist.py"
    r = subprocess.run([sys.executable, str(script), "--overhead", "--preset", "tiny", "--tokens", "16,64", "--steps", "1",
                        "--device", "cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "bench_dist_overhead_cpu.json").read_text())
    assert [rec["tokens"] for rec in data["results"]] == [16, 64]
    assert all(rec["plain_s"] > 0 and rec["ep1_s"] > 0 for rec in data["results"])


@needs_gloo
def test_mixed_precision_policy_in_one_process(tmp_path):
    """`parallel: {mixed_precision: bfloat16}` (torchtitan's policy: bf16 compute, fp32 reduction
    and master weights) trains close to fp32 and keeps the master weights in fp32."""
    from r1x.train import SFTConfig, SFTTrainer

    base = dict(SFT_COMMON, eval_steps=0, max_steps=3)
    ref = SFTTrainer(SFTConfig(output_dir=str(tmp_path / "fp32"), **base)).train()
    t = SFTTrainer(SFTConfig(output_dir=str(tmp_path / "bf16"), parallel={"mixed_precision": "bfloat16"}, **base))
    got = t.train()
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    for a, b in zip(ref, got):
        assert a["loss"] != b["loss"] and abs(a["loss"] - b["loss"]) < 2e-2 * a["loss"], (a, b)
    t.world.close()
