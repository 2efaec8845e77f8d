"""Data for the R1 pipeline: the chat template, generated tasks with verifiable answers, JSONL.

``load_dataset("arithmetic", "train", n)`` gives dicts with ``prompt``, ``answer``, ``completion``
(reference ``<think>...</think><answer>...</answer>``) and task columns; :func:`encode_sft` and
:func:`encode_prompt` turn them into token ids with the template applied.
"""

from r1x.data.io import load_dataset, load_jsonl, save_jsonl
from r1x.data.tasks import TASKS, ArithmeticTask, CountdownTask, Task, get_task
from r1x.data.template import (R1_SYSTEM, apply_template, encode_prompt, encode_sft, format_completion,
                               split_completion)

__all__ = [
    "R1_SYSTEM", "apply_template", "format_completion", "split_completion", "encode_prompt", "encode_sft",
    "Task", "ArithmeticTask", "CountdownTask", "get_task", "TASKS",
    "load_jsonl", "save_jsonl", "load_dataset",
]
