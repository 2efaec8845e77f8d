"""GRPO (Group Relative Policy Optimization, DeepSeekMath / DeepSeek-R1): the trainer, its
config, and the advantage and loss functions.

The functions follow the semantics of TRL's ``GRPOTrainer`` (advantage normalisation, clipped
surrogate, k3 KL penalty, the ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``dapo`` aggregations and the
clip-ratio metrics), as pure functions of tensors: no model, no optimizer, no process group.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from r1x.train.common import (TrainConfig, Trainer, is_int, is_num, reward_name, sample_completions,
                              sequence_logps)
from r1x.train.sft import ModelConfigMixin, build_model, default_rewards, epoch_order, evaluate_stage, load_examples

__all__ = ["group_advantages", "grpo_loss", "process_advantages", "GRPOConfig", "GRPOTrainer", "Rollout", "LOSS_TYPES"]

# =============================================================================================
# Pure loss functions (the trainer lives further below, in its own section)
# =============================================================================================

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the standard deviation before dividing, as TRL does


def group_advantages(rewards, num_generations: int, scale_rewards="group") -> torch.Tensor:
    """Group-relative advantages of ``N`` rewards, grouped consecutively by prompt.

    Rows ``g*G .. g*G+G-1`` (``G = num_generations``) are the ``G`` completions of prompt ``g``.
    ``A = r - mean(group)``, then by ``scale_rewards``: ``"group"`` divides by the group's
    standard deviation ``+ 1e-4``, ``"batch"`` by the standard deviation of all ``N`` rewards
    ``+ 1e-4``, ``"none"`` does not divide (``True`` / ``False`` mean ``"group"`` / ``"none"``).
    Standard deviations are unbiased (``correction=1``), as torch's ``std`` in TRL.

    Degenerate sizes give zeros, never NaN: with ``G == 1`` every advantage is ``r - r = 0``
    (the std of one element is taken as 0), and with ``N == 1`` the ``"batch"`` std is 0.

    Args:
        rewards: 1-D tensor or sequence of ``N`` finite rewards, ``N % num_generations == 0``.
        num_generations: completions per prompt, ``>= 1``.
        scale_rewards: ``"group"``, ``"batch"``, ``"none"``, ``True`` or ``False``.

    Returns:
        ``[N]`` advantages in the rewards' floating dtype (float32 for non-float rewards).
    """
    if scale_rewards is True or scale_rewards is False:
        scale = "group" if scale_rewards else "none"
    elif isinstance(scale_rewards, str) and scale_rewards in SCALE_REWARDS:
        scale = scale_rewards
    else:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} or a bool, got {scale_rewards!r}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an int >= 1, got {num_generations!r}")
    r = rewards if isinstance(rewards, torch.Tensor) else torch.as_tensor(rewards)
    if r.ndim != 1 or r.is_complex():
        raise ValueError(f"rewards must be a 1-D real tensor, got shape {tuple(r.shape)} ({r.dtype})")
    if not r.is_floating_point():
        r = r.to(torch.float32)
    g = num_generations
    if r.numel() % g:
        raise ValueError(f"the number of rewards ({r.numel()}) is not a multiple of num_generations ({g})")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite (found NaN or inf)")
    grouped = r.view(-1, g)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(g) if g > 1 and r.numel() else torch.zeros_like(r)
    elif scale == "batch":
        std = r.std() if r.numel() > 1 else r.new_zeros(())
    return adv if scale == "none" else adv / (std + STD_EPS)


PROCESS_MODES = ("return", "step")


def process_advantages(step_rewards, step_ends, num_generations: int, length: int, mode: str = "return"):
    """Per-token advantages from step-level rewards: GRPO's process supervision (DeepSeekMath
    §4.1.3).

    Completion ``i`` has steps ``j`` with reward ``step_rewards[i][j]`` ending at token
    ``step_ends[i][j]`` (the index of the step's last token, ascending). Rewards are normalised
    per group over every step of the group's completions, ``(r - mean) / (std + 1e-4)``
    (unbiased std; 0 with a single step). Then with ``mode="return"`` (DeepSeekMath's) token
    ``t`` gets the sum of the normalised rewards of the steps ending at or after ``t``; with
    ``mode="step"`` it gets only the reward of the step it belongs to (tokens from just after
    the previous step's end through this step's end; a step ending on the same token as the
    previous one adds to that token). Tokens after the last step get 0.

    Args:
        step_rewards, step_ends: ``N`` lists of floats / of ints in ``[0, length)``.
        num_generations: ``G``; completions ``g*G .. g*G+G-1`` form a group.
        length: ``L``, the token columns of the result.
        mode: ``"return"`` or ``"step"``.

    Returns:
        ``[N, L]`` float32 advantages.
    """
    if mode not in PROCESS_MODES:
        raise ValueError(f"mode must be one of {PROCESS_MODES}, got {mode!r}")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations must be an int >= 1, got {num_generations!r}")
    n = len(step_rewards)
    if len(step_ends) != n or n % num_generations:
        raise ValueError(f"step_rewards ({n}) and step_ends ({len(step_ends)}) must have the same length, a "
                         f"multiple of num_generations ({num_generations})")
    out = torch.zeros(n, length, dtype=torch.float64)
    for g0 in range(0, n, num_generations):
        rows = range(g0, g0 + num_generations)
        flat = torch.tensor([float(v) for i in rows for v in step_rewards[i]], dtype=torch.float64)
        if not flat.numel():
            continue
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("step_rewards must be finite")
        std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        mean = flat.mean()
        for i in rows:
            ends, rs = list(step_ends[i]), step_rewards[i]
            if len(ends) != len(rs):
                raise ValueError(f"completion {i}: {len(rs)} step rewards but {len(ends)} step ends")
            if any(not 0 <= e < length for e in ends) or any(x > y for x, y in zip(ends, ends[1:])):
                raise ValueError(f"completion {i}: step ends must ascend within [0, {length}), got {ends}")
            start = 0
            for e, r in zip(ends, rs):
                v = (float(r) - mean) / (std + STD_EPS)
                if mode == "return":
                    out[i, : e + 1] += v
                else:  # a step that ends on the previous step's last token adds to that token
                    out[i, min(start, e): e + 1] += v
                start = e + 1
    return out.to(torch.float32)


def _check_float(name: str, t, shape) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {type(t).__name__}"
                         + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _nonneg(name: str, v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {v!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return v


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, epsilon_low=0.2, epsilon_high=0.2,
              beta=0.0, loss_type="grpo", max_completion_length=None, num_items_in_batch=None):
    """Clipped GRPO surrogate (plus ``beta`` times the k3 KL to the reference) over completion tokens.

    Per token, with ``ratio = exp(logps - old_logps)`` and ``A`` the sequence's (or the
    token's) advantage::

        loss_t = -min(ratio * A, clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
                 + beta * (exp(ref - logps) - (ref - logps) - 1)        # only when beta > 0

    aggregated over the tokens where ``mask`` is set, by ``loss_type`` (TRL's semantics):

    - ``"grpo"``: each sequence's masked mean (a sequence without tokens counts 1 in the
      denominator, i.e. contributes 0), then the mean over the ``B`` sequences.
    - ``"bnpo"``: sum over all masked tokens / ``max(number of masked tokens, 1)``.
    - ``"dr_grpo"``: sum over all masked tokens / ``(B * max_completion_length)``
      (``max_completion_length`` defaults to ``L``).
    - ``"dapo"``: like ``"bnpo"`` in one process. TRL normalises dapo by the *global* token
      count of the step (all ranks and accumulation steps) divided by the world size (DDP
      averages gradients); pass that as ``num_items_in_batch`` to override the denominator
      (a value of 0 is read as 1). ``num_items_in_batch`` is ignored by the other loss types.

    Gradients flow to ``logps`` only (``old_logps``, ``ref_logps`` and ``advantages`` are
    detached). Masked-out positions are neutralised before ``exp`` (ratio 1, KL 0 there), so
    arbitrary (even non-finite) values at padding change neither the loss nor the gradients.

    Args:
        logps: ``[B, L]`` log-probabilities of the sampled tokens under the current policy.
        old_logps: ``[B, L]`` those at sampling time, or ``None``: ``logps.detach()`` is used,
            so the ratio is 1 with its gradient intact (TRL with ``num_iterations == 1``).
        ref_logps: ``[B, L]`` under the reference model; required when ``beta > 0``, ignored
            (may be ``None``) when ``beta == 0``.
        advantages: ``[B]`` one advantage per sequence (see :func:`group_advantages`), or
            ``[B, L]`` one per token (process supervision, :func:`process_advantages`).
        mask: ``[B, L]`` bool or 0/1: the completion tokens (0 after EOS and at padding).
        epsilon_low, epsilon_high: clip range ``[1 - epsilon_low, 1 + epsilon_high]``, ``>= 0``.
        beta: KL coefficient, ``>= 0``.
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"`` or ``"dapo"``.
        max_completion_length: ``dr_grpo``'s constant length normaliser (int ``>= 1``).
        num_items_in_batch: ``dapo``'s denominator override (number ``>= 0``).

    Returns:
        ``(loss, stats)``: the scalar loss and a dict of python floats with TRL's metric names,
        masked means over tokens: ``"clip_ratio/low_mean"`` (ratio < 1 - epsilon_low and
        A < 0), ``"clip_ratio/high_mean"`` (ratio > 1 + epsilon_high and A > 0),
        ``"clip_ratio/region_mean"`` (either), and ``"kl"`` (mean k3) only when ``beta > 0``
        (absent otherwise, as TRL logs it only then).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    eps_lo, eps_hi, beta = (_nonneg(n, v) for n, v in
                            (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high), ("beta", beta)))
    if not isinstance(logps, torch.Tensor) or logps.ndim != 2:
        raise ValueError(f"logps must be a [B, L] tensor, got {getattr(logps, 'shape', type(logps))}")
    B, L = logps.shape
    if B < 1 or L < 1:
        raise ValueError(f"logps must have B >= 1 and L >= 1, got shape {tuple(logps.shape)}")
    _check_float("logps", logps, (B, L))
    old = logps.detach() if old_logps is None else old_logps
    _check_float("old_logps", old, (B, L))
    if beta > 0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta > 0")
        _check_float("ref_logps", ref_logps, (B, L))
    _check_float("advantages", advantages, (B, L) if getattr(advantages, "ndim", 1) == 2 else (B,))
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, L):
        raise ValueError(f"mask must be a [B, L] = {(B, L)} tensor, got {getattr(mask, 'shape', type(mask))}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be bool or contain only 0 and 1")
        mask = mask != 0
    if max_completion_length is not None and (isinstance(max_completion_length, bool) or not isinstance(
            max_completion_length, int) or max_completion_length < 1):
        raise ValueError(f"max_completion_length must be an int >= 1, got {max_completion_length!r}")
    if num_items_in_batch is not None and not float(num_items_in_batch) >= 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch!r}")

    adv = advantages.detach()
    adv = adv.unsqueeze(1) if adv.ndim == 1 else torch.where(mask, adv, 0.0)
    log_ratio = torch.where(mask, logps - old.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_lo, 1 + eps_hi) * adv)
    if beta > 0:
        d = torch.where(mask, ref_logps.detach() - logps, 0.0)
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    per_token = per_token.masked_fill(~mask, 0.0)
    n_tokens = mask.sum()
    if loss_type == "grpo":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo" or (loss_type == "dapo" and num_items_in_batch is None):
        loss = per_token.sum() / n_tokens.clamp(min=1)
    elif loss_type == "dapo":
        n = num_items_in_batch
        n = n.to(per_token.device) if isinstance(n, torch.Tensor) else float(n)
        loss = per_token.sum() / (n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1.0))
    else:  # dr_grpo
        loss = per_token.sum() / (B * (L if max_completion_length is None else max_completion_length))

    with torch.no_grad():
        count = n_tokens.clamp(min=1).double()
        low = (ratio < 1 - eps_lo) & (adv < 0) & mask
        high = (ratio > 1 + eps_hi) & (adv > 0) & mask
        stats = {"clip_ratio/low_mean": float(low.sum() / count),
                 "clip_ratio/high_mean": float(high.sum() / count),
                 "clip_ratio/region_mean": float((low | high).sum() / count)}
        if beta > 0:
            stats["kl"] = float(kl.masked_fill(~mask, 0).sum() / count)
    return loss, stats


