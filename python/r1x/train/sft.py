"""Supervised fine-tuning: the R1 recipe's cold start.

:class:`SFTTrainer` trains on ``{"prompt", "completion"}`` examples with the loss on the
completion tokens only (the prompt, in the chat template, is context), packs each micro-batch
into one variable-length batch (no padding: ``cu_seqlens``), accumulates gradients, and uses
the shared loop of :class:`r1x.train.common.Trainer` (AdamW, warm-up + cosine, clipping,
evaluation, atomic checkpoints, resume, DDP).

    from r1x.train import SFTConfig, SFTTrainer
    cfg = SFTConfig(output_dir="out/sft", dataset="arithmetic", max_steps=200)
    trainer = SFTTrainer(cfg)          # builds the model and tokenizer from cfg.model
    trainer.train()
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from r1x.train.common import TrainConfig, Trainer, evaluate_generations, is_int

__all__ = ["SFTConfig", "SFTTrainer", "ModelConfigMixin", "build_model", "load_examples", "epoch_order"]


@dataclasses.dataclass
class ModelConfigMixin:
    """Where a stage's model and data come from.

    Args:
        model: a ``DeepSeekConfig`` preset name (``"tiny"``: a fresh model seeded by ``seed``)
            or a checkpoint folder (``save_pretrained`` layout).
        model_overrides: ``DeepSeekConfig`` fields changed on a preset.
        dataset: an embedded task name (``"arithmetic"``, ``"countdown"``) or a ``.jsonl`` path.
        task_kwargs: the task's arguments (e.g. ``{"max_digits": 3}``).
        num_train_examples: examples drawn from the task's train split.
        eval_dataset: the held-out set (default: the task's ``"test"`` split; a ``.jsonl`` path).
        reward_funcs: the evaluation's rewards (default: the task's ``default_rewards``).
        system_prompt: the chat template's system line (None: the compact template).
    """

    model: str = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    dataset: str = "arithmetic"
    task_kwargs: dict = dataclasses.field(default_factory=dict)
    num_train_examples: int = 20000
    eval_dataset: Any = None
    reward_funcs: Any = None
    system_prompt: Any = None

    @property
    def template_kwargs(self) -> dict:
        return {"system": self.system_prompt} if self.system_prompt else {}

    def validate(self) -> None:
        super().validate()  # TrainConfig's (the stage configs list this mixin first)
        self.require(("model", "dataset"), lambda v: isinstance(v, str) and v != "", "a non-empty string")
        self.require(("model_overrides", "task_kwargs"), lambda v: isinstance(v, dict), "a mapping")
        self.require("num_train_examples", lambda v: is_int(v) and v >= 1, "an integer >= 1")


@dataclasses.dataclass
class SFTConfig(ModelConfigMixin, TrainConfig):
    """SFT's fields (see :class:`TrainConfig` and :class:`ModelConfigMixin`).

    Args:
        per_device_train_batch_size: sequences per micro-batch (packed).
        max_length: sequences longer than this (prompt + completion, in tokens) are dropped.
        completion_only_loss: the loss on the completion tokens only (TRL's default).
    """

    per_device_train_batch_size: int = 32
    max_length: int = 256
    completion_only_loss: bool = True
    learning_rate: float = 3e-3

    def validate(self) -> None:
        super().validate()
        self.require(("per_device_train_batch_size", "max_length", "num_train_examples"),
                     lambda v: is_int(v) and v >= 1, "an integer >= 1")


def build_model(cfg, device=None):
    """``(model, tokenizer)`` from ``cfg.model``: a preset built fresh (seeded by
    ``cfg.seed``) with the byte tokenizer, or a checkpoint folder with its tokenizer."""
    import os

    from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
    from r1x.model.tokenizer import ByteTokenizer, load_tokenizer

    dtype = cfg.torch_dtype
    spec = cfg.model
    if isinstance(spec, str) and os.path.isdir(spec):
        model = DeepSeekForCausalLM.from_pretrained(spec, dtype=dtype, device=device)
        tok = load_tokenizer(spec)
    else:
        mc = DeepSeekConfig.preset(spec, **(cfg.model_overrides or {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = DeepSeekForCausalLM(mc, dtype=dtype, device=device)
        tok = ByteTokenizer()
    if cfg.fp8:
        from r1x.nn import FP8Linear  # noqa: F401  (the model swaps its projections)

        model.to_fp8(freeze=False)
    return model, tok


def load_examples(cfg, split: str, n: int | None = None, seed_offset: int = 0) -> list[dict]:
    """``cfg.dataset``'s ``split`` (``"train"``, or ``"test"`` / ``cfg.eval_dataset``)."""
    from r1x.data import load_dataset

    src = cfg.dataset
    if split == "test" and cfg.eval_dataset:
        src, split = cfg.eval_dataset, "train"
    return load_dataset(src, split=split, n=n, seed=cfg.seed + seed_offset, **(cfg.task_kwargs or {}))


def default_rewards(cfg) -> tuple:
    if cfg.reward_funcs:
        return tuple(cfg.reward_funcs) if isinstance(cfg.reward_funcs, (list, tuple)) else (cfg.reward_funcs,)
    from r1x.data import get_task

    try:
        return tuple(get_task(cfg.dataset, **(cfg.task_kwargs or {})).default_rewards)
    except ValueError:  # a JSONL file
        return ("accuracy", "format")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation seeded by ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class SFTTrainer(Trainer):
    """Completion-only SFT with packing (see the module docstring).

    Args:
        config: an :class:`SFTConfig`.
        model, tokenizer: given, or built from ``config.model``.
        train_dataset: ``[{"prompt", "completion", ...}]`` (default: ``config.dataset``'s
            train split, ``num_train_examples`` of them).
        eval_dataset: held-out ``[{"prompt", "answer", ...}]`` (default: the test split).
    """

    stage = "sft"

    def __init__(self, config: SFTConfig, model=None, tokenizer=None, train_dataset=None, eval_dataset=None):
        if model is None:
            model, tokenizer = build_model(config)
        if tokenizer is None:
            from r1x.model.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
        super().__init__(model, config, tokenizer)
        from r1x.data import encode_sft

        if train_dataset is None:
            train_dataset = load_examples(config, "train", config.num_train_examples)
        if not train_dataset:
            raise ValueError("SFTTrainer: `train_dataset` is empty")
        self.examples = []
        for i, ex in enumerate(train_dataset):
            if "prompt" not in ex or "completion" not in ex:
                raise ValueError(f"SFTTrainer: `train_dataset[{i}]` needs 'prompt' and 'completion' keys, "
                                 f"got {sorted(ex)}")
            ids, labels = encode_sft(ex, tokenizer, config.template_kwargs)
            if not config.completion_only_loss:
                labels = list(ids)
            if len(ids) <= config.max_length:
                self.examples.append((ids, labels))
        if not self.examples:
            raise ValueError(f"SFTTrainer: every example is longer than `max_length` = {config.max_length}")
        self.examples = self.world.shard(self.examples) or self.examples
        self.eval_dataset = eval_dataset
        self.reward_funcs = default_rewards(config)

    def batch(self, step: int, micro: int) -> list[tuple[list[int], list[int]]]:
        """Micro-batch ``micro`` of optimizer step ``step``: the next examples in the seeded
        epoch order (a pure function of the step, so resuming needs no data state)."""
        cfg = self.config
        bs = cfg.per_device_train_batch_size
        n = len(self.examples)
        start = (step * cfg.gradient_accumulation_steps + micro) * bs
        out = []
        for i in range(start, start + bs):
            epoch, j = divmod(i, n)
            if j == 0 or not hasattr(self, "_order") or self._order[0] != epoch:
                self._order = (epoch, epoch_order(n, self.config.seed, epoch))
            out.append(self.examples[self._order[1][j]])
        return out

    def compute_loss(self, step: int):
        cfg = self.config
        from r1x.train.common import pack_sequences

        dev = self.model.device
        total, lm, mtp, ntok = 0.0, 0.0, 0.0, 0
        for micro in range(cfg.gradient_accumulation_steps):
            b = self.batch(step, micro)
            ids, cu, labels = pack_sequences([x[0] for x in b], [x[1] for x in b], device=dev)
            out = self.ddp_model(ids, cu, labels=labels)
            (out.loss / cfg.gradient_accumulation_steps).backward()
            total += out.loss.item()
            lm += out.lm_loss.item()
            mtp += out.mtp_loss.item() if out.mtp_loss is not None else 0.0
            ntok += int(ids.numel())
        k = cfg.gradient_accumulation_steps
        metrics = self.world.all_mean({"lm_loss": lm / k, "mtp_loss": mtp / k})
        metrics["num_tokens"] = self.world.all_sum(ntok)
        return self.world.all_mean({"loss": total / k})["loss"], metrics

    def evaluate(self) -> dict:
        return evaluate_stage(self)


def evaluate_stage(trainer) -> dict:
    """Held-out greedy accuracy/format of ``trainer.model`` (sharded over ranks)."""
    cfg = trainer.config
    if trainer.eval_dataset is None:
        trainer.eval_dataset = load_examples(cfg, "test", cfg.eval_examples)
    from r1x.rewards import get_reward_funcs
    from r1x.train.common import reward_name

    data = trainer.world.shard(trainer.eval_dataset[: cfg.eval_examples])
    was = trainer.model.training
    res = evaluate_generations(trainer.generation_model(), trainer.tokenizer, data, trainer.reward_funcs,
                               max_new_tokens=cfg.eval_max_new_tokens, template_kwargs=cfg.template_kwargs)
    trainer.model.train(was)
    if not trainer.world.distributed:
        return res
    # a mean over all ranks' examples, weighted by each rank's count; every rank sends the same
    # keys, also one whose share is empty (fewer examples than ranks)
    keys = [reward_name(f) for f in get_reward_funcs(list(trainer.reward_funcs))] + ["completions/mean_length"]
    tot = trainer.world.all_mean({**{k: res.get(k, 0.0) * len(data) for k in keys}, "_n": float(len(data))})
    n = tot.pop("_n")
    return {k: v / n for k, v in tot.items()} if n else {}
