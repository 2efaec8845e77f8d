"""r1x.train: the trainers' mechanics on the tiny model (seconds each).

Per-token log-probabilities against a per-sequence float64 reference; SFT (the loss falls, the
completion-only loss, gradient accumulation); bit-identical resume (SFT, GRPO with its rollout
buffer); atomic, rotated checkpoints; the non-finite loss stop; seeded GRPO runs; GRPO's
metrics, reference model, dynamic sampling, truncation mask and a learnable toy reward;
distillation (token losses, sequence-level rejection, the errors); config validation.
"""

import json
import math
import os
import re
import statistics

import pytest
import torch

from r1x.data import encode_prompt, load_dataset
from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
from r1x.model.tokenizer import ByteTokenizer
from r1x.train import (DistillConfig, DistillTrainer, GRPOConfig, GRPOTrainer, NonFiniteLossError, SFTConfig,
                       SFTTrainer, Trainer)
from r1x.train import grpo as grpo_module
from r1x.train.grpo import group_advantages, process_advantages
from r1x.train.common import (STATE_FILE, completion_logits, decode_completion, evaluate_generations, pack_sequences,
                              sequence_logps, yaml_load)
from r1x.train.distill import NoTeacherDataError

TOK = ByteTokenizer()
EOS = TOK.eos_token_id
# a smaller student for distillation (the teacher is the tiny preset)
STUDENT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, first_k_dense_replace=2,
               num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, num_nextn_predict_layers=0)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest (and the trainers' num_threads setting
    would otherwise leak into later tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sft_config(tmp_path, name="sft", **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=8, num_train_examples=64,
                learning_rate=3e-3, logging_steps=1, progress=False, eval_examples=4, eval_max_new_tokens=8)
    return SFTConfig(**{**base, **kw})


def grpo_config(tmp_path, name="grpo", **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=8, num_generations=4,
                max_completion_length=8, num_train_examples=32, learning_rate=1e-2, min_lr_ratio=1.0,
                logging_steps=1, progress=False, eval_examples=4, eval_max_new_tokens=8)
    return GRPOConfig(**{**base, **kw})


def digit_reward(prompts, completions, **kw):
    """The share of digits in the completion: varies between samples, learnable."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def snapshot(model, trainable_only=False):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or not trainable_only}


def assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def count_calls(monkeypatch, obj, name):
    """Wrap ``obj.name`` to record the arguments of each call; returns the list."""
    calls = []
    orig = getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls.append(args)
        return orig(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


def interrupt_at(monkeypatch, trainer, step):
    """``compute_loss(step)`` raises KeyboardInterrupt (a Ctrl-C before that step's forward)."""
    orig = trainer.compute_loss

    def wrapped(s):
        if s == step:
            raise KeyboardInterrupt
        return orig(s)

    monkeypatch.setattr(trainer, "compute_loss", wrapped)


# ---------------------------------------------------------------------------------------------
# per-token log-probabilities
# ---------------------------------------------------------------------------------------------


def test_sequence_logps_match_per_sequence_reference():
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(DeepSeekConfig.preset("tiny")).eval()
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    lengths = [(3, 5), (1, 1), (7, 0), (2, 9), (5, 3), (4, 0)]  # different prompts, empty completions
    prompts = [torch.randint(0, V, (p,), generator=g).tolist() for p, _ in lengths]
    comps = [torch.randint(0, V, (c,), generator=g).tolist() for _, c in lengths]
    L = max(c for _, c in lengths)
    logits, lmask, targets = completion_logits(model, prompts, comps)
    assert logits.shape == (len(prompts), L, V) and logits.dtype == torch.float32
    for temperature in (1.0, 0.7):
        logps, mask, ent = sequence_logps(model, prompts, comps, with_entropy=True, temperature=temperature)
        assert logps.shape == mask.shape == ent.shape == (len(prompts), L)
        assert torch.equal(mask, lmask)
        for b, (p, c) in enumerate(zip(prompts, comps)):
            n = len(c)
            assert mask[b, :n].all() and not mask[b, n:].any()
            assert not logps[b, n:].any() and not ent[b, n:].any()
            if not n:
                continue
            with torch.no_grad():  # the sequence alone, batch of one, float64 softmax
                ref_logits = model(torch.tensor([p + c])).logits[0].double()
            rows = ref_logits[len(p) - 1: len(p) - 1 + n]  # row t predicts token t + 1
            lp = torch.log_softmax(rows / temperature, dim=-1)
            ref = lp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            torch.testing.assert_close(logps[b, :n].double(), ref, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(ent[b, :n].double(), -(lp.exp() * lp).sum(-1), atol=2e-5, rtol=1e-5)
            if temperature == 1.0:
                torch.testing.assert_close(logits[b, :n].double(), rows, atol=2e-5, rtol=1e-5)
                assert targets[b, :n].tolist() == c
    # gradients reach the model through the packed forward
    logps, _ = sequence_logps(model, prompts, comps)
    logps.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    # every completion empty: [B, 0]
    logps, mask = sequence_logps(model, prompts, [[] for _ in prompts])
    assert logps.shape == mask.shape == (len(prompts), 0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        completion_logits(model, [[1, 2], []], [[3], [4]])


def test_pack_sequences():
    ids, cu, lab = pack_sequences([[1, 2, 3], [], [4]], [[-100, 2, 3], [], [4]])
    assert ids.tolist() == [1, 2, 3, 4] and cu.tolist() == [0, 3, 3, 4] and cu.dtype == torch.int32
    assert lab.tolist() == [-100, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


def test_sft_loss_decreases(tmp_path):
    hist = SFTTrainer(sft_config(tmp_path, max_steps=20)).train()
    losses = [r["loss"] for r in hist]
    assert len(losses) == 20 and all(r["stage"] == "sft" for r in hist)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert hist[-1]["step"] == 20 and hist[0]["learning_rate"] > 0


def test_sft_loss_is_completion_only(tmp_path):
    """lm_loss of one step = the mean negative log-likelihood of the completion tokens
    (completion + eos) given the prompts, by sequence_logps; not of the prompt tokens."""
    cfg = sft_config(tmp_path, gradient_accumulation_steps=1)
    trainer = SFTTrainer(cfg)
    batch = trainer.batch(0, 0)
    prompts, comps = [], []
    for ids, labels in batch:
        k = next(i for i, v in enumerate(labels) if v != -100)
        assert all(v == -100 for v in labels[:k]) and labels[k:] == ids[k:] and ids[-1] == EOS
        prompts.append(ids[:k])
        comps.append(ids[k:])
    trainer.model.eval()
    with torch.no_grad():
        logps, mask = sequence_logps(trainer.model, prompts, comps)
    trainer.model.train()
    _, metrics = trainer.compute_loss(0)
    ref = -float(logps.double().sum() / mask.sum())
    assert metrics["lm_loss"] == pytest.approx(ref, rel=1e-5)
    # the loss over every token is another number
    cfg2 = sft_config(tmp_path, name="all", completion_only_loss=False)
    _, metrics2 = SFTTrainer(cfg2).compute_loss(0)
    assert abs(metrics2["lm_loss"] - metrics["lm_loss"]) > 1e-3


def _grads(trainer):
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_sft_gradient_accumulation(tmp_path):
    """Each micro-batch's loss is its mean over its completion tokens, and the micro-batch
    losses are averaged (the common convention). So 2 micro-batches of b give the gradient of 1
    batch of 2b when both micro-batches have the same number of completion tokens, and the
    mean of the two micro-batch means (not the token-weighted mean) when they do not."""
    over = dict(bias_update_speed=0.0)  # no MoE bias update between the micro-batches' forwards

    def equal_length(n):  # 2-digit + 2-digit < 100: every example has the same length
        return [{"prompt": f"{a}+{a + 1}", "completion": f"<think>x</think><answer>{2 * a + 1}</answer>"}
                for a in range(10, 10 + n)]

    def ragged(n):  # one long completion: whichever micro-batch gets it has more tokens
        return [{"prompt": f"{a}+1", "completion": "<think>" + "y" * (40 if a == 10 else a % 7)
                 + f"</think><answer>{a + 1}</answer>"} for a in range(10, 10 + n)]

    def grads(data, name, gas, bs):
        cfg = sft_config(tmp_path, name=name, gradient_accumulation_steps=gas, per_device_train_batch_size=bs,
                         model_overrides=over)
        t = SFTTrainer(cfg, train_dataset=data)
        t.compute_loss(0)
        return t, _grads(t)

    data = equal_length(8)
    _, g1 = grads(data, "a", 1, 8)
    _, g2 = grads(data, "b", 2, 4)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-6, rtol=1e-4, msg=n)

    data = ragged(8)
    _, g1 = grads(data, "c", 1, 8)
    t2, g2 = grads(data, "d", 2, 4)
    # the reference: 0.5 * (mean loss of micro-batch 0) + 0.5 * (mean loss of micro-batch 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t2.config.seed)
        ref_model = DeepSeekForCausalLM(DeepSeekConfig.preset("tiny", **over))
    for micro in range(2):
        b = t2.batch(0, micro)
        ids, cu, labels = pack_sequences([x[0] for x in b], [x[1] for x in b])
        (ref_model(ids, cu, labels=labels).loss * 0.5).backward()
    differs = False
    for n, p in ref_model.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(g2[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
        differs |= not torch.allclose(g2[n], g1[n], atol=1e-6, rtol=1e-4)
    assert differs  # micro-batches of unequal token counts: not the 2b batch's gradient


# ---------------------------------------------------------------------------------------------
# resume, checkpoints, non-finite losses
# ---------------------------------------------------------------------------------------------


def test_sft_resume_is_bit_identical(tmp_path, monkeypatch):
    kw = dict(max_steps=8, save_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    full = SFTTrainer(sft_config(tmp_path, name="full", **kw))
    hist_full = full.train()

    cfg = sft_config(tmp_path, name="cut", **kw)
    first = SFTTrainer(cfg)
    interrupt_at(monkeypatch, first, 7)  # checkpoints at 3 and 6; step 7 is logged, then lost
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert len(read_metrics(cfg.output_dir)) == 7
    second = SFTTrainer(cfg.replace(resume=True))
    calls = count_calls(monkeypatch, second, "compute_loss")
    hist = second.train()
    assert [c[0] for c in calls] == [6, 7]  # it continued from checkpoint-6
    assert [r["loss"] for r in hist] == [r["loss"] for r in hist_full]
    assert without_time(hist) == without_time(hist_full)
    assert_same_params(snapshot(second.model), snapshot(full.model))
    assert without_time(read_metrics(cfg.output_dir)) == without_time(read_metrics(full.config.output_dir))


def test_grpo_resume_is_bit_identical_with_rollout_buffer(tmp_path, monkeypatch):
    """num_iterations=2: steps 2k and 2k+1 share a rollout. The checkpoint after step 3 holds
    the rollout of steps 2-3 (step index 3 is its second iteration): resuming there must reuse
    it, not sample a new one."""
    kw = dict(max_steps=6, save_steps=3, num_iterations=2, beta=0.05)
    full = GRPOTrainer(grpo_config(tmp_path, name="full", **kw), reward_funcs=[digit_reward])
    hist_full = full.train()
    assert any(r["loss"] != 0 for r in hist_full)  # the rewards vary: a real update

    cfg = grpo_config(tmp_path, name="cut", **kw)
    first = GRPOTrainer(cfg, reward_funcs=[digit_reward])
    interrupt_at(monkeypatch, first, 4)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    second = GRPOTrainer(cfg.replace(resume=True), reward_funcs=[digit_reward])
    steps = count_calls(monkeypatch, second, "compute_loss")
    rollouts = count_calls(monkeypatch, second, "rollout")
    hist = second.train()
    assert [c[0] for c in steps] == [3, 4, 5]
    assert [c[0] for c in rollouts] == [2]  # step 3 used the checkpoint's rollout 1
    assert [r["loss"] for r in hist] == [r["loss"] for r in hist_full]
    assert without_time(hist) == without_time(hist_full)
    assert_same_params(snapshot(second.model), snapshot(full.model))
    assert_same_params(snapshot(second.ref_model), snapshot(full.ref_model))
    assert without_time(read_metrics(cfg.output_dir)) == without_time(read_metrics(full.config.output_dir))


def test_checkpoints_atomic_and_rotated(tmp_path):
    cfg = sft_config(tmp_path, max_steps=5, save_steps=1, save_total_limit=2)
    trainer = SFTTrainer(cfg)
    trainer.train()
    names = sorted(os.listdir(cfg.output_dir))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-4", "checkpoint-5"]
    assert not [n for n in names if ".tmp-" in n]
    for c in ("checkpoint-4", "checkpoint-5"):
        assert {STATE_FILE, "config.json"} <= set(os.listdir(os.path.join(cfg.output_dir, c)))
    state = torch.load(os.path.join(cfg.output_dir, "checkpoint-5", STATE_FILE), weights_only=False)
    assert state["step"] == 5 and len(state["history"]) == 5
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    saved = DeepSeekConfig.from_json_file(os.path.join(cfg.output_dir, "checkpoint-5", "config.json"))
    assert saved.to_dict() == trainer.model.config.to_dict()
    final = DeepSeekForCausalLM.from_pretrained(os.path.join(cfg.output_dir, "final"))
    for n, p in trainer.model.named_parameters():
        assert torch.equal(final.get_parameter(n), p.detach()), n
    assert ByteTokenizer.load(os.path.join(cfg.output_dir, "final")).special_tokens == TOK.special_tokens
    # save_total_limit=0 keeps them all
    cfg0 = sft_config(tmp_path, name="all", max_steps=3, save_steps=1, save_total_limit=0)
    SFTTrainer(cfg0).train()
    assert sorted(n for n in os.listdir(cfg0.output_dir) if n.startswith("checkpoint-")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_checkpoint_write_cut_short(tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous one whole; resume uses it and
    removes the temporary folder; a fresh run in the folder removes an earlier run's checkpoints."""
    cfg = sft_config(tmp_path, max_steps=4, save_steps=2)
    trainer = SFTTrainer(cfg)
    real_save = torch.save

    def save(obj, f, *a, **k):
        if trainer.step == 4:
            with open(f, "wb") as fh:
                fh.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    monkeypatch.setattr(torch, "save", real_save)
    names = os.listdir(cfg.output_dir)
    assert "checkpoint-2" in names and "checkpoint-4" not in names
    assert [n for n in names if n.startswith("checkpoint-4.tmp-")]
    os.makedirs(os.path.join(cfg.output_dir, "checkpoint-3.tmp-99999999"))  # another process's leftover
    second = SFTTrainer(cfg.replace(resume=True))
    calls = count_calls(monkeypatch, second, "compute_loss")
    second.train()
    assert [c[0] for c in calls] == [2, 3]
    names = os.listdir(cfg.output_dir)
    assert not [n for n in names if ".tmp-" in n]
    assert sorted(n for n in names if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    # a fresh run (no resume) with fewer steps: the old checkpoint-4 must not outlive it
    SFTTrainer(cfg.replace(max_steps=1, save_steps=0)).train()
    assert sorted(n for n in os.listdir(cfg.output_dir) if n.startswith("checkpoint-")) == ["checkpoint-1"]
    assert len(read_metrics(cfg.output_dir)) == 1


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch, what):
    cfg = sft_config(tmp_path, max_steps=8, save_steps=2)
    trainer = SFTTrainer(cfg)
    orig = trainer.compute_loss
    before = {}

    def poisoned(step):
        loss, metrics = orig(step)
        if step == 4:  # the 5th update; checkpoint-4 was written after the 4th
            before.update(snapshot(trainer.model, trainable_only=True))
            before["adam"] = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
            if what == "loss":
                return float("nan"), metrics
            trainer.model.lm_head.weight.grad[0, 0] = float("inf")
        return loss, metrics

    monkeypatch.setattr(trainer, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    msg = str(err.value)
    assert f"the {what} is" in msg and "at step 5" in msg
    assert os.path.join(cfg.output_dir, "checkpoint-4") in msg
    assert trainer.step == 4 and [r["step"] for r in trainer.history] == [1, 2, 3, 4]
    adam = before.pop("adam")
    assert_same_params(snapshot(trainer.model, trainable_only=True), before)
    for a, s in zip(adam, trainer.optimizer.state.values()):
        assert torch.equal(a, s["exp_avg"])
    # the message's checkpoint resumes
    ck = torch.load(os.path.join(cfg.output_dir, "checkpoint-4", STATE_FILE), weights_only=False)
    assert ck["step"] == 4


def test_non_finite_before_any_checkpoint(tmp_path, monkeypatch):
    trainer = SFTTrainer(sft_config(tmp_path, max_steps=3))
    monkeypatch.setattr(trainer, "compute_loss", lambda step: (float("inf"), {}))
    with pytest.raises(NonFiniteLossError, match="at step 1 .*none"):
        trainer.train()


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------


def test_grpo_seeded_runs_repeat(tmp_path):
    def run(name, seed):
        cfg = grpo_config(tmp_path, name=name, seed=seed, max_steps=3)
        t = GRPOTrainer(cfg, reward_funcs=[digit_reward])
        return without_time(t.train()), snapshot(t.model)

    h1, p1 = run("a", 0)
    h2, p2 = run("b", 0)
    h3, p3 = run("c", 1)
    assert h1 == h2
    assert_same_params(p1, p2)
    assert [r["loss"] for r in h1] != [r["loss"] for r in h3]
    assert any(not torch.equal(p1[n], p3[n]) for n in p1)


def test_grpo_metrics_and_reference_model(tmp_path):
    t0 = GRPOTrainer(grpo_config(tmp_path, name="b0", max_steps=1), reward_funcs=[digit_reward, "format"])
    assert t0.ref_model is None
    rec = t0.train()[-1]
    for key in ("loss", "grad_norm", "learning_rate", "reward", "reward_std", "rewards/digit/mean",
                "rewards/digit/std", "rewards/format/mean", "frac_reward_zero_std", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length",
                "completions/clipped_ratio", "entropy", "num_kept_completions"):
        assert key in rec, key
    assert "kl" not in rec
    assert 0 < rec["entropy"] < torch.log(torch.tensor(264.0)).item() + 1e-4
    assert 1 <= rec["completions/mean_length"] <= 8

    cfg = grpo_config(tmp_path, name="b1", max_steps=4, beta=0.1)
    t = GRPOTrainer(cfg, reward_funcs=[digit_reward])
    initial = snapshot(t.model)
    assert t.ref_model is not None and t.ref_model is not t.model and not t.ref_model.training
    assert all(not p.requires_grad for p in t.ref_model.parameters())
    assert_same_params(snapshot(t.ref_model), initial)
    hist = t.train()
    assert all(r["kl"] >= 0 for r in hist)
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at step 1
    assert hist[-1]["kl"] > 0
    assert_same_params(snapshot(t.ref_model), initial)  # frozen
    assert any(not torch.equal(p, initial[n]) for n, p in snapshot(t.model).items())


def _fake_generate(outputs):
    """A stand-in for model.generate: the given completions in turn (cycled)."""
    def generate(prompts, max_new_tokens, **kw):
        return [list(outputs[i % len(outputs)]) for i in range(len(prompts))]
    return generate


def test_grpo_dynamic_sampling_drops_zero_std_groups(tmp_path, monkeypatch):
    def constant(prompts, completions, **kw):
        return [0.5] * len(completions)

    cfg = grpo_config(tmp_path, name="const", max_steps=2, dynamic_sampling=True)
    t = GRPOTrainer(cfg, reward_funcs=[constant])
    before = snapshot(t.model)
    hist = t.train()
    assert [r["num_kept_completions"] for r in hist] == [0, 0]
    assert all(r["loss"] == 0 and r["frac_reward_zero_std"] == 1 for r in hist)
    assert_same_params(snapshot(t.model), before)

    # the reward varies within the groups of some prompts only: those groups are kept
    cfg = grpo_config(tmp_path, name="mixed", max_steps=1, dynamic_sampling=True, per_device_train_batch_size=16)
    t = GRPOTrainer(cfg, reward_funcs=[digit_reward])
    examples = t._prompts_for(0)
    constant_prompts = {examples[0]["prompt"], examples[2]["prompt"]}
    assert len({ex["prompt"] for ex in examples}) == 4

    def by_prompt(prompts, completions, **kw):
        return [1.0 if p in constant_prompts else float(len(c) % 2) for p, c in zip(prompts, completions)]

    t.reward_funcs = [by_prompt]
    comps = [[ord("1"), EOS], [ord("2"), ord("3"), EOS], [ord("4")] * 8, [ord("5"), ord("6"), ord("7"), EOS]]
    monkeypatch.setattr(t.model, "generate", _fake_generate(comps))
    r = t.rollout(0)
    assert r.metrics["num_kept_completions"] == 8 == len(r.completions)
    assert r.completions == comps * 2 and r.advantages.shape == (8,)
    assert r.prompts == [encode_prompt(examples[i]["prompt"], TOK) for i in (1, 3) for _ in range(4)]
    assert r.metrics["frac_reward_zero_std"] == 0.5
    rewards = [len(TOK.decode(c[:-1] if c[-1] == EOS else c)) % 2 for c in comps]  # the texts "1", "23", ...
    mean, sd = statistics.fmean(rewards), statistics.stdev(rewards)
    ref = torch.tensor([(x - mean) / (sd + 1e-4) for x in rewards] * 2)
    torch.testing.assert_close(r.advantages, ref)


def test_grpo_mask_truncated_completions(tmp_path, monkeypatch):
    # 263: an id of the model's padded vocabulary (264) that the tokenizer (263) does not know
    comps = [[263, ord("1"), EOS], [ord("2")] * 8, [ord("3"), ord("4"), EOS], [ord("5")] * 7 + [EOS]]
    for mask_truncated in (False, True):
        cfg = grpo_config(tmp_path, name=f"m{mask_truncated}", mask_truncated_completions=mask_truncated)
        t = GRPOTrainer(cfg, reward_funcs=[digit_reward])
        monkeypatch.setattr(t.model, "generate", _fake_generate(comps))
        r = t.rollout(0)
        assert r.completions == [comps[i % 4] for i in range(8)]
        for b, c in enumerate(r.completions):
            truncated = c[-1] != EOS  # 8 tokens without eos; 7 + eos is complete
            expect = [0 < len(c) and j < len(c) and not (mask_truncated and truncated) for j in range(8)]
            assert r.mask[b].tolist() == expect, (b, c)
        assert r.metrics["completions/clipped_ratio"] == 0.25
        assert r.metrics["rewards/digit/mean"] == 1.0  # "1" (263 dropped), "22222222", "34", "5555555"


def _digit_runs(prompts, completions, **kw):
    """A process reward: every run of digits is a step, rewarded by its parity."""
    return [[(m.end(), float(int(m.group()) % 2)) for m in re.finditer(r"\d+", c)] for c in completions]


@pytest.mark.parametrize("mode", ["return", "step"])
def test_grpo_process_reward_gives_per_token_advantages(tmp_path, monkeypatch, mode):
    # 263 decodes to nothing: the text offsets must still land on the right tokens
    comps = [TOK.encode("<think>1,22</think>") + [EOS], [263] + TOK.encode("3,45") + [EOS],
             TOK.encode("55") + [EOS], [ord("6")] * 4 + [ord(",")] + [ord("7")] * 3]
    cfg = grpo_config(tmp_path, name=mode, process_reward=_digit_runs, process_reward_weight=0.5,
                      process_advantage=mode)
    t = GRPOTrainer(cfg, reward_funcs=[digit_reward])
    monkeypatch.setattr(t.model, "generate", _fake_generate(comps))
    r = t.rollout(0)
    L = max(map(len, comps))
    assert r.advantages.shape == (8, L)
    texts = [decode_completion(TOK, c) for c in comps]
    steps, ends = [], []
    for c, text in zip(comps, texts):  # the token that completes each digit run, found by brute force
        st = _digit_runs(None, [text])[0]
        steps.append([v for _, v in st])
        ends.append([next(i for i in range(len(c)) if len(decode_completion(TOK, c[:i + 1])) >= e) for e, _ in st])
    assert ends[:2] == [[1, 4], [1, 4]]
    outcome = group_advantages(torch.tensor(digit_reward(None, texts) * 2), 4)
    want = outcome[:, None] + 0.5 * process_advantages(steps * 2, ends * 2, 4, L, mode)
    torch.testing.assert_close(r.advantages, want)
    assert r.metrics["process/step_reward_mean"] == pytest.approx(statistics.fmean(sum(steps, [])))
    # and the trainer steps on them
    t2 = GRPOTrainer(grpo_config(tmp_path, name=mode + "t", max_steps=2, process_reward="scratchpad",
                                 process_advantage=mode), reward_funcs=["accuracy", "format"])
    hist = t2.train()
    assert all(math.isfinite(h["loss"]) and "process/step_reward_mean" in h for h in hist)


@pytest.mark.parametrize("kw,match", [(dict(process_reward="nope"), "process_reward"),
                                      (dict(process_advantage="all"), "process_advantage"),
                                      (dict(process_reward_weight=float("nan")), "process_reward_weight")])
def test_grpo_process_reward_config_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        grpo_config(tmp_path, **kw).validate()


def test_decode_completion_and_evaluate_generations(monkeypatch):
    assert decode_completion(TOK, [ord("4"), 263, ord("2"), EOS]) == "42"
    assert TOK.vocab_size == 263 and DeepSeekConfig.preset("tiny").vocab_size == 264
    model = DeepSeekForCausalLM(DeepSeekConfig.preset("tiny"))
    examples = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]
    outs = [TOK.encode("<think>1+1=2>2</think><answer>2</answer>") + [263, EOS], [263] * 5]
    monkeypatch.setattr(model, "generate", lambda prompts, n, **kw: outs)
    res = evaluate_generations(model, TOK, examples, ("accuracy", "format"), max_new_tokens=8)
    assert res["accuracy"] == 0.5 and res["format"] == 0.5 and res["completions/mean_length"] == (14 + 5) / 2


def test_grpo_first_iteration_ratio_is_one_and_rollout_has_no_side_effects(tmp_path, monkeypatch):
    """num_iterations=2: old_logps are taken without changing the model (eval mode: no MoE
    bias update), so the first iteration's log-probabilities equal them bit for bit; the second
    iteration reuses the rollout."""
    cfg = grpo_config(tmp_path, max_steps=2, num_iterations=2)
    t = GRPOTrainer(cfg, reward_funcs=[digit_reward])
    t.model.train()
    state = {k: v.clone() for k, v in t.model.state_dict().items()}
    r = t.rollout(0)
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert t.model.training
    t._rollout = None
    seen = []
    real = grpo_module.grpo_loss

    def spy(logps, old, *a, **kw):
        seen.append((logps.detach().clone(), old))
        return real(logps, old, *a, **kw)

    monkeypatch.setattr(grpo_module, "grpo_loss", spy)
    rollouts = count_calls(monkeypatch, t, "rollout")
    t.train()
    assert len(rollouts) == 1 and len(seen) == 2
    assert torch.equal(seen[0][0], seen[0][1])  # ratio exactly 1 at the first iteration
    assert torch.equal(seen[1][1], t._rollout.old_logps)  # the second iteration: the same rollout
    assert not torch.equal(seen[1][0], seen[1][1])  # after one update
    assert r.old_logps.shape == r.mask.shape


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_gradient_accumulation_matches_one_pass(tmp_path, loss_type):
    """Chunked backward passes add up to the whole batch's loss and gradient (and metrics)."""
    comps = [[ord(str(i % 10))] * (i % 5 + 1) + [ord("a")] * (i % 3) + ([EOS] if i % 4 else []) for i in range(12)]
    def run(name, gas):
        cfg = grpo_config(tmp_path, name=name, loss_type=loss_type, gradient_accumulation_steps=gas, beta=0.1,
                          per_device_train_batch_size=12, num_generations=4, model_overrides={"bias_update_speed": 0.0})
        t = GRPOTrainer(cfg, reward_funcs=[digit_reward])
        t.model.generate = _fake_generate(comps)  # lengths that vary: chunks of unequal token counts
        # a policy that is not the reference, so the KL term has a gradient
        with torch.no_grad():
            for p in t.model.parameters():
                p.mul_(1.01)
        loss, metrics = t.compute_loss(0)
        return loss, metrics, _grads(t)

    l1, m1, g1 = run("one", 1)
    l3, m3, g3 = run("three", 3)
    assert l3 == pytest.approx(l1, rel=1e-5, abs=1e-7)
    for k in ("kl", "entropy", "clip_ratio/region_mean", "reward"):
        assert m3[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
    assert g1.keys() == g3.keys() and g1
    for n in g1:
        torch.testing.assert_close(g3[n], g1[n], atol=1e-6, rtol=1e-4, msg=n)


def test_grpo_learns_a_toy_reward(tmp_path):
    """The share of digits in a completion (about 4% for an untrained byte model) rises."""
    cfg = grpo_config(tmp_path, max_steps=20, per_device_train_batch_size=16, learning_rate=1e-2)
    hist = GRPOTrainer(cfg, reward_funcs=[digit_reward]).train()
    rewards = [r["reward"] for r in hist]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.15 and last > 0.5 and last > first + 0.3, rewards


# ---------------------------------------------------------------------------------------------
# distillation
# ---------------------------------------------------------------------------------------------


def _teacher(seed=1, **over):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DeepSeekForCausalLM(DeepSeekConfig.preset("tiny", **over))


def _oracle(model, examples, wrong=False):
    """The teacher writes the task's reference completion (or a wrong answer) for each prompt."""
    by_prompt = {tuple(encode_prompt(ex["prompt"], TOK)): ex for ex in examples}

    def generate(prompts, max_new_tokens, **kw):
        out = []
        for p in prompts:
            ex = by_prompt[tuple(p)]
            text = ex["completion"] if not wrong else f"<think>x</think><answer>{ex['answer']}1</answer>"
            out.append(TOK.encode(text) + [EOS])
        return out

    model.generate = generate
    return model


def distill_config(tmp_path, name="distill", **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=12, per_device_train_batch_size=8, num_prompts=16,
                num_samples_per_prompt=2, max_new_tokens=48, learning_rate=1e-2, logging_steps=1, progress=False,
                model_overrides=dict(STUDENT), eval_examples=4, eval_max_new_tokens=8)
    return DistillConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_distill_token_losses_decrease(tmp_path, loss):
    examples = load_dataset("arithmetic", "train", 16, seed=0)
    cfg = distill_config(tmp_path, mode="token", loss=loss)
    t = DistillTrainer(cfg, teacher_model=_oracle(_teacher(), examples), train_dataset=examples)
    hist = t.train()
    losses = [r["loss"] for r in hist]
    assert all(r["on_policy"] == 0 for r in hist) and all(x > 0 for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_distill_token_on_policy(tmp_path):
    examples = load_dataset("arithmetic", "train", 16, seed=0)
    cfg = distill_config(tmp_path, mode="token", loss="jsd", on_policy_fraction=1.0, max_steps=2, max_new_tokens=8)
    t = DistillTrainer(cfg, teacher_model=_oracle(_teacher(), examples), train_dataset=examples)
    hist = t.train()
    assert [r["on_policy"] for r in hist] == [1.0, 1.0]
    assert all(r["loss"] > 0 for r in hist)


def test_distill_sequence_keeps_what_the_rewards_accept(tmp_path):
    """An untrained teacher samples; a custom always-1 reward accepts every sample, and the
    rejection keeps exactly the samples that ended (eos), one copy per distinct text."""
    def always_one(prompts, completions, **kw):
        return [1.0] * len(completions)

    examples = load_dataset("arithmetic", "train", 16, seed=0)
    cfg = distill_config(tmp_path, mode="sequence", reward_funcs=[always_one], max_steps=3)
    teacher = _teacher()
    prompts = [encode_prompt(ex["prompt"], TOK) for ex in examples for _ in range(2)]
    outs = teacher.generate(prompts, cfg.max_new_tokens, temperature=cfg.teacher_temperature, seed=cfg.seed,
                            max_batch=256)
    expect = {}
    for ex, o in zip([ex for ex in examples for _ in range(2)], outs):
        if o[-1] == EOS:
            expect.setdefault((ex["prompt"], TOK.decode([x for x in o[:-1] if x < TOK.vocab_size])), None)
    assert expect, "no teacher sample ended; pick another seed"
    t = DistillTrainer(cfg, teacher_model=teacher, train_dataset=examples)
    assert t.teacher_stats["teacher/accepted"] == 1.0 and t.teacher_stats["teacher/samples"] == 32
    assert t.teacher_stats["teacher/kept"] == len(expect) == len(t.examples)
    got = set()
    for ids, labels in t.examples:
        k = next(i for i, v in enumerate(labels) if v != -100)
        assert ids[-1] == EOS
        ex = next(e for e in examples if encode_prompt(e["prompt"], TOK) == ids[:k])
        got.add((ex["prompt"], TOK.decode(ids[k:-1])))
    assert got == set(expect)
    hist = t.train()
    assert len(hist) == 3 and "teacher/kept" in hist[0]


def test_distill_sequence_oracle_and_errors(tmp_path):
    examples = load_dataset("arithmetic", "train", 8, seed=0)
    # default rewards (accuracy + format) accept the reference completions
    cfg = distill_config(tmp_path, mode="sequence", max_steps=2)
    t = DistillTrainer(cfg, teacher_model=_oracle(_teacher(), examples), train_dataset=examples)
    assert t.teacher_stats["teacher/prompts_solved"] == 1.0
    assert t.teacher_stats["teacher/kept"] == len(examples)  # two identical samples per prompt: one kept
    # ... and reject wrong answers
    with pytest.raises(NoTeacherDataError, match="solved none"):
        DistillTrainer(cfg, teacher_model=_oracle(_teacher(), examples, wrong=True), train_dataset=examples)
    # a student with another vocabulary
    bad = distill_config(tmp_path, model_overrides={**STUDENT, "vocab_size": 272})
    with pytest.raises(ValueError, match="vocab_size"):
        DistillTrainer(bad, teacher_model=_teacher(), train_dataset=examples)
    with pytest.raises(ValueError, match="teacher"):
        DistillTrainer(distill_config(tmp_path), train_dataset=examples)
    with pytest.raises(ValueError, match="completion_only_loss"):
        distill_config(tmp_path, mode="token", completion_only_loss=False).validate()


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,field,value", [
    (SFTConfig, "max_steps", -1), (SFTConfig, "max_steps", 2.5), (SFTConfig, "learning_rate", float("nan")),
    (SFTConfig, "warmup_ratio", 1.5), (SFTConfig, "adam_beta2", 1.0), (SFTConfig, "gradient_accumulation_steps", 0),
    (SFTConfig, "save_steps", -1), (SFTConfig, "dtype", "float16"), (SFTConfig, "fp8", "yes"),
    (SFTConfig, "resume", 3), (SFTConfig, "output_dir", ""), (SFTConfig, "per_device_train_batch_size", 0),
    (SFTConfig, "model_overrides", "tiny"), (SFTConfig, "num_train_examples", 0), (SFTConfig, "seed", True),
    (GRPOConfig, "num_generations", 0), (GRPOConfig, "per_device_train_batch_size", 6),
    (GRPOConfig, "loss_type", "ppo"), (GRPOConfig, "scale_rewards", "max"), (GRPOConfig, "beta", -0.1),
    (GRPOConfig, "temperature", 0), (GRPOConfig, "top_p", 0), (GRPOConfig, "top_k", -1),
    (GRPOConfig, "num_iterations", 0), (SFTConfig, "device", "tpu"), (GRPOConfig, "device", 0),
    (DistillConfig, "mode", "logits"), (DistillConfig, "loss", "kl"), (DistillConfig, "on_policy_fraction", 2),
    (DistillConfig, "distill_temperature", 0), (DistillConfig, "num_samples_per_prompt", 0),
])
def test_config_validation_names_the_field(cls, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        cls.from_dict({field: value})


def test_config_unknown_keys_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="max_stepz"):
        SFTConfig.from_dict({"max_stepz": 3})
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 7\nlearning_rate: 1e-3\nreward_funcs: [accuracy]\ntask_kwargs: {max_digits: 2}\n")
    cfg = GRPOConfig.from_yaml(path, ["learning_rate=3e-4", "fp8=false", "max-completion-length=12",
                                      "reward_funcs=[accuracy,format]", "output_dir=/tmp/x y", "system_prompt="])
    assert cfg.max_steps == 7 and cfg.learning_rate == 3e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.max_completion_length == 12 and cfg.fp8 is False
    assert cfg.reward_funcs == ["accuracy", "format"] and cfg.task_kwargs == {"max_digits": 2}
    assert cfg.output_dir == "/tmp/x y" and cfg.system_prompt == ""
    assert GRPOConfig.from_yaml(path).learning_rate == 1e-3
    with pytest.raises(ValueError, match="key=value"):
        SFTConfig.from_yaml(None, ["max_steps"])
    with pytest.raises(ValueError, match="`max_steps`"):
        SFTConfig.from_yaml(None, ["max_steps=ten"])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        SFTConfig.from_yaml(tmp_path / "list.yaml")
    assert yaml_load("1e3") == 1000.0 and yaml_load("-2.5E-2") == -0.025 and yaml_load("1e") == "1e"
    assert SFTConfig().replace(max_steps=3).max_steps == 3
    with pytest.raises(ValueError, match="`max_steps`"):
        SFTConfig().replace(max_steps=-3)
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer(None, {"max_steps": 1})
