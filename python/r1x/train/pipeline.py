"""The DeepSeek-R1 recipe end to end: ``r1x pipeline``.

1. **SFT cold start**: the model (default: the ``tiny`` preset, fresh) learns the R1 template
   and the task's scratchpad from worked examples; on the default task three in four of them
   come from a solver that forgets to carry (:data:`TASK_DEFAULTS`).
2. **GRPO** from the SFT checkpoint with rule-based rewards (accuracy + format).
3. **Distillation** of the GRPO model into a smaller dense student (sequence-level: the
   teacher's verified chains of thought).
4. **Baseline**: the same student trained by GRPO alone (its own short cold start, then
   GRPO) for the distillation's wall time, the R1 paper's "distillation vs RL on the small
   model" comparison.

Each stage is evaluated on the task's held-out split (greedy; accuracy and format reward, and
on arithmetic ``forgot_carry``: the share of problems with a carry due that the model worked
the carry-forgetting way);
the output folder gets ``summary.json``, ``results.md`` (the table), ``metrics.jsonl`` (every
stage's records), the PNG plots and each stage's checkpoints and final model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from typing import Any

import torch

__all__ = ["PipelineConfig", "run_pipeline", "DEFAULTS", "TASK_DEFAULTS"]

# The embedded default: the tiny model on 3-digit arithmetic, sized for a 2-core CPU (512 s
# there, measured). Keys are the stage configs' fields.
DEFAULTS: dict[str, dict] = {
    # the cold start: worked examples (see TASK_DEFAULTS), one pass over ~20k problems
    "sft": dict(num_train_examples=20000, max_steps=1000, per_device_train_batch_size=32, learning_rate=3e-3,
                warmup_ratio=0.05, logging_steps=20),
    # 16 prompts x 8 samples a step; Adam at a constant 1e-4 (2e-4 already undoes part of the cold start)
    "grpo": dict(max_steps=250, num_generations=8, per_device_train_batch_size=128, learning_rate=1e-4,
                 min_lr_ratio=1.0, warmup_ratio=0.05, max_completion_length=64, temperature=1.0, loss_type="dapo",
                 beta=0.0, logging_steps=5, eval_steps=50, num_train_examples=20000),
    # the teacher's greedy chains of thought for 8k train prompts, the wrong ones rejected
    "distill": dict(mode="sequence", num_prompts=8000, num_samples_per_prompt=1, teacher_temperature=0.0,
                    max_steps=2000, per_device_train_batch_size=32, learning_rate=3e-3, warmup_ratio=0.05,
                    logging_steps=50),
    # the student: dense (no MoE), 2 layers of width 48, no MTP: under 1/3 of the teacher's parameters
    "student": dict(num_hidden_layers=2, first_k_dense_replace=2, hidden_size=48, intermediate_size=64,
                    q_lora_rank=32, kv_lora_rank=24, num_nextn_predict_layers=0),
}


# The embedded task's settings, under the user's ``task_kwargs``. On arithmetic the cold start
# is imperfect on purpose, as R1's was (its chains came from R1-Zero and few-shot prompting,
# unverified): three in four worked examples come from a solver that forgets to carry, their
# answers following the flawed chain. SFT picks up the habit; GRPO, rewarded for right answers
# only, drops it. ``task_kwargs.flawed_fraction=0`` gives the clean cold start (see the README
# for what GRPO adds there).
TASK_DEFAULTS: dict[str, dict] = {
    "arithmetic": dict(flawed_fraction=0.75),
}


@dataclasses.dataclass
class PipelineConfig:
    """``r1x pipeline``'s settings.

    Args:
        output_dir: everything goes here (one sub-folder per stage).
        seed: every stage's seed.
        model, model_overrides: the teacher (a ``DeepSeekConfig`` preset, built fresh).
        dataset, task_kwargs: the embedded task (``"arithmetic"``, ``"countdown"``) or a JSONL.
        sft, grpo, distill: overrides of each stage's config (:class:`r1x.train.SFTConfig`, ...)
            on top of :data:`DEFAULTS`.
        student: ``DeepSeekConfig`` overrides of the teacher's preset that make the student.
        baseline: also train the student by GRPO alone in the distillation's wall time.
        eval_examples, eval_max_new_tokens: the held-out evaluation.
        dtype: ``"float32"`` or ``"bfloat16"``; fp8: FP8 linear layers in every stage.
        num_threads: torch threads (0: torch's default).
        resume: continue an interrupted run in ``output_dir``: finished stages are kept, an
            unfinished one continues from its newest checkpoint.
        save_steps: checkpoint every N steps in each stage (0: only at the end).
        progress: progress bars.
        parallel: every stage's ``parallel`` (see :class:`r1x.train.TrainConfig`): e.g.
            ``{ep: 2}`` for FSDP2 + expert parallelism under ``torchrun``; empty: DDP.
    """

    output_dir: str = "r1x-pipeline"
    seed: int = 0
    model: str = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    dataset: str = "arithmetic"
    task_kwargs: dict = dataclasses.field(default_factory=dict)
    sft: dict = dataclasses.field(default_factory=dict)
    grpo: dict = dataclasses.field(default_factory=dict)
    distill: dict = dataclasses.field(default_factory=dict)
    student: dict = dataclasses.field(default_factory=dict)
    baseline: bool = True
    eval_examples: int = 300
    eval_max_new_tokens: int = 64
    dtype: str = "float32"
    fp8: bool = False
    num_threads: int = 0
    resume: bool = False
    save_steps: int = 50
    progress: bool = True
    parallel: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path=None, overrides: list[str] | None = None) -> "PipelineConfig":
        """From a YAML file and ``key=value`` overrides; dotted keys reach into the stage
        dicts (``grpo.max_steps=50``)."""
        from r1x.train.common import build_config, read_config

        return build_config(cls, read_config("PipelineConfig", path, overrides))

    def validate(self) -> None:
        """Build every stage's config (and the student's model config) now, so that a bad or
        unknown field raises before the first stage trains, not after it (``ValueError``)."""
        from r1x.model.config import PRESETS, DeepSeekConfig
        from r1x.train import DistillConfig, GRPOConfig, SFTConfig

        for f in ("sft", "grpo", "distill", "student", "model_overrides", "task_kwargs"):
            if not isinstance(getattr(self, f), dict):
                raise ValueError(f"PipelineConfig: `{f}` must be a mapping, got {getattr(self, f)!r}")
        for stage, cls in (("sft", SFTConfig), ("grpo", GRPOConfig), ("distill", DistillConfig)):
            try:
                cls.from_dict(self.stage_dict(stage))
            except (TypeError, ValueError) as e:
                raise ValueError(f"PipelineConfig: `{stage}`: {e}") from None
        from r1x.data import TASKS, get_task

        if self.dataset in TASKS:
            try:
                get_task(self.dataset, **self.resolved_task_kwargs())
            except (TypeError, ValueError) as e:
                raise ValueError(f"PipelineConfig: `task_kwargs`: {e}") from None
        if self.model in PRESETS:
            try:
                DeepSeekConfig.preset(self.model, **self.student_overrides())
            except (TypeError, ValueError) as e:
                raise ValueError(f"PipelineConfig: `student`: {e}") from None

    def stage_dict(self, stage: str) -> dict:
        base = dict(output_dir=os.path.join(self.output_dir, stage), seed=self.seed, dataset=self.dataset,
                    task_kwargs=self.resolved_task_kwargs(), eval_examples=self.eval_examples,
                    eval_max_new_tokens=self.eval_max_new_tokens, dtype=self.dtype, fp8=self.fp8,
                    num_threads=self.num_threads, save_steps=self.save_steps, progress=self.progress,
                    resume=self.resume, parallel=copy.deepcopy(self.parallel))
        key = "distill" if stage in ("distill",) else ("grpo" if stage.startswith("baseline_grpo") else stage)
        key = "sft" if stage == "baseline_sft" else key
        own = getattr(self, key)
        return {**base, **copy.deepcopy(DEFAULTS[key]), **copy.deepcopy(own)}

    def resolved_task_kwargs(self) -> dict:
        """The task's settings: :data:`TASK_DEFAULTS` for the dataset under ``task_kwargs``."""
        return {**copy.deepcopy(TASK_DEFAULTS.get(self.dataset, {})), **copy.deepcopy(self.task_kwargs)}

    def student_overrides(self) -> dict:
        return {**self.model_overrides, **DEFAULTS["student"], **self.student}


