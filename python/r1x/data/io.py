"""JSONL datasets and :func:`load_dataset` (a registered task name or a ``.jsonl`` path).

RL rows carry ``{"prompt", "answer", ...}``, SFT rows ``{"prompt", "completion", ...}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable

from r1x.data.tasks import TASKS, get_task

__all__ = ["load_jsonl", "save_jsonl", "load_dataset"]


def load_jsonl(path: str | os.PathLike, required: tuple[str, ...] | None = None) -> list[dict]:
    """The JSON object rows of a JSONL file; blank lines are skipped.

    Every row must hold the keys in ``required``; by default (``None``) ``prompt`` and one of
    ``answer`` / ``completion``. Malformed JSON, non-object rows and missing keys raise a
    ``ValueError`` naming the file and the 1-based line number.
    """
    path = os.fspath(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [repr(k) for k in (("prompt",) if required is None else required) if k not in row]
            if required is None and "answer" not in row and "completion" not in row:
                missing.append("'answer' or 'completion'")
            if missing:
                raise ValueError(f"{path}:{lineno}: row lacks required key(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def save_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> str:
    """Write ``rows`` one JSON object per line, atomically (a temporary file, then ``os.replace``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                if not isinstance(row, dict):
                    raise ValueError(f"save_jsonl: rows must be dicts, got {type(row).__name__}")
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_dataset(source: str | os.PathLike, split: str = "train", n: int | None = None, seed: int = 0,
                 **task_kwargs) -> list[dict]:
    """Examples from a task name (``get_task(source, **task_kwargs).dataset(split, n or 1000, seed)``)
    or from a ``.jsonl`` file (its first ``n`` rows, all when ``n`` is None; ``split`` and ``seed``
    do not apply to files)."""
    if isinstance(source, str) and source in TASKS:
        return get_task(source, **task_kwargs).dataset(split, 1000 if n is None else n, seed)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"dataset source {path!r} is neither a task ({sorted(TASKS)}) nor an existing file")
    if task_kwargs:
        raise ValueError(f"task arguments {sorted(task_kwargs)} given for the file {path!r}")
    rows = load_jsonl(path)
    return rows if n is None else rows[:n]
