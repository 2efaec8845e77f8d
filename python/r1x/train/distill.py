"""Distillation into a smaller student: :class:`DistillTrainer` (sequence-level, as in the R1
paper, or token-level, GKD) and the token-level losses on logits (TRL ``GKDTrainer`` semantics).

The generalized Jensen-Shannon divergence of GKD (Agarwal et al., "On-Policy Distillation of
Language Models", https://arxiv.org/abs/2306.13649, Eq. 1), with forward and reverse KL as its
``beta`` end points, as pure functions of tensors.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from r1x.train import dist
from r1x.train.common import completion_logits, is_int, is_num, resolve_device, sample_completions
from r1x.train.sft import SFTConfig, SFTTrainer, build_model, default_rewards, load_examples

__all__ = ["generalized_jsd_loss", "forward_kl", "reverse_kl", "DistillConfig", "DistillTrainer", "teacher_samples",
           "NoTeacherDataError"]

# =============================================================================================
# Pure loss functions (the trainer lives further below, in its own section)
# =============================================================================================

REDUCTIONS = ("batchmean", "sum", "mean", "none")
IGNORE_INDEX = -100


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, summed over the last (vocabulary) dimension."""
    return (logp.exp() * (logp - logq)).sum(-1)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", *, num_items_in_batch=None) -> torch.Tensor:
    """Generalized JSD between teacher and student token distributions, as TRL's GKDTrainer.

    Both logits are divided by ``temperature``; ``p_S``, ``p_T`` are their softmaxes. Per position:

    - ``beta == 0``: forward KL, ``KL(p_T || p_S)``;
    - ``beta == 1``: reverse KL, ``KL(p_S || p_T)``;
    - otherwise, with the mixture ``m = beta * p_T + (1 - beta) * p_S`` (``log m`` by
      ``logaddexp``): ``beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``.

    This is TRL's convention (``trl/experimental/gkd/gkd_trainer.py``, ``generalized_jsd_loss``):
    ``beta`` weights the teacher both in the mixture and in the outer sum, so
    ``jsd(s, t, beta) == jsd(t, s, 1 - beta)``. Note the interior tends to 0 (not to the KLs)
    as ``beta`` approaches 0 or 1; the end points are special-cased, as in TRL.

    Positions whose ``labels`` are ``-100`` are ignored (they contribute 0). Reductions:

    - ``"batchmean"``: the sum / the number of kept positions (at least 1) when ``labels`` are
      given, else / ``size(0)`` of the logits (the batch size of 3-D ``[B, L, V]`` logits, the
      number of rows of 2-D ``[N, V]`` ones; 1 for a single ``[V]`` distribution), as TRL;
    - ``"sum"``: the sum over kept positions;
    - ``"mean"``: TRL's ``jsd.mean()`` over every kept (position, vocabulary) element, i.e.
      the sum / (kept positions * V) (0, not NaN, when nothing is kept);
    - ``"none"``: the per-position divergence, shape ``logits.shape[:-1]``, 0 at ignored
      positions (TRL instead returns the unsummed per-vocabulary terms).

    ``num_items_in_batch`` (keyword only), when given, overrides the reduction: the sum over
    kept positions / ``num_items_in_batch`` (TRL's gradient-accumulation-correct normaliser).

    Half-precision logits are computed in float32 (the result is float32); gradients flow to
    both logits (pass a detached or ``no_grad`` teacher).

    Args:
        student_logits: ``[..., V]`` floating-point student logits.
        teacher_logits: ``[..., V]`` teacher logits, the same shape.
        labels: optional integer tensor of shape ``logits.shape[:-1]``; ``-100`` = ignore.
        beta: interpolation coefficient in ``[0, 1]``.
        temperature: softmax temperature, ``> 0``.
        reduction: ``"batchmean"``, ``"sum"``, ``"mean"`` or ``"none"``.
        num_items_in_batch: optional normaliser ``> 0`` overriding ``reduction``.

    Returns:
        The reduced loss (a scalar), or the per-position divergences for ``"none"``.
    """
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < 1:
            raise ValueError(f"{name} must be a floating-point tensor [..., V], got "
                             + (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__))
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != student_logits.shape[:-1]):
        raise ValueError(f"labels must have the logits' leading shape {tuple(student_logits.shape[:-1])}, "
                         f"got {getattr(labels, 'shape', type(labels))}")
    if labels is not None and (labels.is_floating_point() or labels.is_complex()):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    try:
        beta, temperature = float(beta), float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"beta and temperature must be numbers, got {beta!r}, {temperature!r}") from None
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and not float(num_items_in_batch) > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")

    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    dtype = torch.float32 if dtype.itemsize < 4 else dtype
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0.0:
        jsd = _kl(log_t, log_s)
    elif beta == 1.0:
        jsd = _kl(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        jsd = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)

    if labels is None:
        kept, rows = max(jsd.numel(), 1), (max(jsd.shape[0], 1) if jsd.ndim else 1)
    else:
        keep = labels != IGNORE_INDEX
        jsd = jsd.masked_fill(~keep, 0.0)
        kept = rows = keep.sum().clamp(min=1)
    if num_items_in_batch is not None:
        n = num_items_in_batch
        return jsd.sum() / (n.to(jsd.device) if isinstance(n, torch.Tensor) else float(n))
    if reduction == "none":
        return jsd
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.sum() / (kept * student_logits.shape[-1])
    return jsd.sum() / rows