def _final(path: str) -> str:
    return os.path.join(path, "final")


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(_final(path), "config.json"))


def _evaluate(path: str, cfg: PipelineConfig, examples: list[dict], rewards) -> dict:
    from r1x.model import DeepSeekForCausalLM
    from r1x.model.tokenizer import load_tokenizer
    from r1x.train.common import evaluate_generations

    model = DeepSeekForCausalLM.from_pretrained(_final(path), dtype=getattr(torch, cfg.dtype),
                                                device="cuda" if torch.cuda.is_available() else "cpu")
    res = evaluate_generations(model, load_tokenizer(_final(path)), examples, rewards,
                               max_new_tokens=cfg.eval_max_new_tokens, return_completions=True)
    texts = res.pop("_completions")
    if cfg.dataset == "arithmetic":
        res["forgot_carry"] = forgot_carry_share(examples, texts)
    res["parameters"] = model.num_parameters(include_mtp=False)
    return res


def forgot_carry_share(examples: list[dict], texts: list[str]) -> float:
    """Among the arithmetic ``examples`` with a carry (or borrow) due, the share whose
    completion's scratchpad is exactly the carry-forgetting solver's
    (``forget_carry=True``): the habit the default cold start teaches and GRPO removes."""
    from r1x.data import split_completion
    from r1x.data.tasks import arithmetic_scratchpad

    due = slips = 0
    for ex, text in zip(examples, texts):
        flawed = arithmetic_scratchpad(ex["a"], ex["op"], ex["b"], forget_carry=True)
        if flawed != arithmetic_scratchpad(ex["a"], ex["op"], ex["b"]):
            due += 1
            slips += split_completion(text)[0] == flawed
    return slips / due if due else 0.0


