"""Training: the DeepSeek-R1 recipe on r1x models.

- :class:`SFTConfig` / :class:`SFTTrainer`: the cold start (completion-only loss, packing).
- :class:`GRPOConfig` / :class:`GRPOTrainer`: RL with rule-based rewards
  (:func:`r1x.train.grpo.group_advantages`, :func:`r1x.train.grpo.grpo_loss`).
- :class:`DistillConfig` / :class:`DistillTrainer`: into a smaller student, sequence- or
  token-level (:func:`r1x.train.distill.generalized_jsd_loss`).
- :func:`r1x.train.pipeline.run_pipeline`: all of it, as ``r1x pipeline`` runs it.
"""

from r1x.train.common import NonFiniteLossError, TrainConfig, Trainer
from r1x.train.distill import DistillConfig, DistillTrainer
from r1x.train.grpo import GRPOConfig, GRPOTrainer
from r1x.train.sft import SFTConfig, SFTTrainer

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "SFTConfig", "SFTTrainer", "GRPOConfig", "GRPOTrainer",
           "DistillConfig", "DistillTrainer"]