def forward_kl(student_logits, teacher_logits, labels=None, temperature=1.0) -> torch.Tensor:
    """Forward KL ``KL(p_T || p_S)`` (mode-covering; supervised KD), ``"batchmean"`` reduced.

    :func:`generalized_jsd_loss` with ``beta=0``; see there for ``labels`` and the reduction.
    """
    return generalized_jsd_loss(student_logits, teacher_logits, labels, beta=0.0, temperature=temperature)


def reverse_kl(student_logits, teacher_logits, labels=None, temperature=1.0) -> torch.Tensor:
    """Reverse KL ``KL(p_S || p_T)`` (mode-seeking; on-policy KD), ``"batchmean"`` reduced.

    :func:`generalized_jsd_loss` with ``beta=1``; see there for ``labels`` and the reduction.
    """
    return generalized_jsd_loss(student_logits, teacher_logits, labels, beta=1.0, temperature=temperature)


# ----------------------------------------------------------------------------------------------
# the trainer
MODES = ("sequence", "token")
LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass
class DistillConfig(SFTConfig):
    """Distillation's fields (see :class:`SFTConfig`; ``model``/``model_overrides`` are the
    student's).

    Args:
        teacher: the teacher's checkpoint folder (``save_pretrained`` layout).
        mode: ``"sequence"``: the teacher writes chains of thought for the train prompts, the
            wrong ones (by the reward functions) are rejected and the student is fine-tuned on
            the rest (the R1 paper's distillation); ``"token"``: the student matches the
            teacher's next-token distributions (``loss``) on the teacher's accepted sequences,
            and on its own samples for a fraction ``on_policy_fraction`` of the steps (GKD).
        num_prompts: train prompts the teacher answers.
        num_samples_per_prompt, teacher_temperature: the teacher's samples per prompt and
            their temperature (0: one greedy answer).
        max_new_tokens: the teacher's (and on-policy student's) completion length.
        loss, beta, distill_temperature: the token-level loss (:func:`generalized_jsd_loss`;
            ``beta`` for ``"jsd"``) and the softmax temperature of both models.
        on_policy_fraction: the share of token-level steps on student samples (TRL's ``lmbda``).
    """

    teacher: str = ""
    mode: str = "sequence"
    num_prompts: int = 2000
    num_samples_per_prompt: int = 4
    teacher_temperature: float = 0.7
    max_new_tokens: int = 64
    loss: str = "forward_kl"
    beta: float = 0.5
    distill_temperature: float = 1.0
    on_policy_fraction: float = 0.0

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.mode not in MODES:
            raise ValueError(f"{name}: `mode` must be one of {MODES}, got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"{name}: `loss` must be one of {LOSSES}, got {self.loss!r}")
        self.require(("num_prompts", "num_samples_per_prompt", "max_new_tokens"), lambda v: is_int(v) and v >= 1,
                     "an integer >= 1")
        for f, lo, hi in (("beta", 0, 1), ("on_policy_fraction", 0, 1)):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name}: `{f}` must be in [{lo}, {hi}], got {v!r}")
        self.require(("teacher_temperature", "distill_temperature"), lambda v: is_num(v) and v >= 0,
                     "a finite number >= 0")
        if self.distill_temperature == 0:
            raise ValueError(f"{name}: `distill_temperature` must be > 0")
        if self.mode == "token" and not self.completion_only_loss:
            raise ValueError(f'{name}: `completion_only_loss` must be true with mode "token" (its labels mark '
                             "where each prompt ends and the teacher-matched completion starts)")


class NoTeacherDataError(ValueError):
    """The teacher's samples were all rejected by the reward functions: nothing to distil."""


def teacher_samples(teacher, tokenizer, examples: list[dict], reward_funcs, *, num_samples: int, temperature: float,
                    max_new_tokens: int, seed: int, template_kwargs: dict | None = None,
                    max_batch: int = 256) -> tuple[list[dict], dict]:
    """Sequence-level distillation data: ``num_samples`` teacher completions per example,
    kept when every reward function gives it its full score (1), one copy of each distinct
    completion per prompt. Returns ``(rows [{"prompt", "completion", ...}], stats)``."""
    rows, _, outs, texts, columns = sample_completions(
        teacher, tokenizer, examples, max_new_tokens, num_samples=1 if temperature == 0 else num_samples,
        template_kwargs=template_kwargs, temperature=temperature, seed=seed, max_batch=max_batch)
    eos = tokenizer.eos_token_id
    ok = [True] * len(texts)
    for f in reward_funcs:
        vals = f([r["prompt"] for r in rows], texts, **columns)
        ok = [o and v is not None and float(v) >= 1.0 for o, v in zip(ok, vals)]
    kept, seen = [], set()
    for i, (r, t) in enumerate(zip(rows, texts)):
        if ok[i] and outs[i] and outs[i][-1] == eos and (r["prompt"], t) not in seen:
            seen.add((r["prompt"], t))
            kept.append({**r, "completion": t})
    solved = len({r["prompt"] for r in kept})
    stats = {"teacher/samples": len(texts), "teacher/accepted": sum(ok) / max(len(ok), 1),
             "teacher/prompts_solved": solved / max(len(examples), 1), "teacher/kept": len(kept)}
    return kept, stats


