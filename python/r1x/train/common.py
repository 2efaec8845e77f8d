"""What the SFT, GRPO and distillation trainers share.

- :class:`TrainConfig`: the optimisation and bookkeeping fields every stage has (each stage's
  config subclasses it), read from YAML with ``key=value`` overrides.
- :class:`Trainer`: the loop. A stage implements :meth:`Trainer.compute_loss` (one optimizer
  step's forward and backward passes); the base class does the rest: AdamW with linear warm-up
  and cosine decay, gradient clipping, a non-finite loss check, metrics (JSONL), a progress
  bar, periodic evaluation, atomic checkpoints (written to a temporary folder, then renamed)
  and ``resume`` that continues bit-identically on the CPU, and DDP under ``torchrun``.
- :func:`evaluate_generations`: held-out accuracy and format reward of greedy generations.

Determinism: every random draw of a stage comes from generators seeded by ``(seed, step)``
(data order, sampling), never from global state, so a run that is stopped and resumed from a
checkpoint takes the same steps as one that is not.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from typing import Any, NamedTuple

import torch

from r1x.train import dist

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "evaluate_generations", "pack_sequences",
           "sequence_logps", "completion_logits", "reward_name", "decode_completion", "sample_completions", "Samples", "yaml_load",
           "CHECKPOINT_PREFIX", "export_checkpoint"]

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) became NaN or infinite."""


def yaml_load(stream):
    """``yaml.safe_load`` that also reads ``3e-4`` / ``1e3`` as floats (YAML 1.2; PyYAML's
    YAML 1.1 rules need a dot, ``3.0e-4``, and would give the string ``"3e-4"``)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))
    return yaml.load(stream, Loader=Loader)


def build_config(cls, d: dict):
    """``cls(**d)``, validated; keys that are not ``cls``'s fields raise a ``ValueError``
    naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid: {sorted(names)}")
    cfg = cls(**d)
    cfg.validate()
    return cfg


