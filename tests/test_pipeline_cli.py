"""r1x.train.pipeline and the ``r1x`` command: the quick pipeline end to end, its resume and
config overrides, one stage from a YAML file, and DDP under torchrun (two CPU processes, gloo)."""

import importlib.util
import json
import os
import sys
import textwrap

import pytest
import torch

from r1x import cli
from r1x.testing import torchrun
from r1x.train import Trainer
from r1x.train.distill import NoTeacherDataError
from r1x.train.pipeline import DEFAULTS, TASK_DEFAULTS, PipelineConfig

STAGES = ("sft", "grpo", "distill", "baseline_sft", "baseline_grpo")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # --threads / num_threads set the process-wide count


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------


def test_pipeline_quick(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    argv = ["pipeline", "--quick", "--threads", "1", "--output-dir", out, "progress=false"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "summary.json" in printed
    for f in ("summary.json", "results.md", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional
        with open(os.path.join(out, "pipeline.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert list(summary["stages"]) == list(STAGES)
    assert summary["config"]["output_dir"] == out and summary["total_seconds"] > 0
    # the quick teacher is (so far) too weak to solve a prompt: then distillation is reported as skipped
    ran = [s for s in STAGES if "skipped" not in summary["stages"][s]]
    assert set(STAGES) - set(ran) <= {"distill"}
    for s in ran:
        r = summary["stages"][s]
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["format"] <= 1 and r["parameters"] > 0, s
        assert os.path.exists(os.path.join(out, s, "final", "config.json")), s
        assert os.path.exists(os.path.join(out, s, "metrics.jsonl")), s
    student, teacher = summary["stages"]["baseline_sft"]["parameters"], summary["stages"]["sft"]["parameters"]
    assert student < teacher
    with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
        table = f.read()
    assert table.count("\n") == len(STAGES) + 2 and "held-out accuracy" in table
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))  # every stage's, by the pipeline's stage names
    for s in ran:
        assert [r for r in records if r["stage"] == s] == [{**r, "stage": s} for r in
                                                          read_jsonl(os.path.join(out, s, "metrics.jsonl"))], s
    assert {r["stage"] for r in records} == set(ran)
    assert all("reward" in r for r in records if r["stage"] in ("grpo", "baseline_grpo"))

    # --resume: every stage is finished, nothing trains again, the summary stands
    def no_training(self):
        raise AssertionError(f"{self.stage} trained again on --resume")

    monkeypatch.setattr(Trainer, "train", no_training)
    assert cli.main(argv + ["--resume"]) == 0
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        again = json.load(f)
    assert {s: again["stages"][s] for s in ran} == {s: summary["stages"][s] for s in ran}

    # without --resume the run starts over (it does not reuse finished stages)
    class Trained(Exception):
        pass

    def sentinel(self):
        raise Trained(self.stage)

    monkeypatch.setattr(Trainer, "train", sentinel)
    with pytest.raises(Trained, match="sft"):
        cli.main(argv)


def test_pipeline_config_overrides(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("seed: 3\ngrpo:\n  beta: 0.04\nstudent:\n  hidden_size: 32\n")
    cfg = PipelineConfig.from_yaml(path, ["grpo.max_steps=3", "grpo.learning_rate=3e-4", "sft.max_steps=2",
                                          "task_kwargs.max_digits=2", "output_dir=" + str(tmp_path / "o")])
    assert cfg.seed == 3 and cfg.grpo == {"beta": 0.04, "max_steps": 3, "learning_rate": 3e-4}
    assert cfg.task_kwargs == {"max_digits": 2}
    g = cfg.stage_dict("grpo")
    assert g["max_steps"] == 3 and g["beta"] == 0.04 and g["learning_rate"] == 3e-4
    untouched = [k for k in DEFAULTS["grpo"] if k not in cfg.grpo]
    assert untouched and all(g[k] == DEFAULTS["grpo"][k] for k in untouched)
    assert g["seed"] == 3 and g["output_dir"] == os.path.join(str(tmp_path / "o"), "grpo")
    assert g["task_kwargs"] == {**TASK_DEFAULTS["arithmetic"], "max_digits": 2}
    # the baseline stages take the sft / grpo overrides
    assert cfg.stage_dict("baseline_grpo")["max_steps"] == 3 and cfg.stage_dict("baseline_sft")["max_steps"] == 2
    assert cfg.student_overrides()["hidden_size"] == 32
    # bad fields raise before anything trains
    for over, field in ((["grpo.max_stepz=3"], "max_stepz"), (["sft.learning_rate=-1"], "learning_rate"),
                        (["distill.mode=logits"], "mode"), (["student.hidden_sise=3"], "hidden_sise"),
                        (["colour=red"], "colour"), (["grpo=3"], "grpo"),
                        (["task_kwargs.flawed_fraction=2"], "flawed_fraction"), (["task_kwargs.digits=2"], "digits")):
        with pytest.raises(ValueError, match=field):
            PipelineConfig.from_yaml(None, over)
    with pytest.raises(ValueError, match="key=value"):
        PipelineConfig.from_yaml(None, ["grpo.max_steps"])


# ---------------------------------------------------------------------------------------------
# one stage
# ---------------------------------------------------------------------------------------------


def test_stage_cli_with_yaml(tmp_path, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(textwrap.dedent("""\
        max_steps: 3
        per_device_train_batch_size: 4
        num_train_examples: 16
        learning_rate: 1e-3
        logging_steps: 1
        progress: false
        eval_examples: 4
        eval_max_new_tokens: 8
        task_kwargs: {max_digits: 2}
        """))
    out = str(tmp_path / "sft")
    assert cli.main(["sft", "--config", str(cfg), "--output-dir", out, "--threads", "1", "learning_rate=3e-4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[: printed.index("final model:")])
    assert report["step"] == 3 and report["stage"] == "sft" and "eval/accuracy" in report
    state = torch.load(os.path.join(out, "checkpoint-3", "trainer_state.pt"), weights_only=False)
    assert state["config"]["learning_rate"] == 3e-4 and state["config"]["max_steps"] == 3
    assert state["config"]["task_kwargs"] == {"max_digits": 2} and state["config"]["num_threads"] == 1
    assert len(read_jsonl(os.path.join(out, "metrics.jsonl"))) == 3
    final = os.path.join(out, "final")
    assert os.path.exists(os.path.join(final, "config.json"))

    # GRPO from that checkpoint, by key=value overrides only
    gout = str(tmp_path / "grpo")
    argv = ["grpo", "--output-dir", gout, "--threads", "1", f"model={final}", "max_steps=2", "num_generations=4",
            "per_device_train_batch_size=8", "max_completion_length=8", "num_train_examples=16", "logging_steps=1",
            "progress=false", "eval_examples=4", "eval_max_new_tokens=8", "beta=0.1"]
    assert cli.main(argv) == 0
    recs = read_jsonl(os.path.join(gout, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2] and all("kl" in r for r in recs)
    # distillation from a teacher that solves nothing fails with a clear error
    dargv = ["distill", "--output-dir", str(tmp_path / "d"), "--threads", "1", f"teacher={final}", "num_prompts=4",
             "num_samples_per_prompt=1", "max_new_tokens=8", "progress=false"]
    with pytest.raises(NoTeacherDataError, match="solved none"):
        cli.main(dargv)
    with pytest.raises(ValueError, match="max_stepz"):
        cli.main(["sft", "--output-dir", out, "max_stepz=3"])


# ---------------------------------------------------------------------------------------------
# DDP: torchrun, two CPU processes
# ---------------------------------------------------------------------------------------------

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def test_world_uses_gloo_when_ranks_outnumber_gpus(monkeypatch):
    """Two ranks on a one-GPU machine run on the CPU with gloo (NCCL with set_device(1) would fail
    with "invalid device ordinal"); one GPU per rank keeps NCCL."""
    from r1x.train.dist import World

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not World.cuda_fits()
    assert World(rank=1, world_size=2, local_rank=1, use_cuda=False).device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert World.cuda_fits()
    assert World(rank=1, world_size=2, local_rank=1, use_cuda=True).device == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not World.cuda_fits() and World().device == torch.device("cpu")


@needs_gloo
def test_ddp_sft_cli(tmp_path):
    out = tmp_path / "sft"
    stdout = torchrun(["-m", "r1x.cli", "sft", "--output-dir", str(out), "max_steps=3", "per_device_train_batch_size=4",
                    "num_train_examples=32", "logging_steps=1", "progress=false", "eval_examples=1",
                    "eval_max_new_tokens=8", "save_steps=2"], cwd=tmp_path)  # rank 1: no eval example
    assert stdout.count("final model:") == 1  # rank 0 reports
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]  # written once, not once per rank
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "final" / "config.json").exists()


DRIVER = r'''
import os, sys
import torch
import torch.distributed as dist
from r1x.train import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

out = sys.argv[1]
common = dict(logging_steps=1, progress=False, num_threads=1)
sft = SFTTrainer(SFTConfig(output_dir=os.path.join(out, "sft"), max_steps=3, per_device_train_batch_size=4,
                           num_train_examples=32, gradient_accumulation_steps=2, **common))
sft.train()
rank = dist.get_rank()


def reward(prompts, completions, **kw):
    # rank 1's rewards are constant: dynamic sampling drops all its groups (B = 0 there)
    if rank == 1:
        return [0.0] * len(completions)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


grpo = GRPOTrainer(GRPOConfig(output_dir=os.path.join(out, "grpo"), max_steps=3, per_device_train_batch_size=8,
                              num_generations=4, max_completion_length=8, num_train_examples=32,
                              learning_rate=1e-2, dynamic_sampling=True, gradient_accumulation_steps=2, beta=0.05,
                              **common), reward_funcs=[reward])
hist = grpo.train()
torch.save({"sft": {n: p.detach() for n, p in sft.model.named_parameters()},
            "grpo": {n: p.detach() for n, p in grpo.model.named_parameters()},
            "sft_examples": sft.examples[:8], "grpo_prompts": [ex["prompt"] for ex in grpo._prompts_for(0)],
            "kept": [r["num_kept_completions"] for r in hist], "loss": [r["loss"] for r in hist],
            "grad_norm": [r["grad_norm"] for r in hist],
            "lengths": (hist[-1]["completions/min_length"], hist[-1]["completions/max_length"]),
            "local_lengths": (grpo._rollout.metrics["completions/min_length"],
                              grpo._rollout.metrics["completions/max_length"])},
           os.path.join(out, f"rank{rank}.pt"))
grpo.world.close()
'''


@needs_gloo
def test_ddp_trainers_keep_ranks_in_step(tmp_path):
    """SFT and GRPO under DDP: the ranks train on different shards, end with identical
    parameters, and log once; GRPO does not hang when dynamic sampling leaves one rank with
    nothing to train on (with gradient accumulation)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    torchrun([str(script), str(tmp_path)], cwd=tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["sft_examples"] != r1["sft_examples"] and r0["grpo_prompts"] != r1["grpo_prompts"]
    for stage in ("sft", "grpo"):
        assert r0[stage].keys() == r1[stage].keys()
        for n in r0[stage]:
            assert torch.equal(r0[stage][n], r1[stage][n]), (stage, n)
    assert r0["loss"] == r1["loss"] and r0["kept"] == r1["kept"]
    assert all(k <= 4.0 for k in r0["kept"])  # the mean over ranks of <= 8 (rank 0) and 0 (rank 1)
    assert any(g > 0 for g in r0["grad_norm"])  # rank 0's groups did train
    # the length extremes are over both ranks' completions
    assert r0["lengths"] == r1["lengths"] == (min(r0["local_lengths"][0], r1["local_lengths"][0]),
                                              max(r0["local_lengths"][1], r1["local_lengths"][1]))
    for stage, n in (("sft", 3), ("grpo", 3)):
        assert [r["step"] for r in read_jsonl(tmp_path / stage / "metrics.jsonl")] == list(range(1, n + 1))


def test_pipeline_task_defaults():


    c = PipelineConfig()
    assert c.resolved_task_kwargs() == TASK_DEFAULTS["arithmetic"] and 0 < TASK_DEFAULTS["arithmetic"]["flawed_fraction"]
    for stage in ("sft", "grpo", "distill", "baseline_sft", "baseline_grpo"):
        assert c.stage_dict(stage)["task_kwargs"] == TASK_DEFAULTS["arithmetic"]
        assert "reward_funcs" not in c.stage_dict(stage)  # the task's own: accuracy + format
    # the user's settings win; another task gets none of arithmetic's
    c = PipelineConfig(task_kwargs={"flawed_fraction": 0.0, "max_digits": 2})
    assert c.stage_dict("sft")["task_kwargs"] == {"flawed_fraction": 0.0, "max_digits": 2}
    assert PipelineConfig(dataset="countdown").stage_dict("grpo")["task_kwargs"] == {}


def test_forgot_carry_share():
    from r1x.data import format_completion, get_task
    from r1x.data.tasks import add_scratchpad, sub_scratchpad
    from r1x.train.pipeline import forgot_carry_share

    rows = get_task("arithmetic").dataset("test", 200, seed=3)
    pad = lambda e, **kw: (add_scratchpad if e["op"] == "+" else sub_scratchpad)(e["a"], e["b"], **kw)  # noqa: E731
    due = [e for e in rows if pad(e) != pad(e, forget_carry=True)]
    assert 0 < len(due) < len(rows)
    right = [format_completion(pad(e), e["answer"]) for e in rows]
    flawed = [format_completion(pad(e, forget_carry=True), "0") for e in rows]
    assert forgot_carry_share(rows, right) == 0.0
    assert forgot_carry_share(rows, flawed) == 1.0
    half = [f if i % 2 else r for i, (r, f) in enumerate(zip(right, flawed))]
    want = sum(1 for i, e in enumerate(rows) if i % 2 and e in due) / len(due)
    assert forgot_carry_share(rows, half) == pytest.approx(want)
    assert forgot_carry_share([e for e in rows if e not in due], ["x"] * 200) == 0.0