def run_pipeline(cfg: PipelineConfig, log=print) -> dict:
    """Run the stages (see the module docstring); returns the summary (also written to
    ``output_dir/summary.json``)."""
    from r1x.train import DistillConfig, DistillTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
    from r1x.train.distill import NoTeacherDataError
    from r1x.train.sft import default_rewards

    cfg.validate()
    # under torchrun every rank runs the stages; rank 0 alone evaluates and writes the summary
    main = int(os.environ.get("RANK", "0")) == 0
    if not main:
        def log(*args, **kwargs):
            pass
    t_start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    os.makedirs(cfg.output_dir, exist_ok=True)
    out = cfg.output_dir
    summary: dict[str, Any] = {"config": dataclasses.asdict(cfg), "task_kwargs": cfg.resolved_task_kwargs(),
                               "stages": {}, "seconds": {}}
    sum_path = os.path.join(out, "summary.json")
    if cfg.resume and os.path.exists(sum_path):
        with open(sum_path, encoding="utf-8") as f:
            old = json.load(f)
        summary["stages"], summary["seconds"] = old.get("stages", {}), old.get("seconds", {})

    def save_summary():
        if not main:
            return
        tmp = sum_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, sum_path)

    sft_cfg = SFTConfig.from_dict({**cfg.stage_dict("sft"), "model": cfg.model,
                                   "model_overrides": dict(cfg.model_overrides)})
    from r1x.train.sft import load_examples

    held_out = load_examples(sft_cfg, "test", cfg.eval_examples)
    rewards = default_rewards(sft_cfg)

    def stage(name: str, make):
        path = os.path.join(out, name)
        if not (cfg.resume and _done(path)):  # without resume every stage trains afresh
            log(f"== {name} ==")
            t0 = time.perf_counter()
            trainer = make()
            trainer.train()
            summary["seconds"][name] = round(time.perf_counter() - t0, 1)
            del trainer
        if main and (name not in summary["stages"] or not cfg.resume):
            summary["stages"][name] = _evaluate(path, cfg, held_out, rewards)
            summary["stages"][name]["seconds"] = summary["seconds"].get(name)
        save_summary()
        _barrier()  # the other ranks wait for rank 0's evaluation
        if not main:
            return _final(path)
        log(f"   {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["stages"][name].items()
                                       if isinstance(v, float)))
        return _final(path)

    sft_final = stage("sft", lambda: SFTTrainer(sft_cfg))
    grpo_cfg = GRPOConfig.from_dict({**cfg.stage_dict("grpo"), "model": sft_final})
    grpo_final = stage("grpo", lambda: GRPOTrainer(grpo_cfg))
    student = cfg.student_overrides()
    dcfg = DistillConfig.from_dict({**cfg.stage_dict("distill"), "model": cfg.model, "model_overrides": student,
                                    "teacher": grpo_final})
    try:
        stage("distill", lambda: DistillTrainer(dcfg))
    except NoTeacherDataError as e:  # a weak teacher (e.g. --quick): report it, go on with the baseline
        log(f"   distill: skipped: {e}")
        summary["stages"]["distill"] = {"skipped": str(e)}
        save_summary()
    if cfg.baseline:
        # the same student by RL alone: the cold start's SFT then GRPO, in distillation's time
        budget = summary["seconds"].get("distill") or 60.0
        bsft = SFTConfig.from_dict({**cfg.stage_dict("baseline_sft"), "model": cfg.model,
                                    "model_overrides": student})
        bsft_final = stage("baseline_sft", lambda: SFTTrainer(bsft))
        left = max(budget - (summary["seconds"].get("baseline_sft") or 0.0), 1.0)
        bgrpo = GRPOConfig.from_dict({**cfg.stage_dict("baseline_grpo"), "model": bsft_final, "max_time": left})
        stage("baseline_grpo", lambda: GRPOTrainer(bgrpo))
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    if not main:
        return summary
    save_summary()
    _merge_metrics(out)
    summary["table"] = results_table(summary)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(summary["table"] + "\n")
    try:
        summary["plots"] = plot_pipeline(out, summary)
    except ImportError:  # matplotlib missing: the table and JSON still stand
        summary["plots"] = []
    save_summary()
    return summary