def read_config(owner: str, path=None, overrides: list[str] | None = None) -> dict:
    """A config's fields from a YAML file (optional) and ``key=value`` overrides, values parsed
    as YAML (``lr=3e-4``, ``fp8=true``, ``reward_funcs=[accuracy,format]``); a dotted key
    reaches into a nested mapping (``grpo.max_steps=50``). ``owner`` names the config in errors."""
    d: dict = {}
    if path:
        with open(path, encoding="utf-8") as f:
            d = yaml_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{owner}.from_yaml: {path} must hold a mapping, got {type(d).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"{owner}: override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        val = yaml_load(v) if v.strip() else ""
        keys = k.strip().replace("-", "_").split(".")
        tgt = d
        for part in keys[:-1]:
            tgt = tgt.setdefault(part, {})
            if not isinstance(tgt, dict):
                raise ValueError(f"{owner}: override {item!r}: {part!r} is not a mapping")
        tgt[keys[-1]] = val
    return d


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass
class TrainConfig:
    """Fields every stage shares (TRL's names where TRL has one).

    Args:
        output_dir: where metrics, checkpoints and the final model go.
        seed: seeds the model's initialisation, the data order and the sampling.
        max_steps: optimizer steps.
        max_time: stop after this many seconds of training (0: no limit; a time limit makes
            the number of steps depend on the machine, so seeded runs are then not repeatable).
        learning_rate, warmup_ratio, min_lr_ratio: AdamW's peak rate, the fraction of
            ``max_steps`` of linear warm-up, and the floor of the cosine decay (a fraction of
            the peak).
        weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW's (no decay on norms,
            biases and embeddings... all 1-D parameters).
        max_grad_norm: gradient clipping (0: none).
        gradient_accumulation_steps: micro-batches per optimizer step.
        logging_steps, eval_steps, save_steps: every how many steps to log, to evaluate on the
            held-out set, and to write a checkpoint (0: never; a final one is always written).
        save_total_limit: checkpoints kept (oldest removed first; 0: all).
        resume: continue from the newest checkpoint in ``output_dir`` (or from this path).
        dtype: ``"float32"`` or ``"bfloat16"``: the parameters' dtype.
        fp8: train with FP8 linear layers (``r1x.nn.FP8Linear`` over master weights).
        num_threads: torch threads on the CPU (0: leave as is).
        progress: show a progress bar.
        eval_examples, eval_max_new_tokens: the held-out evaluation's size and length.
        device: ``"auto"`` (this process's GPU when there is one: ``LOCAL_RANK``'s under
            torchrun; else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        parallel: how the model is spread over the ranks of ``torchrun``. Empty (the default):
            DDP (every rank holds the whole model). Any of ``{dp_shard: N, ep: M,
            mixed_precision: "bfloat16" | "none", reshard_after_forward: bool}``: FSDP2 + expert
            parallelism (:func:`r1x.parallel.parallelize`): the dense parameters, gradients and
            Adam state sharded over all ``N`` ranks (``dp_shard`` must be the world size; default:
            it), the routed experts split over EP groups of ``M`` ranks (default 1) and sharded
            over the rest; checkpoints with ``torch.distributed.checkpoint`` (resumable on another
            number of ranks); generation on a gathered copy of the weights (see the README's
            "Scaling out").
    """

    output_dir: str = "r1x-out"
    seed: int = 0
    max_steps: int = 100
    max_time: float = 0.0
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    logging_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 0
    save_total_limit: int = 2
    resume: Any = False
    dtype: str = "float32"
    fp8: bool = False
    num_threads: int = 0
    progress: bool = True
    eval_examples: int = 200
    eval_max_new_tokens: int = 64
    device: str = "auto"
    parallel: dict = dataclasses.field(default_factory=dict)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict | None = None, **overrides):
        """From a dict (e.g. a YAML file's); unknown keys raise a ``ValueError`` naming them."""
        return build_config(cls, {**(d or {}), **overrides})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None):
        """From a YAML file (optional) and ``key=value`` overrides (values parsed as YAML, so
        ``lr=3e-4``, ``fp8=true``, ``reward_funcs=[accuracy,format]`` work)."""
        d = read_config(cls.__name__, path, overrides)
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def require(self, fields, ok, what: str) -> None:
        """Raise ``ValueError("<Config>: `field` must be <what>, got ...")`` for the first of
        ``fields`` (a name or names) whose value fails ``ok``."""
        for f in (fields,) if isinstance(fields, str) else fields:
            v = getattr(self, f)
            if not ok(v):
                raise ValueError(f"{type(self).__name__}: `{f}` must be {what}, got {v!r}")

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first bad field."""
        need = self.require
        need("max_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0")
        need("seed", is_int, "an integer")
        need("max_time", lambda v: is_num(v) and v >= 0, "a number >= 0 (seconds; 0: none)")
        need(("learning_rate", "weight_decay", "max_grad_norm"), lambda v: is_num(v) and v >= 0, "a number >= 0")
        need(("warmup_ratio", "min_lr_ratio"), lambda v: is_num(v) and 0 <= v <= 1, "in [0, 1]")
        need(("adam_beta1", "adam_beta2"), lambda v: is_num(v) and 0 <= v < 1, "in [0, 1)")
        need("adam_epsilon", lambda v: is_num(v) and v > 0, "a number > 0")
        need(("gradient_accumulation_steps", "eval_max_new_tokens"), lambda v: is_int(v) and v >= 1,
             "an integer >= 1")
        need(("logging_steps", "eval_steps", "save_steps", "save_total_limit", "num_threads", "eval_examples"),
             lambda v: is_int(v) and v >= 0, "an integer >= 0")
        need("dtype", lambda v: v in ("float32", "bfloat16"), '"float32" or "bfloat16"')
        need("fp8", lambda v: isinstance(v, bool), "a bool")
        need("resume", lambda v: isinstance(v, (bool, str)), "a bool or a checkpoint path")
        need("output_dir", lambda v: isinstance(v, str) and v != "", "a non-empty path")
        need("device", lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or v.startswith("cuda:")),
             '"auto", "cpu", "cuda" or "cuda:N"')
        need("parallel", lambda v: isinstance(v, dict), "a mapping (e.g. {dp_shard: 4, ep: 2})")
        validate_parallel(type(self).__name__, self.parallel)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


PARALLEL_KEYS = {"dp_shard": "a positive integer (the world size)", "ep": "a positive integer",
                 "mixed_precision": '"bfloat16" or "none"', "reshard_after_forward": "a bool"}


def validate_parallel(owner: str, spec: dict) -> None:
    """Check a ``parallel`` mapping's keys and value types (what needs the world size, e.g.
    ``dp_shard`` equal to it, is checked when the trainer starts, before anything is written)."""
    unknown = sorted(set(spec) - set(PARALLEL_KEYS))
    if unknown:
        raise ValueError(f"{owner}: `parallel` has unknown key(s) {unknown}; valid: {sorted(PARALLEL_KEYS)}")
    ok = {"dp_shard": lambda v: is_int(v) and v >= 1, "ep": lambda v: is_int(v) and v >= 1,
          "mixed_precision": lambda v: v in ("bfloat16", "none", None), "reshard_after_forward": lambda v: isinstance(v, bool)}
    for k, v in spec.items():
        if not ok[k](v):
            raise ValueError(f"{owner}: `parallel.{k}` must be {PARALLEL_KEYS[k]}, got {v!r}")


def resolve_device(config: TrainConfig, world=None) -> torch.device:
    """The device a stage runs on (see :attr:`TrainConfig.device`)."""
    if config.device != "auto":
        return torch.device(config.device)
    return (world or dist.World.from_env()).device


# ----------------------------------------------------------------------------------------------
# batches
def pack_sequences(seqs: list[list[int]], labels: list[list[int]] | None = None, device=None):
    """Pack token lists into ``(ids [T], cu_seqlens [B + 1] int32, labels [T] | None)``."""
    lens = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    if seqs:
        cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    lab = None if labels is None else torch.tensor([t for s in labels for t in s], dtype=torch.int64)
    if device is not None:
        ids, cu = ids.to(device), cu.to(device)
        lab = None if lab is None else lab.to(device)
    return ids, cu, lab


def completion_logits(model, prompts: list[list[int]], completions: list[list[int]]):
    """The logits that predict each completion token given its prompt, padded to
    ``[B, L, V]`` (L: the longest completion; float32), with the ``[B, L]`` bool mask and the
    ``[B, L]`` target ids. One packed forward over all ``prompt + completion`` sequences."""
    dev = model.device if hasattr(model, "device") else next(model.parameters()).device
    seqs = [p + c for p, c in zip(prompts, completions)]
    ids, cu, _ = pack_sequences(seqs, device=dev)
    B = len(seqs)
    L = max((len(c) for c in completions), default=0)
    # the row that predicts completion token j of sequence b: start_b + len(p_b) - 1 + j
    rows = torch.zeros(B, L, dtype=torch.int64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    targets = torch.zeros(B, L, dtype=torch.int64)
    starts = cu[:-1].tolist()
    for b, (p, c) in enumerate(zip(prompts, completions)):
        if c and not p:
            raise ValueError(f"completion_logits: prompt {b} is empty; its completion's first token needs a "
                             "prompt token before it (e.g. the bos token)")
        if c:
            s0 = starts[b] + len(p) - 1
            rows[b, : len(c)] = torch.arange(s0, s0 + len(c))
            mask[b, : len(c)] = True
            targets[b, : len(c)] = torch.tensor(c, dtype=torch.int64)
    logits = model(ids, cu).logits
    sel = logits[rows.reshape(-1).to(dev)].view(B, L, logits.shape[-1]).float()
    return sel, mask.to(dev), targets.to(dev)


def sequence_logps(model, prompts: list[list[int]], completions: list[list[int]], *, with_entropy: bool = False,
                   temperature: float = 1.0):
    """Per-token log-probabilities ``[B, L]`` of each completion given its prompt (0 where the
    ``[B, L]`` mask is False), the mask, and with ``with_entropy`` the per-token entropy of the
    predicted distribution (detached). Logits are divided by ``temperature`` (the sampling
    temperature, as TRL does)."""
    sel, mask, targets = completion_logits(model, prompts, completions)
    if temperature != 1.0:
        sel = sel / temperature
    logp_all = torch.log_softmax(sel, dim=-1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
    if not with_entropy:
        return logps, mask
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~mask, 0.0)
    return logps, mask, ent


# ----------------------------------------------------------------------------------------------
# evaluation
@torch.no_grad()
def evaluate_generations(model, tokenizer, examples: list[dict], reward_funcs=("accuracy", "format"), *,
                         max_new_tokens: int = 64, max_batch: int = 128, template_kwargs: dict | None = None,
                         return_completions: bool = False) -> dict:
    """Greedy completions for ``examples`` (dicts with ``prompt`` and the reward columns),
    scored by ``reward_funcs`` (names in ``r1x.rewards.REWARD_FUNCS`` or callables).

    Returns ``{"<name>": mean reward, ..., "completions/mean_length": ...}`` (``<name>``: the
    function's name without ``_reward``)."""
    from r1x.rewards import get_reward_funcs

    if not examples:
        return {}
    funcs = get_reward_funcs(list(reward_funcs))
    rows, _, outs, texts, columns = sample_completions(model, tokenizer, examples, max_new_tokens,
                                                       template_kwargs=template_kwargs, max_batch=max_batch)
    res: dict[str, float] = {}
    for f in funcs:
        vals = f([r["prompt"] for r in rows], texts, **columns)
        vals = [0.0 if v is None else float(v) for v in vals]
        res[reward_name(f)] = sum(vals) / len(vals)
    res["completions/mean_length"] = sum(len(o) for o in outs) / len(outs)
    if return_completions:
        res["_completions"] = texts
    return res


class Samples(NamedTuple):
    """:func:`sample_completions`' result, one entry per row."""

    rows: list[dict]  # the examples, each repeated num_samples times (one prompt's samples: a group)
    prompt_ids: list[list[int]]  # the templated prompts' token ids
    outs: list[list[int]]  # the new token ids (a stop token included)
    texts: list[str]  # their text (decode_completion)
    columns: dict[str, list]  # the reward columns: every key but "prompt" and "completion"


def sample_completions(model, tokenizer, examples: list[dict], max_new_tokens: int, *, num_samples: int = 1,
                       template_kwargs: dict | None = None, **generate_kwargs) -> Samples:
    """Generate ``num_samples`` completions for each example's ``prompt`` (in the chat
    template), ready for the reward functions (see :class:`Samples`). ``generate_kwargs`` go to
    ``model.generate``."""
    from r1x.data import encode_prompt

    enc = [encode_prompt(ex["prompt"], tokenizer, template_kwargs) for ex in examples]
    prompt_ids = [p for p in enc for _ in range(num_samples)]
    outs = model.generate(prompt_ids, max_new_tokens, **generate_kwargs)
    rows = [ex for ex in examples for _ in range(num_samples)]
    columns = {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {}) if k not in ("prompt", "completion")}
    return Samples(rows, prompt_ids, outs, [decode_completion(tokenizer, o) for o in outs], columns)