# ----------------------------------------------------------------------------------------------
# the trainer
@dataclasses.dataclass
class GRPOConfig(ModelConfigMixin, TrainConfig):
    """GRPO's fields (TRL's names; see also :class:`TrainConfig` and ``ModelConfigMixin``).

    Args:
        num_generations: completions sampled per prompt (a group).
        per_device_train_batch_size: completions per step on each process (a multiple of
            ``num_generations``): ``per_device_train_batch_size / num_generations`` prompts.
        max_completion_length: new tokens per completion at most.
        temperature, top_p, top_k: the rollouts' sampling (the log-probabilities are taken at
            the same temperature).
        scale_rewards, epsilon_low, epsilon_high, beta, loss_type: see :func:`group_advantages`
            and :func:`grpo_loss`. ``beta = 0`` keeps no reference model.
        num_iterations: optimizer steps on each rollout batch (the ratio leaves 1 from the
            second on, and the clipping starts to act).
        mask_truncated_completions: completions that hit ``max_completion_length`` without
            an end-of-sequence token get no loss (DAPO).
        dynamic_sampling: drop groups whose rewards are all equal (they have zero advantage;
            DAPO).
        reward_funcs, reward_weights: rewards by name (``r1x.rewards.REWARD_FUNCS``) or
            callables, and their weights (default: all 1).
        generation_batch_size: sequences decoded together.
        process_reward: a step-level reward (a name in ``r1x.rewards.PROCESS_REWARD_FUNCS`` or a
            callable returning ``(end offset, reward)`` pairs per completion) for process
            supervision: its group-normalised step rewards become per-token advantages
            (:func:`process_advantages`), added to the outcome advantages times
            ``process_reward_weight``. ``process_advantage``: ``"return"`` (each token gets
            the steps from its own on, DeepSeekMath's) or ``"step"`` (its own step only).
        moe_bias_update: keep DeepSeek-V3's aux-loss-free balancing on during RL. Off by
            default: every training-mode forward moves the routers' bias, so the policy would
            drift between sampling and update for reasons the advantages know nothing about
            (measured on the pipeline's teacher: +3 points of held-out accuracy with it on, +7
            with it off, same 150 steps).
    """

    num_generations: int = 8
    per_device_train_batch_size: int = 64
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    scale_rewards: Any = "group"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    loss_type: str = "dapo"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False
    reward_weights: Any = None
    generation_batch_size: int = 256
    process_reward: Any = None
    process_reward_weight: float = 1.0
    process_advantage: str = "return"
    moe_bias_update: bool = False
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.0

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self.require(("num_generations", "per_device_train_batch_size", "max_completion_length", "num_iterations",
                      "generation_batch_size"), lambda v: is_int(v) and v >= 1, "an integer >= 1")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(f"{name}: `per_device_train_batch_size` ({self.per_device_train_batch_size}) must be a "
                             f"multiple of `num_generations` ({self.num_generations})")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"{name}: `loss_type` must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none", True, False):
            raise ValueError(f'{name}: `scale_rewards` must be "group", "batch" or "none", got {self.scale_rewards!r}')
        self.require(("epsilon_low", "epsilon_high", "beta", "temperature"), lambda v: is_num(v) and v >= 0,
                     "a finite number >= 0")
        if self.temperature == 0:
            raise ValueError(f"{name}: `temperature` must be > 0 (rollouts sample; 0 would be greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"{name}: `top_p` must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"{name}: `top_k` must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.process_advantage not in PROCESS_MODES:
            raise ValueError(f"{name}: `process_advantage` must be one of {PROCESS_MODES}, "
                             f"got {self.process_advantage!r}")
        self.require(("process_reward_weight",), is_num, "a finite number")
        if self.process_reward is not None and not callable(self.process_reward):
            from r1x.rewards import PROCESS_REWARD_FUNCS

            if self.process_reward not in PROCESS_REWARD_FUNCS:
                raise ValueError(f"{name}: `process_reward` must be a callable or one of "
                                 f"{sorted(PROCESS_REWARD_FUNCS)}, got {self.process_reward!r}")


@dataclasses.dataclass
class Rollout:
    """One step's rollout batch (per process)."""

    prompts: list[list[int]]
    completions: list[list[int]]
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    metrics: dict


class GRPOTrainer(Trainer):
    """Group Relative Policy Optimization (DeepSeekMath; the R1 recipe's RL stage).

    Each rollout samples ``num_generations`` completions for each of
    ``per_device_train_batch_size / num_generations`` prompts with r1x generation (paged latent
    cache, batched), scores them with the reward functions, and turns the rewards into group
    advantages; :func:`grpo_loss` then drives ``num_iterations`` optimizer steps on the batch.

    Args:
        config: a :class:`GRPOConfig`.
        model, tokenizer: given, or loaded from ``config.model`` (a checkpoint, e.g. SFT's).
        train_dataset: ``[{"prompt", "answer", ...}]``: prompts and the reward columns
            (default: ``config.dataset``'s train split).
        eval_dataset: held-out examples (default: the test split).
        reward_funcs: override ``config.reward_funcs`` (names or callables).
        ref_model: the frozen reference for the KL term (default: a copy of the initial model
            when ``beta > 0``; never kept when ``beta = 0``).
    """

    stage = "grpo"
    progress_keys = ("reward", "eval/accuracy")

    def __init__(self, config: GRPOConfig, model=None, tokenizer=None, train_dataset=None, eval_dataset=None,
                 reward_funcs=None, ref_model=None):
        from r1x.rewards import get_reward_funcs

        if model is None:
            model, tokenizer = build_model(config)
        if tokenizer is None:
            from r1x.model.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
        super().__init__(model, config, tokenizer)
        names = reward_funcs if reward_funcs is not None else default_rewards(config)
        self.reward_funcs = get_reward_funcs(list(names) if isinstance(names, (list, tuple)) else [names])
        w = config.reward_weights
        if w is None:
            w = [1.0] * len(self.reward_funcs)
        if len(w) != len(self.reward_funcs):
            raise ValueError(f"GRPOTrainer: `reward_weights` has {len(w)} entries for {len(self.reward_funcs)} "
                             "reward functions")
        self.reward_weights = [float(x) for x in w]
        self.process_func = config.process_reward
        if isinstance(self.process_func, str):
            from r1x.rewards import PROCESS_REWARD_FUNCS

            self.process_func = PROCESS_REWARD_FUNCS[self.process_func]
        if train_dataset is None:
            train_dataset = load_examples(config, "train", config.num_train_examples)
        if not train_dataset:
            raise ValueError("GRPOTrainer: `train_dataset` is empty")
        for i, ex in enumerate(train_dataset[:1]):
            if "prompt" not in ex:
                raise ValueError(f"GRPOTrainer: `train_dataset[{i}]` needs a 'prompt' key, got {sorted(ex)}")
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.ref_model = None
        if config.beta > 0:
            self.ref_model = ref_model if ref_model is not None else self.plain_copy()
            self.ref_model.eval().requires_grad_(False)
        self._rollout: Rollout | None = None
        if not config.moe_bias_update:
            for moe in getattr(model, "moe_layers", lambda: [])():
                moe.bias_update_speed = 0.0
        self._order = None

    # -- rollouts ----------------------------------------------------------------------------------
    def _prompts_for(self, rollout_idx: int) -> list[dict]:
        """This process's prompts of rollout ``rollout_idx``: the next ones of a seeded
        per-epoch order over the train set (global index ``i * world + rank``)."""
        cfg = self.config
        per = cfg.per_device_train_batch_size // cfg.num_generations
        n = len(self.train_dataset)
        out = []
        for k in range(per):
            i = (rollout_idx * per + k) * self.world.world_size + self.world.rank
            epoch, j = divmod(i, n)
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, epoch_order(n, cfg.seed, epoch))
            out.append(self.train_dataset[self._order[1][j]])
        return out

    @torch.no_grad()
    def rollout(self, rollout_idx: int) -> Rollout:
        from r1x.rewards import combine_rewards

        cfg = self.config
        G = cfg.num_generations
        tok = self.tokenizer
        eos = tok.eos_token_id
        examples = self._prompts_for(rollout_idx)
        rows, prompts, outs, texts, columns = sample_completions(
            self.generation_model(), tok, examples, cfg.max_completion_length, num_samples=G, template_kwargs=cfg.template_kwargs,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            seed=(cfg.seed * 1_000_003 + rollout_idx) * 64 + self.world.rank, max_batch=cfg.generation_batch_size)
        self.model.train()
        truncated = [not (o and o[-1] == eos) for o in outs]
        total, per_func = combine_rewards(self.reward_funcs, self.reward_weights,
                                          [r["prompt"] for r in rows], texts, **columns)
        metrics: dict[str, float] = {}
        for name, vals in per_func.items():
            v = torch.tensor([float("nan") if x is None else float(x) for x in vals], dtype=torch.float32)
            name = reward_name(name)
            metrics[f"rewards/{name}/mean"] = float(torch.nanmean(v))
            metrics[f"rewards/{name}/std"] = float(v[~v.isnan()].std()) if (~v.isnan()).sum() > 1 else 0.0
        rewards = torch.tensor(total, dtype=torch.float32)
        adv = group_advantages(rewards, G, cfg.scale_rewards)
        grouped = rewards.view(-1, G)
        std = grouped.std(dim=1) if G > 1 else torch.zeros(grouped.shape[0])
        lengths = torch.tensor([len(o) for o in outs], dtype=torch.float32)
        metrics.update({
            "reward": float(rewards.mean()),
            "reward_std": float(std.mean()),
            "frac_reward_zero_std": float((std < 1e-6).float().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": sum(truncated) / len(truncated),
        })
        if self.process_func is not None:
            proc, step_mean = self._process_advantages(rows, outs, texts, columns)
            adv = adv.unsqueeze(1) + cfg.process_reward_weight * proc
            metrics["process/step_reward_mean"] = step_mean
        keep = torch.ones(len(outs), dtype=torch.bool)
        if cfg.dynamic_sampling:
            keep = (std >= 1e-6).repeat_interleave(G)
        metrics["num_kept_completions"] = int(keep.sum())
        idx = keep.nonzero().flatten().tolist()
        prompts = [prompts[i] for i in idx]
        comps = [outs[i] for i in idx]
        L = max((len(c) for c in comps), default=0)
        mask = torch.zeros(len(comps), L, dtype=torch.bool)
        for b, c in enumerate(comps):
            mask[b, : len(c)] = True
            if cfg.mask_truncated_completions and truncated[idx[b]]:
                mask[b] = False
        adv = adv[idx] if idx else adv[:0]
        if adv.ndim == 2:
            adv = adv[:, :L]
        old = ref = None
        if comps and cfg.num_iterations > 1:
            # in eval mode, as the sampling ran: a training-mode forward has side effects (the
            # MoE's aux-loss-free bias update) that would move the policy before its first step
            policy = self.generation_model()  # under `parallel`: the gathered copy (no collectives)
            self.model.eval()
            old, _ = sequence_logps(policy, prompts, comps, temperature=cfg.temperature)
            self.model.train()
        if comps and self.ref_model is not None:
            ref, _ = sequence_logps(self.ref_model, prompts, comps, temperature=cfg.temperature)
        dev = self.model.device
        return Rollout(prompts, comps, mask.to(dev), adv.to(dev), old, ref, metrics)

    def _process_advantages(self, rows, outs, texts, columns) -> tuple[torch.Tensor, float]:
        """``[N, L]`` process advantages of a rollout (``L`` its longest completion) and the mean
        step reward: the process reward's text offsets mapped to the tokens that end them."""
        import bisect
        import itertools

        from r1x.train.common import decode_completion

        steps = self.process_func(prompts=[r["prompt"] for r in rows], completions=texts, **columns)
        if len(steps) != len(outs):
            raise ValueError(f"process reward returned {len(steps)} entries for {len(outs)} completions")
        L = max((len(o) for o in outs), default=0)
        all_r, all_e, flat = [], [], []
        for o, text, st in zip(outs, texts, steps):
            # where the text stands after each token: token by token when that adds up to the
            # text (a byte tokenizer on ASCII), else by decoding every prefix (monotone)
            offs = list(itertools.accumulate(len(decode_completion(self.tokenizer, [t])) for t in o))
            if (offs[-1] if offs else 0) != len(text):
                offs = list(itertools.accumulate((len(decode_completion(self.tokenizer, o[: t + 1]))
                                                  for t in range(len(o))), max))
            rs, es = [], []
            for end, rew in st or []:
                t = bisect.bisect_left(offs, int(end))
                if t < len(o) and (not es or t >= es[-1]):
                    rs.append(float(rew))
                    es.append(t)
            all_r.append(rs)
            all_e.append(es)
            flat += rs
        proc = process_advantages(all_r, all_e, self.config.num_generations, L, self.config.process_advantage)
        return proc, (sum(flat) / len(flat) if flat else 0.0)

    # -- the step --------------------------------------------------------------------------------
    def compute_loss(self, step: int):
        cfg = self.config
        it = step % cfg.num_iterations
        if it == 0 or self._rollout is None:
            self._rollout = self.rollout(step // cfg.num_iterations)
        r = self._rollout
        metrics = dict(r.metrics)
        B = len(r.completions)
        # the same metric keys on every step and rank (all_mean reduces them by position)
        sums: dict[str, float] = {"clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0,
                                  "clip_ratio/region_mean": 0.0, **({"kl": 0.0} if cfg.beta > 0 else {})}
        # under DDP every rank runs the same number of backward passes (each one all-reduces
        # the gradients), also a rank whose groups dynamic sampling dropped (B == 0)
        ddp = self.world.distributed
        chunks = cfg.gradient_accumulation_steps if ddp else min(cfg.gradient_accumulation_steps, B)
        bounds = [B * c // max(chunks, 1) for c in range(chunks + 1)]
        n_items = int(r.mask.sum())
        # dapo's denominator is the step's global token count over the world size, as TRL's
        # (DDP averages the ranks' gradients): every token weighs the same on every rank
        n_norm = self.world.all_sum(n_items) / self.world.world_size if ddp else n_items
        total = 0.0
        ent_sum, ent_n = 0.0, 0
        for c in range(chunks):
            a, b = bounds[c], bounds[c + 1]
            if a == b:
                if ddp:
                    self._idle_backward()
                continue
            logps, _, ent = sequence_logps(self.ddp_model, r.prompts[a:b], r.completions[a:b], with_entropy=True,
                                           temperature=cfg.temperature)
            Lc = logps.shape[1]
            m = r.mask[a:b, :Lc]
            old = None if r.old_logps is None else r.old_logps[a:b, :Lc]
            ref = None if r.ref_logps is None else r.ref_logps[a:b, :Lc]
            adv = r.advantages[a:b] if r.advantages.ndim == 1 else r.advantages[a:b, :Lc]
            loss, stats = grpo_loss(logps, old, ref, adv, m, epsilon_low=cfg.epsilon_low,
                                    epsilon_high=cfg.epsilon_high, beta=cfg.beta, loss_type=cfg.loss_type,
                                    max_completion_length=cfg.max_completion_length,
                                    num_items_in_batch=n_norm if cfg.loss_type == "dapo" else None)
            # chunk losses add up to the whole batch's: dapo divides by the batch's token count
            # already; bnpo's chunk mean is weighted by the chunk's share of the tokens
            w = {"dapo": 1.0, "bnpo": int(m.sum()) / max(n_items, 1)}.get(cfg.loss_type, (b - a) / B)
            (loss * w).backward()
            total += loss.item() * w
            for k, v in stats.items():  # token means: weighted by the chunk's share of the tokens
                sums[k] = sums.get(k, 0.0) + float(v) * int(m.sum()) / max(n_items, 1)
            ent_sum += float((ent * m).sum())
            ent_n += int(m.sum())
        metrics.update(sums)
        metrics["entropy"] = ent_sum / max(ent_n, 1)
        lo, hi = metrics["completions/min_length"], metrics["completions/max_length"]
        metrics = self.world.all_mean(metrics)
        if ddp:  # the extremes over all ranks' completions, not the mean of each rank's
            ends = self.world.all_gather_objects((lo, hi))
            metrics["completions/min_length"] = min(e[0] for e in ends)
            metrics["completions/max_length"] = max(e[1] for e in ends)
        return self.world.all_mean({"loss": total})["loss"], metrics

    def _idle_backward(self) -> None:
        """A backward pass of zero loss through the DDP model: joins the other ranks' gradient
        all-reduce when this rank has nothing to train on."""
        bos = self.tokenizer.bos_token_id
        ids = torch.tensor([0 if bos is None else bos], dtype=torch.int64, device=self.model.device)
        was = self.model.training
        self.model.eval()  # no side effects (the MoE bias update)
        (self.ddp_model(ids).logits.sum() * 0.0).backward()
        self.model.train(was)

    def state_extra(self) -> dict:
        return {"rollout": self._rollout}

    def load_state_extra(self, state: dict) -> None:
        self._rollout = state.get("rollout")

    def evaluate(self) -> dict:
        return evaluate_stage(self)