def _barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def _merge_metrics(out: str) -> None:
    lines = []
    for stage in ("sft", "grpo", "distill", "baseline_sft", "baseline_grpo"):
        p = os.path.join(out, stage, "metrics.jsonl")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                # the pipeline's stage name: the baseline's records say "sft" / "grpo" themselves
                lines += [json.dumps({**json.loads(ln), "stage": stage}) + "\n" for ln in f if ln.strip()]
    with open(os.path.join(out, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(lines)


def results_table(summary: dict) -> str:
    """The per-stage table (markdown): held-out accuracy, format reward, parameters, time."""
    carry = any("forgot_carry" in r for r in summary["stages"].values())
    rows = [("stage", "held-out accuracy", "format reward") + (("carry forgotten",) if carry else ())
            + ("parameters", "seconds")]
    label = {"sft": "SFT cold start (teacher)", "grpo": "+ GRPO (teacher)", "distill": "distilled student",
             "baseline_sft": "student: cold start", "baseline_grpo": "student: cold start + GRPO"}
    for name, r in summary["stages"].items():
        if "skipped" in r:
            rows.append((label.get(name, name), "skipped") + ("",) * (len(rows[0]) - 2))
            continue
        acc = r.get("accuracy", r.get("countdown", float("nan")))
        rows.append((label.get(name, name), f"{acc:.3f}", f"{r.get('format', float('nan')):.3f}")
                    + ((f"{r['forgot_carry']:.3f}" if "forgot_carry" in r else "",) if carry else ())
                    + (f"{r.get('parameters', 0):,}", f"{r.get('seconds') or 0:.0f}"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows[1:]])


def plot_pipeline(out: str, summary: dict | None = None) -> list[str]:
    """PNG plots of the stages' logged metrics: reward, held-out accuracy, KL, completion
    length (GRPO), and the training losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = []
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    panels = [("reward", "GRPO reward (train rollouts)"), ("eval/accuracy", "held-out accuracy (greedy)"),
              ("kl", "KL to the reference"), ("completions/mean_length", "completion length (tokens)"),
              ("loss", "training loss")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.4))
    if summary and summary.get("stages"):
        ax = axes[-1]
        names = list(summary["stages"])
        st = summary["stages"]
        accs = [st[n].get("accuracy", st[n].get("countdown", 0.0)) or 0.0 for n in names]
        slips = [st[n].get("forgot_carry") for n in names]
        w = 0.4 if any(v is not None for v in slips) else 0.8
        bars = ax.bar([i - (w / 2 if w < 0.8 else 0) for i in range(len(names))], accs, width=w,
                      color="tab:blue", label="accuracy")
        ax.bar_label(bars, labels=[f"{a:.2f}" for a in accs], fontsize=7)
        if w < 0.8:
            bars = ax.bar([i + w / 2 for i in range(len(names))], [v or 0.0 for v in slips], width=w,
                          color="tab:red", label="carry forgotten")
            ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "" for v in slips], fontsize=7)
            ax.legend(fontsize=7, loc="upper left")
        ax.set_xticks(range(len(names)), [n.replace("baseline_", "baseline\n") for n in names], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title("held-out, per stage", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    else:
        axes[-1].axis("off")
    stages = (summary or {}).get("stages", {})
    for ax, (key, title) in zip(axes, panels):
        for stage in dict.fromkeys(r["stage"] for r in recs):
            pts = [(r["step"], r[key]) for r in recs if r["stage"] == stage and key in r]
            start = {"grpo": "sft", "baseline_grpo": "baseline_sft"}.get(stage)
            if key == "eval/accuracy" and pts and start in stages and stage in stages:
                # the RL curve from its starting checkpoint's score to its final one (the table's)
                last = max(r["step"] for r in recs if r["stage"] == stage)
                pts = [(0, stages[start].get("accuracy"))] + pts + [(last, stages[stage].get("accuracy"))]
                pts = [(x, y) for x, y in dict(pts).items() if y is not None]
            if pts:
                ax.plot(*zip(*pts), label=stage, marker="." if len(pts) < 30 else None)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged" + (" (beta = 0: no KL term)" if key == "kl" else ""),
                    ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "pipeline.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main_summary_line(summary: dict) -> str:
    return f"pipeline finished in {summary.get('total_seconds', 0):.0f} s"


if __name__ == "__main__":  # pragma: no cover
    s = run_pipeline(PipelineConfig.from_yaml(None, sys.argv[1:]))
    print(s["table"])