def decode_completion(tokenizer, ids) -> str:
    """A generated completion's text: without the end-of-sequence token, and without ids the
    tokenizer does not know (a model's vocabulary is often padded past the tokenizer's, and an
    untrained model samples those ids too)."""
    eos = tokenizer.eos_token_id
    n = tokenizer.vocab_size
    return tokenizer.decode([t for t in ids if t != eos and 0 <= t < n])


def reward_name(f) -> str:
    """A reward function's (or a function name's) metric name: without ``_reward``."""
    n = f if isinstance(f, str) else getattr(f, "__name__", type(f).__name__)
    return n[: -len("_reward")] if n.endswith("_reward") else n


# ----------------------------------------------------------------------------------------------
# the loop
class Trainer:
    """The training loop shared by the stages (see the module docstring).

    Subclasses implement :meth:`compute_loss` ``(step) -> (loss: float, metrics: dict)`` that
    runs the forward and backward passes of one optimizer step (gradients accumulated in
    ``self.model``), and may override :meth:`evaluate`, :meth:`state_extra` /
    :meth:`load_state_extra` (more state to checkpoint), and :meth:`save_model`.
    """

    stage = "train"

    def __init__(self, model, config: TrainConfig, tokenizer=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"{type(self).__name__}: `config` must be a TrainConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.world = dist.World.from_env(need_group=bool(config.parallel))
        self.model = model.to(resolve_device(config, self.world))
        self.parallel = bool(config.parallel)
        self._replica = None  # under `parallel`: a plain copy of the model for generation and export
        self._replica_step = None
        if self.parallel:
            self._replica = _meta_copy(self.model)  # materialised on first use
            self._parallelize()
            self.ddp_model = self.model
        else:
            self.ddp_model = self.world.wrap(model)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: str | None = None
        self._log_path = os.path.join(config.output_dir, "metrics.jsonl")

    # -- parallelism -------------------------------------------------------------------------
    def _parallelize(self) -> None:
        """FSDP2 + EP over the world as ``config.parallel`` says (errors before anything is written)."""
        from r1x.parallel import parallelize

        spec = self.config.parallel
        mp = None
        if spec.get("mixed_precision") == "bfloat16":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        try:
            parallelize(self.model, ep=spec.get("ep", 1), dp_shard=spec.get("dp_shard"), mp_policy=mp,
                        reshard_after_forward=spec.get("reshard_after_forward", True))
        except (TypeError, ValueError) as e:
            msg = str(e).removeprefix("parallelize: ")
            raise ValueError(f"{type(self).__name__}: `parallel` = {spec}: {msg}") from None
        self.log_line(f"FSDP2 + EP: {self.world.world_size} rank(s), mesh (edp, ep) = "
                      f"{tuple(self.model.r1x_mesh.shape)}")

    def generation_model(self):
        """The model to generate with (rollouts, evaluation) and to export: ``self.model``
        itself, or under ``parallel`` a plain copy on every rank refreshed from the shards once
        per optimizer step (an all-gather of the whole model: a collective, so every rank calls
        this at the same points). Generation then needs no collectives and each rank samples its
        own prompts at its own pace; the cost is a full copy of the weights on every rank."""
        if not self.parallel:
            return self.model
        if self._replica_step != self.step:
            from r1x.parallel import iter_full_tensors

            rep = self._replica
            if next(rep.parameters()).is_meta:
                rep.to_empty(device=self.model.device)
                rep.eval().requires_grad_(False)
            mine = rep.state_dict()
            with torch.no_grad():
                for name, t in iter_full_tensors(self.model):
                    mine[name].copy_(t)
                targets = dict(rep.named_buffers())
                for name, b in self.model.named_buffers():
                    if name not in mine:  # the non-persistent ones (rotary tables): not in the state dict
                        targets[name].copy_(b)
            self._replica_step = self.step
        return self._replica

    def plain_copy(self):
        """A plain (not parallelized, not wrapped) copy of the model with its current weights,
        e.g. GRPO's frozen reference (under ``parallel``: gathered, a collective)."""
        return copy.deepcopy(self.generation_model())

    # -- optimisation ------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, foreach=False)

    def _lr_lambda(self, step: int) -> float:
        cfg = self.config
        warm = int(round(cfg.warmup_ratio * cfg.max_steps))
        if step < warm:
            return (step + 1) / warm
        span = max(cfg.max_steps - warm, 1)
        progress = min((step - warm) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def compute_loss(self, step: int) -> tuple[float, dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    # -- checkpoints ---------------------------------------------------------------------------
    def state_extra(self) -> dict:
        return {}

    def load_state_extra(self, state: dict) -> None:
        pass

    def save_model(self, path: str) -> None:
        """The stage's model in the HF layout (``save_pretrained``) plus the tokenizer. Under
        ``parallel`` every rank calls it (the weights are gathered) and rank 0 writes."""
        model = self.generation_model()
        if not self.world.is_main:
            return
        model.save_pretrained(path)
        if self.tokenizer is not None and hasattr(self.tokenizer, "save"):
            self.tokenizer.save(path)

    def _checkpoints(self) -> list[str]:
        d = self.config.output_dir
        if not os.path.isdir(d):
            return []
        found = []
        for n in os.listdir(d):
            if n.startswith(CHECKPOINT_PREFIX) and n[len(CHECKPOINT_PREFIX):].isdigit():
                if os.path.exists(os.path.join(d, n, STATE_FILE)):
                    found.append((int(n[len(CHECKPOINT_PREFIX):]), os.path.join(d, n)))
        return [p for _, p in sorted(found)]

    def _remove_stale(self, checkpoints: bool) -> None:
        """Remove the temporary folders of checkpoints whose writing was cut short (and with
        ``checkpoints`` the checkpoints themselves) from ``output_dir``."""
        d = self.config.output_dir
        if not os.path.isdir(d):
            return
        for n in sorted(os.listdir(d)):
            step, _, tmp = n[len(CHECKPOINT_PREFIX):].partition(".tmp-")
            if not (n.startswith(CHECKPOINT_PREFIX) and step.isdigit()) or not (tmp or checkpoints):
                continue
            if not tmp:
                self.log_line(f"fresh run: removing {os.path.join(d, n)} of an earlier run")
            shutil.rmtree(os.path.join(d, n), ignore_errors=True)

    def save_checkpoint(self) -> str:
        """Write ``output_dir/checkpoint-<step>`` atomically: everything goes to a temporary
        folder first, which is then renamed (a crash leaves the previous checkpoint intact).

        DDP / one process: one ``trainer_state.pt`` with everything. Under ``parallel``: the
        weights and the Adam state with ``torch.distributed.checkpoint`` in ``dcp/`` (each
        rank writes its shards; loadable on any other number of ranks), ``trainer_state.pt``
        with the rest, and ``rank<r>.pt`` with each rank's own state (RNG, an in-flight rollout)."""
        path = os.path.join(self.config.output_dir, f"{CHECKPOINT_PREFIX}{self.step}")
        tmp = path + ".tmp-save"  # one name every rank agrees on
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.world.barrier()
        if self.parallel:
            self._save_sharded(tmp, path)
        else:
            self._save_whole(tmp, path)
        self.world.barrier()
        self.last_checkpoint = path
        return path

    def _save_own_state(self, tmp: str) -> None:
        """This rank's own state (its RNG, an in-flight rollout) as ``rank<r>.pt``."""
        torch.save({"extra": self.state_extra(), "rng": _rng_state()}, os.path.join(tmp, f"rank{self.world.rank}.pt"))

    def _save_whole(self, tmp: str, path: str) -> None:
        """DDP / one process: everything in ``trainer_state.pt`` (rank 0's own state too; the
        other ranks' in their ``rank<r>.pt``)."""
        if self.world.distributed:
            if not self.world.is_main:
                self._save_own_state(tmp)
            self.world.barrier()
        if self.world.is_main:
            state = {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                **self._common_state(),
                "extra": self.state_extra(),
                "rng": _rng_state(),
                "world_size": self.world.world_size,
            }
            torch.save(state, os.path.join(tmp, STATE_FILE))
            self._publish(tmp, path)

    def _common_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "history": self.history,
                "config": _portable(self.config.to_dict())}

    def _publish(self, tmp: str, path: str) -> None:
        """Rank 0: add config.json to the finished ``tmp``, rename it to ``path``, rotate."""
        self.model.config.to_json_file(os.path.join(tmp, "config.json"))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        limit = self.config.save_total_limit
        if limit:
            for old in self._checkpoints()[:-limit]:
                shutil.rmtree(old, ignore_errors=True)

    def _sharded_state(self) -> dict:
        """What DCP saves and loads: the weights and the optimizer state, each tensor as a
        global view (the experts over the (ep, edp) mesh), keyed by parameter name. The views
        share storage with the live tensors, so loading writes into them."""
        from r1x.parallel import global_state_dict, global_view

        optim = {}
        for n, p in self._optimizer_params():
            st = self.optimizer.state.get(p)
            if st:
                optim[n] = {k: global_view(self.model, n, v) for k, v in st.items() if torch.is_tensor(v)}
        return {"model": global_state_dict(self.model), "optim": optim}

    def _optimizer_params(self):
        """``(name, parameter)`` for every parameter the optimizer holds."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                yield names[id(p)], p

    def _save_sharded(self, tmp: str, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=os.path.join(tmp, "dcp"))
        self._save_own_state(tmp)
        self.world.barrier()
        if self.world.is_main:
            groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            torch.save({"step": self.step, "format": "dcp", "world_size": self.world.world_size,
                        "parallel": dict(self.config.parallel), "param_groups": groups, **self._common_state()},
                       os.path.join(tmp, STATE_FILE))
            self._publish(tmp, path)

    def _check_model_config(self, path: str) -> None:
        """A checkpoint of another model config is a ``ValueError`` naming the first field
        that differs (before anything is loaded or written)."""
        f = os.path.join(path, "config.json")
        if not (os.path.exists(f) and hasattr(self.model, "config")):
            return
        with open(f, encoding="utf-8") as fh:
            theirs = json.load(fh)
        mine = json.loads(json.dumps(self.model.config.to_dict()))
        for k in sorted(set(theirs) | set(mine)):
            if k not in ("torch_dtype", "transformers_version") and theirs.get(k) != mine.get(k):
                raise ValueError(f"{type(self).__name__}: checkpoint {path!r} is of another model: its config has "
                                 f"{k} = {theirs.get(k)!r}, this model {mine.get(k)!r}")

    def load_checkpoint(self, path: str) -> None:
        self._check_model_config(path)
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
        if state.get("format") == "dcp":
            self._load_sharded(path, state)
        elif self.parallel:
            raise ValueError(f"{type(self).__name__}: checkpoint {path!r} was written without `parallel` (one file, "
                             "DDP or one process); resume it without `parallel`, then train on with it")
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._load_own_state(path, state, fallback=state)  # the file holds rank 0's
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        self.step = int(state["step"])
        self._replica_step = None
        self.last_checkpoint = path

    def _init_optimizer_state(self, saved: set) -> None:
        """AdamW's state as its first step creates it (zeros), for DCP to load into, for the
        parameters that have one in the checkpoint (``saved``: its keys; a parameter that never
        had a gradient, e.g. the MTP modules in GRPO, has none)."""
        if not isinstance(self.optimizer, torch.optim.AdamW):
            raise TypeError(f"{type(self).__name__}: sharded checkpoints know AdamW's state only, "
                            f"not {type(self.optimizer).__name__}'s")
        for n, p in self._optimizer_params():
            st = self.optimizer.state[p]
            if f"optim.{n}.exp_avg" in saved and not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _load_sharded(self, path: str, state: dict) -> None:
        """A ``parallel`` checkpoint into this run, whatever its number of ranks and mesh (DCP
        reshards); also into a DDP or one-process run."""
        import torch.distributed as tdist
        import torch.distributed.checkpoint as dcp

        from r1x.parallel import check_checkpoint_keys, checkpoint_metadata

        dcp_path = os.path.join(path, "dcp")
        meta = checkpoint_metadata(dcp_path)
        self._init_optimizer_state(set(meta))
        target = self._sharded_state()
        check_checkpoint_keys(target, dcp_path, type(self).__name__, meta)
        dcp.load(target, checkpoint_id=dcp_path, no_dist=not (tdist.is_available() and tdist.is_initialized()))
        for g, saved in zip(self.optimizer.param_groups, state["param_groups"]):
            g.update(saved)
        self._load_own_state(path, state, fallback=None)

    def _load_own_state(self, path: str, state: dict, fallback: dict | None) -> None:
        """This rank's RNG and extra state: its ``rank<r>.pt`` when the checkpoint was written by
        as many ranks as this run has, else ``fallback`` (``None``: they start afresh, logged)."""
        own = fallback
        mine = os.path.join(path, f"rank{self.world.rank}.pt")
        if state.get("world_size") == self.world.world_size and os.path.exists(mine):
            own = torch.load(mine, map_location="cpu", weights_only=False)
        if own is None:
            self.log_line(f"resharded: {path} was written by {state['world_size']} rank(s), this run has "
                          f"{self.world.world_size}; weights and optimizer state loaded, the per-rank state "
                          "(RNG, an in-flight rollout) starts afresh")
            return
        _set_rng_state(own["rng"])
        self.load_state_extra(own["extra"])

    def _resume(self) -> None:
        r = self.config.resume
        if not r:
            return
        path = r if isinstance(r, str) else (self._checkpoints() or [None])[-1]
        if path is None:
            self.log_line(f"resume: no checkpoint in {self.config.output_dir}; starting fresh")
            return
        if not os.path.exists(os.path.join(path, STATE_FILE)):
            raise FileNotFoundError(f"{type(self).__name__}: `resume` = {path!r} holds no {STATE_FILE}")
        self.load_checkpoint(path)
        # the metrics file continues from the checkpoint: drop lines logged after it
        if self.world.is_main:
            self._remove_stale(checkpoints=False)
            os.makedirs(self.config.output_dir, exist_ok=True)
            keep = [json.dumps(h) for h in self.history]
            _atomic_write(self._log_path, "".join(k + "\n" for k in keep))
        self.log_line(f"resumed from {path} at step {self.step}")

    # -- logging -------------------------------------------------------------------------------
    def log_line(self, text: str) -> None:
        if self.world.is_main:
            print(f"[{self.stage}] {text}", file=sys.stderr, flush=True)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.world.is_main:
            os.makedirs(self.config.output_dir, exist_ok=True)
            with open(self._log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Run ``max_steps`` optimizer steps (from the checkpoint with ``resume``); returns the
        logged records (also in ``output_dir/metrics.jsonl``). The final model is saved to
        ``output_dir/final``."""
        cfg = self.config
        self._resume()  # first: a checkpoint that does not fit raises before anything is written
        os.makedirs(cfg.output_dir, exist_ok=True)
        if self.step == 0 and self.world.is_main:
            # a fresh run replaces an earlier run's output in this folder: its metrics, and its
            # checkpoints (a later `resume` would pick those up; the rotation would keep them)
            self._remove_stale(checkpoints=True)
            if os.path.exists(self._log_path):
                os.remove(self._log_path)
        bar = _progress(cfg.max_steps, self.step, f"{self.stage}", cfg.progress and self.world.is_main)
        t0 = time.perf_counter()
        self.model.train()
        while self.step < cfg.max_steps:
            if cfg.max_time and self.world.all_sum(float(time.perf_counter() - t0 > cfg.max_time)) > 0:
                self.log_line(f"max_time = {cfg.max_time:.1f} s reached at step {self.step}")
                break
            step = self.step
            self.optimizer.zero_grad(set_to_none=True)
            loss, metrics = self.compute_loss(step)
            grad_norm = self._clip()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                last = self.last_checkpoint or "none (no checkpoint written yet)"
                raise NonFiniteLossError(
                    f"{type(self).__name__}: the {what} is {loss if what == 'loss' else grad_norm} at step {step + 1} "
                    f"(metrics.jsonl's numbering); stopped before its update. Last good checkpoint: {last}")
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.step = step + 1
            record = {"stage": self.stage, "step": self.step, "loss": loss, "grad_norm": grad_norm,
                      "learning_rate": lr, **metrics}
            if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < cfg.max_steps:
                record.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            record["time"] = round(time.perf_counter() - t0, 3)
            if self.step % max(cfg.logging_steps, 1) == 0 or self.step == cfg.max_steps or "eval/accuracy" in record:
                self._log(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: _short(v) for k, v in record.items() if k in self.progress_keys}, refresh=False)
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.save_checkpoint()
        self.save_model(os.path.join(cfg.output_dir, "final"))
        self.world.barrier()
        return self.history

    progress_keys = ("loss",)

    def _clip(self) -> float:
        if self.parallel:
            from r1x.parallel import clip_grad_norm_

            return float(clip_grad_norm_(self.model, self.config.max_grad_norm or math.inf))
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.config.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm, foreach=False))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])))