class DistillTrainer(SFTTrainer):
    """Distillation of a teacher into a smaller student (see :class:`DistillConfig`).

    Args:
        config: a :class:`DistillConfig`.
        model, tokenizer: the student (default: built from ``config.model``).
        teacher_model: the teacher (default: loaded from ``config.teacher``).
        train_dataset: prompts with the reward columns (default: ``config.dataset``'s train
            split, ``num_prompts`` of them); the teacher answers them.
        eval_dataset: held-out examples (default: the test split).
    """

    stage = "distill"

    def __init__(self, config: DistillConfig, model=None, tokenizer=None, teacher_model=None, train_dataset=None,
                 eval_dataset=None):
        from r1x.rewards import get_reward_funcs

        if teacher_model is None:
            if not config.teacher:
                raise ValueError("DistillTrainer: `teacher` must name the teacher's checkpoint folder")
            from r1x.model import DeepSeekForCausalLM

            teacher_model = DeepSeekForCausalLM.from_pretrained(config.teacher, dtype=config.torch_dtype)
        if model is None:
            model, tok = build_model(config)
            tokenizer = tokenizer or tok
        if model.config.vocab_size != teacher_model.config.vocab_size:
            raise ValueError(f"DistillTrainer: the student's vocab_size ({model.config.vocab_size}) differs from the "
                             f"teacher's ({teacher_model.config.vocab_size}); they must share the tokenizer")
        if tokenizer is None:
            from r1x.model.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
        self.teacher = teacher_model.to(resolve_device(config)).eval().requires_grad_(False)
        if train_dataset is None:
            train_dataset = load_examples(config, "train", config.num_prompts)
        rewards = get_reward_funcs(list(default_rewards(config)))
        # each rank samples the teacher on its share of the prompts; every rank gets all the rows
        world = dist.World.from_env()
        t0 = time.perf_counter()
        rows, stats = teacher_samples(
            self.teacher, tokenizer, world.shard(list(train_dataset)), rewards,
            num_samples=config.num_samples_per_prompt, temperature=config.teacher_temperature,
            max_new_tokens=config.max_new_tokens, seed=config.seed + world.rank, template_kwargs=config.template_kwargs)
        if world.distributed:
            rows = [r for part in world.all_gather_objects(rows) for r in part]
            stats = world.all_mean(stats)
            stats["teacher/kept"] = len(rows)
        self.teacher_stats = {**stats, "teacher/seconds": time.perf_counter() - t0}
        if not rows:
            raise NoTeacherDataError("DistillTrainer: the teacher solved none of the prompts; nothing to distil "
                                     f"({self.teacher_stats})")
        super().__init__(config, model=model, tokenizer=tokenizer, train_dataset=rows, eval_dataset=eval_dataset)
        self.log_line(f"teacher data: {self.teacher_stats}")

    def compute_loss(self, step: int):
        cfg = self.config
        if cfg.mode == "sequence":
            loss, metrics = super().compute_loss(step)
            return loss, {**metrics, **self.teacher_stats}
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        on_policy = bool(torch.rand((), generator=g) < cfg.on_policy_fraction)
        total = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            b = self.batch(step, micro)
            prompts, comps = [], []
            for ids, labels in b:
                k = next(i for i, v in enumerate(labels) if v != -100)
                prompts.append(ids[:k])
                comps.append(ids[k:])
            if on_policy:
                comps = self.generation_model().generate(prompts, cfg.max_new_tokens, temperature=1.0,
                                            seed=cfg.seed * 7919 + step * 131 + micro,
                                            max_batch=cfg.per_device_train_batch_size)
                self.model.train()
                keep = [i for i, c in enumerate(comps) if c]
                prompts, comps = [prompts[i] for i in keep], [comps[i] for i in keep]
            s_logits, mask, _ = completion_logits(self.ddp_model, prompts, comps)
            with torch.no_grad():
                t_logits, _, _ = completion_logits(self.teacher, prompts, comps)
            loss = generalized_jsd_loss(s_logits[mask], t_logits[mask],
                                        beta={"forward_kl": 0.0, "reverse_kl": 1.0}.get(cfg.loss, cfg.beta),
                                        temperature=cfg.distill_temperature)
            (loss / cfg.gradient_accumulation_steps).backward()
            total += loss.item() / cfg.gradient_accumulation_steps
        metrics = {"on_policy": float(on_policy), **self.teacher_stats}
        return self.world.all_mean({"loss": total})["loss"], metrics
