"""The R1 chat template: prompt text, ``<think>``/``<answer>`` completions and their token ids.

A prompt is rendered as ``"User: {prompt}\\nAssistant:"`` (optionally preceded by a system line)
and the completion that follows is ``"<think>{reasoning}</think><answer>{answer}</answer>"``.
The compact form without a system line is the default: on a byte-level model every byte costs.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["R1_SYSTEM", "apply_template", "format_completion", "split_completion", "encode_prompt", "encode_sft"]

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"

R1_SYSTEM = (
    "Solve the user's problem. Reason it out step by step between <think> and </think>, "
    "then give only the final result between <answer> and </answer>."
)

IGNORE_INDEX = -100  # label value that the cross-entropy loss skips


def apply_template(prompt: str, system: str | None = None) -> str:
    """The text the model is conditioned on; its completion starts with ``<think>``."""
    head = f"{system}\n" if system is not None else ""
    return f"{head}User: {prompt}\nAssistant:"


def format_completion(think: str, answer: str) -> str:
    """A completion in R1 format: ``<think>{think}</think><answer>{answer}</answer>``."""
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def split_completion(text: str) -> tuple[str | None, str | None]:
    """``(think, answer)`` of a completion; either is ``None`` when its tags are missing.

    ``think`` is the raw text inside the first ``<think>...</think>`` (or before ``</think>`` when
    the opening tag was part of the prompt); ``answer`` is the stripped text inside the last
    complete ``<answer>...</answer>`` after the reasoning (as :mod:`r1x.rewards` reads it).
    """
    think, rest = None, text
    close = text.find(THINK_CLOSE)
    if close >= 0:
        open_ = text.rfind(THINK_OPEN, 0, close)
        think = text[open_ + len(THINK_OPEN):close] if open_ >= 0 else text[:close]
        rest = text[close + len(THINK_CLOSE):]
    answer, pos = None, 0
    while (a := rest.find(ANSWER_OPEN, pos)) >= 0:
        b = rest.find(ANSWER_CLOSE, a + len(ANSWER_OPEN))
        if b < 0:
            break
        answer, pos = rest[a + len(ANSWER_OPEN):b].strip(), b + len(ANSWER_CLOSE)
    return think, answer


def encode_prompt(prompt: str, tokenizer, template_kwargs: Mapping | None = None) -> list[int]:
    """``[bos] + encode(apply_template(prompt, **template_kwargs))`` (no bos if the tokenizer has none)."""
    bos = tokenizer.bos_token_id
    return ([] if bos is None else [bos]) + tokenizer.encode(apply_template(prompt, **(template_kwargs or {})))


def encode_sft(example: Mapping, tokenizer, template_kwargs: Mapping | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of an SFT example with ``prompt`` and ``completion`` keys.

    ``input_ids = encode_prompt(prompt) + encode(completion) + [eos]``; ``labels`` is ``-100`` over
    the bos and prompt and equals ``input_ids`` over completion and eos (completion-only loss).
    """
    for key in ("prompt", "completion"):
        if key not in example:
            raise ValueError(f"encode_sft: example has no '{key}' key (keys: {sorted(example)})")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("encode_sft: the tokenizer has no eos token")
    prompt_ids = encode_prompt(example["prompt"], tokenizer, template_kwargs)
    target = tokenizer.encode(example["completion"]) + [eos]
    return prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target