def export_checkpoint(path: str, out: str) -> str:
    """Write a trainer checkpoint (``checkpoint-<step>/``, written with or without ``parallel``,
    on any number of ranks) in the HF layout (``save_pretrained`` plus the tokenizer) to
    ``out``, in one process (the whole model in this process's memory). Returns ``out``."""
    from r1x.model import DeepSeekConfig, DeepSeekForCausalLM
    from r1x.model.tokenizer import ByteTokenizer, load_tokenizer

    state_file = os.path.join(path, STATE_FILE)
    if not os.path.exists(state_file):
        raise FileNotFoundError(f"export_checkpoint: {path!r} is not a trainer checkpoint (no {STATE_FILE})")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    cfg = state.get("config", {})
    with torch.random.fork_rng(devices=[]):
        model = DeepSeekForCausalLM(DeepSeekConfig.from_json_file(path), dtype=getattr(torch, cfg.get("dtype", "float32")))
    if cfg.get("fp8"):
        model.to_fp8(freeze=False)
    if state.get("format") == "dcp":
        import torch.distributed.checkpoint as dcp

        from r1x.parallel import check_checkpoint_keys

        target = {"model": model.state_dict()}  # views of the model's tensors: loaded in place
        check_checkpoint_keys(target, os.path.join(path, "dcp"), "export_checkpoint")
        dcp.load(target, checkpoint_id=os.path.join(path, "dcp"), no_dist=True)
    else:
        model.load_state_dict(state["model"])
    model.save_pretrained(out)
    spec = cfg.get("model")
    tok = load_tokenizer(spec) if isinstance(spec, str) and os.path.isdir(spec) else ByteTokenizer()
    tok.save(out)
    return out


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (no memory:
    the weights are not copied), to be materialised later with ``to_empty``."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])


def _portable(obj):
    """``obj`` with callables (reward functions given as functions) replaced by their names:
    a checkpoint must not pickle a function (a lambda or a local one cannot be)."""
    if callable(obj):
        return f"<function {getattr(obj, '__qualname__', type(obj).__name__)}>"
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(v) for v in obj)
    return obj


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                leave=True)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
