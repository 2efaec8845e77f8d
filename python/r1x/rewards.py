"""Rule-based rewards for DeepSeek-R1-style reinforcement learning (GRPO).

Every reward has TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``:
one value per completion (``None`` would mean "not applicable"; the rewards here always give
floats). A completion is a string, or TRL's conversational form (a list of messages
``[{"role": "assistant", "content": ...}]``, or a single message dict): the content of the last
assistant message is scored. Dataset columns arrive as keyword arguments; unused ones are ignored.

The set, following the R1 recipe (accuracy plus format rewards, no neural reward model):

* :func:`accuracy_reward` -- 1.0 when the last ``<answer>...</answer>`` equals the gold ``answer``
  by value (exact rational arithmetic, see :func:`parse_number`), else 0.0.
* :func:`format_reward` -- 1.0 for exactly ``<think>...</think><answer>...</answer>``.
* :func:`tag_count_reward` -- 0.25 per R1 tag that occurs exactly once (partial format credit).
* :func:`countdown_reward` -- 1.0 when the answer is an expression over the given ``numbers``
  (each used at most as often as given, ``+ - * /`` and parentheses) equal to ``target``.
* :func:`get_length_penalty`, :func:`get_repetition_penalty` -- factories of penalties <= 0.

Model output is never evaluated as code: expressions go through a small recursive-descent parser
over numbers, ``+ - * / ^ **``, unary signs, parentheses and ``\\frac{}{}``, bounded in length,
nesting depth and power sizes, so hostile text yields 0.0 quickly instead of raising or hanging.
:data:`REWARD_FUNCS`, :func:`get_reward_funcs` and :func:`combine_rewards` select and weight them.
"""

from __future__ import annotations

import decimal
import functools
import importlib.util
import math
import numbers as _numbers
import re
from collections import Counter
from fractions import Fraction
from typing import Callable, Iterable, Sequence

__all__ = [
    "extract_answer", "parse_number", "accuracy_reward", "format_reward", "tag_count_reward",
    "countdown_reward", "get_length_penalty", "get_repetition_penalty", "REWARD_FUNCS",
    "get_reward_funcs", "combine_rewards", "scratchpad_reward", "scratchpad_step_rewards", "PROCESS_REWARD_FUNCS",
]

MAX_EXPR_CHARS = 200  # longest expression the parser looks at (after normalization)
MAX_RAW_CHARS = 1000  # longest answer text normalization looks at
_MAX_DEPTH = 40  # parenthesis nesting
_MAX_EXPONENT = 1024  # |n| in a ** n
_MAX_POWER_BITS = 4096  # bits of a power's result (estimated before computing it)

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


# ----------------------------------------------------------------------------- inputs

def _text_of(completion, arg: str = "completions") -> str:
    """The scored text of one completion: a string, a message dict, or a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (bytes, bytearray)):
        return bytes(completion).decode("utf-8", errors="replace")
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        if not all(isinstance(m, dict) for m in completion):
            raise TypeError(f"{arg}: a message list must hold dicts, got {completion!r:.80}")
        assistant = [m for m in completion if m.get("role") == "assistant"]
        return _content_text((assistant or list(completion))[-1].get("content"))
    raise TypeError(f"{arg}: expected str or chat messages, got {type(completion).__name__}")


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text") or "" if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _texts(completions) -> list[str]:
    if isinstance(completions, (str, bytes, dict)) or not isinstance(completions, Sequence):
        raise TypeError(f"completions must be a list, got {type(completions).__name__}")
    return [_text_of(c) for c in completions]


def _column(values, name: str, n: int) -> list:
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list (one entry per completion), got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} completions")
    return list(values)


def _gold_value(x, name: str) -> Fraction | None:
    """Value of a gold answer / target given as str, int, Fraction or float."""
    if isinstance(x, bool):
        raise TypeError(f"{name}: booleans are not answers")
    if isinstance(x, (str, _numbers.Real, decimal.Decimal)):
        return parse_number(x)
    raise TypeError(f"{name}: expected str, int, float or Fraction, got {type(x).__name__}")


# ----------------------------------------------------------------------------- parsing

def extract_answer(text) -> str | None:
    """Content (stripped) of the last complete ``<answer>...</answer>`` in ``text``, else None.

    The pairs are those of ``re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)`` (each
    ``<answer>`` up to the first ``</answer>`` after it, scanning left to right), found in linear
    time; an unclosed trailing ``<answer>`` is ignored; nested tags stay in the content (so
    ``<answer><answer>1</answer></answer>`` gives ``"<answer>1"``, which is no number).
    """
    if not isinstance(text, str):
        text = _text_of(text, "text")
    found, pos = None, 0
    while (start := text.find("<answer>", pos)) >= 0:
        close = text.find("</answer>", start + len("<answer>"))
        if close < 0:
            break
        found, pos = (start + len("<answer>"), close), close + len("</answer>")
    return None if found is None else text[found[0]:found[1]].strip()


_REPLACEMENTS = [  # order matters: longer LaTeX commands first
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cdot", "*"), ("\\times", "*"),
    ("\\div", "/"), ("\\left", ""), ("\\right", ""), ("\\$", ""), ("$", ""), ("\\%", "%"),
    ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""), ("{,}", ","), ("\\,", ""), ("\\!", ""),
    ("\\;", ""), ("\u2212", "-"), ("\u00d7", "*"), ("\u22c5", "*"), ("\u00b7", "*"),
    ("\u00f7", "/"), ("\u00a0", " "), ("\u2009", ""), ("\u202f", ""),
]


def _unbox(s: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (None if unbalanced); s if absent."""
    i = max(s.rfind("\\boxed"), s.rfind("\\fbox"))
    if i < 0:
        return s
    j = s.find("{", i)
    if j < 0 or s[i:j].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for k in range(j, len(s)):
        depth += {"{": 1, "}": -1}.get(s[k], 0)
        if depth == 0:
            return s[j + 1:k]
    return None


def _normalize(s: str) -> str | None:
    if len(s) > MAX_RAW_CHARS:
        return None
    s = _unbox(s.strip())
    if s is None:
        return None
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    s = s.strip().rstrip(".").strip()
    return s


_NUMBER = re.compile(
    r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d{1,3})?|\.\d+(?:[eE][+-]?\d{1,3})?", re.ASCII)
_SYMBOLS = ("**", "\\frac", "+", "-", "*", "/", "^", "(", ")", "{", "}")


def _tokenize(s: str) -> list[str] | None:
    out, i, n = [], 0, len(s)
    while i < n:
        if s[i].isspace():
            i += 1
            continue
        m = _NUMBER.match(s, i)
        if m:
            out.append(m.group())
            i = m.end()
            continue
        sym = next((t for t in _SYMBOLS if s.startswith(t, i)), None)
        if sym is None:
            return None
        out.append(sym)
        i += len(sym)
    return out


class _ParseError(Exception):
    pass


class _Parser:
    """Recursive descent over tokens; exact Fractions. Grammar (``^``/``**`` bind tighter than
    unary minus and are right-associative, so ``-2^2 == -4`` and ``2^3^2 == 512``)::

        expr := term (("+" | "-") term)*       term := unary (("*" | "/") unary)*
        unary := ("+" | "-") unary | power     power := atom (("^" | "**") unary)?
        atom := NUMBER | "(" expr ")" | "{" expr "}" | "\\frac" "{" expr "}" "{" expr "}"

    ``countdown=True`` allows only integer literals, binary ``+ - * /`` and parentheses, and
    records the literals used.
    """

    def __init__(self, tokens: list[str], countdown: bool = False):
        self.toks, self.i, self.depth = tokens, 0, 0
        self.countdown, self.literals = countdown, []

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, *expected):
        tok = self.peek()
        if tok is None or (expected and tok not in expected):
            raise _ParseError(f"expected {expected}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self) -> Fraction:
        value = self.expr()
        if self.peek() is not None:
            raise _ParseError("trailing tokens")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):  # x / 0 raises ZeroDivisionError: the caller's None
            value = value * self.unary() if self.take() == "*" else value / self.unary()
        return value

    def unary(self) -> Fraction:  # every nesting passes here: the depth guard
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise _ParseError("nested too deeply")
        if self.peek() in ("+", "-") and not self.countdown:
            value = self.unary() if self.take() == "+" else -self.unary()
        else:
            value = self.power()
        self.depth -= 1
        return value

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() not in ("^", "**") or self.countdown:
            return base
        self.take()
        exp = self.unary()
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if exp.denominator != 1 or abs(exp) > _MAX_EXPONENT or (bits > 1 and bits * abs(exp) > _MAX_POWER_BITS):
            raise _ParseError("exponent not a small integer or power too large")
        return base ** int(exp)

    def group(self, open_: str, close: str) -> Fraction:
        self.take(open_)
        value = self.expr()
        self.take(close)
        return value

    def atom(self) -> Fraction:
        tok = self.peek()
        if tok == "(":
            return self.group("(", ")")
        if tok == "{" and not self.countdown:
            return self.group("{", "}")
        if tok == "\\frac" and not self.countdown:
            self.take()
            return self.group("{", "}") / self.group("{", "}")
        if tok is None or not (tok[0].isdigit() or tok[0] == "."):
            raise _ParseError(f"unexpected {tok!r}")
        self.take()
        if self.countdown:  # plain integers only: int("4.5"), int("1,000"), int("1e3") raise
            self.literals.append(int(tok))
        return Fraction(tok.replace(",", ""))


def _evaluate(expr: str, countdown: bool = False) -> tuple[Fraction, list[int]] | None:
    if len(expr) > MAX_EXPR_CHARS:
        return None
    tokens = _tokenize(expr)
    if not tokens:
        return None
    parser = _Parser(tokens, countdown)
    try:
        return parser.parse(), parser.literals
    except (_ParseError, ZeroDivisionError, ValueError, OverflowError, RecursionError):
        return None


def parse_number(text) -> Fraction | None:
    """The exact value of an answer, or None when it is not a (safely parseable) number.

    ``int``/``Fraction`` are taken as is, a finite ``float`` by its shortest decimal repr
    (``0.1 -> 1/10``). Text is normalized first: the content of the last ``\\boxed{...}`` is
    used; ``$``, ``\\(``/``\\)``, ``\\left``/``\\right`` and LaTeX spacing are dropped; ``\\cdot``,
    ``\\times``, ``\\div``, unicode minus/times/divide become ``- * /``; surrounding whitespace
    and trailing periods are stripped; with an ``=`` only the part after the last one counts
    (``"x = 12" -> 12``); a trailing ``%`` is ignored (``"50%" -> 50``, as datasets give
    percentages as bare numbers). The rest must be an arithmetic expression of at most
    ``MAX_EXPR_CHARS`` characters: decimals (``1.5``, ``.5``, ``2e3``), thousands separators in
    groups of three (``1,234``; ``1,23`` is rejected), ``+ - * /``, ``^`` and ``**`` (power,
    integer exponents only), unary signs, parentheses/braces and ``\\frac{a}{b}``. Division by
    zero, oversized powers and anything else (words, units, variables) give None.
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, _numbers.Rational):
        return Fraction(text.numerator, text.denominator)
    if isinstance(text, decimal.Decimal):
        return Fraction(text) if text.is_finite() else None
    if isinstance(text, _numbers.Real):
        x = float(text)
        return Fraction(repr(x)) if math.isfinite(x) else None
    if not isinstance(text, str):
        return None
    s = _normalize(text)
    if s is None:
        return None
    s = s.rpartition("=")[2].strip()
    if s.endswith("%"):
        s = s[:-1]
    result = _evaluate(s)
    return None if result is None else result[0]


def _math_verify_equal(gold: str, pred: str) -> bool:
    """Optional fallback through the ``math_verify`` package (bounded input; never raises)."""
    if len(gold) > MAX_EXPR_CHARS or len(pred) > MAX_EXPR_CHARS:
        return False
    try:
        from math_verify import parse, verify  # optional dependency

        def wrap(s):
            return s if ("$" in s or "\\boxed" in s) else f"${s}$"

        return bool(verify(parse(wrap(gold)), parse(wrap(pred))))
    except Exception:  # noqa: BLE001 - missing package, timeouts, parser failures: no credit
        return False


def _squash(s) -> str | None:
    s = _normalize(s)
    return None if s is None else " ".join(s.split())


# ----------------------------------------------------------------------------- rewards

def accuracy_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the last ``<answer>...</answer>`` equals the gold ``answer`` by value, else 0.0.

    ``answer`` holds one gold answer per completion (str, int, float or Fraction). Both sides go
    through :func:`parse_number` and are compared exactly (``"0.1+0.2"`` equals ``"0.3"``,
    ``"1/2"`` equals ``0.5``). A float gold also matches an answer that rounds to the same
    double (gold ``1/3`` as float matches ``"1/3"``). When either side is not a number, a gold
    string that is not a number matches an answer with the same normalized text (e.g. a
    multiple-choice letter), and else the optional ``math_verify`` package, if installed, is
    asked (inputs of at most ``MAX_EXPR_CHARS``). No complete answer tag pair: 0.0.
    """
    texts = _texts(completions)
    golds = _column(answer, "answer", len(texts))
    rewards = []
    for text, gold in zip(texts, golds):
        gold_value = _gold_value(gold, "answer")
        pred = extract_answer(text)
        if pred is None:
            rewards.append(0.0)
            continue
        value = parse_number(pred)
        if gold_value is not None and value is not None:
            ok = value == gold_value
            if not ok and isinstance(gold, float):
                try:
                    ok = float(value) == gold
                except OverflowError:
                    ok = False
        else:
            ok = gold_value is None and isinstance(gold, str) and bool(_squash(gold)) and (
                _squash(gold) == _squash(pred))
            ok = ok or (_math_verify_available() and _math_verify_equal(str(gold), pred))
        rewards.append(1.0 if ok else 0.0)
    return rewards


@functools.lru_cache(maxsize=None)
def _math_verify_available() -> bool:
    try:
        return importlib.util.find_spec("math_verify") is not None
    except (ImportError, ValueError):
        return False


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion is ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0.

    Exactly one of each of the four tags, in that order, with only whitespace before
    ``<think>``, between ``</think>`` and ``<answer>``, and after ``</answer>``. The think and
    answer contents are free (multi-line, possibly empty).
    """
    rewards = []
    for text in _texts(completions):
        s = text.strip()
        ok = all(s.count(t) == 1 for t in _TAGS) and s.startswith("<think>") and s.endswith("</answer>")
        if ok:
            close_think, open_answer = s.index("</think>"), s.index("<answer>")
            ok = close_think < open_answer and not s[close_think + len("</think>"):open_answer].strip()
        rewards.append(1.0 if ok else 0.0)
    return rewards


def tag_count_reward(prompts, completions, **kwargs) -> list[float]:
    """0.25 for each of ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` that occurs
    exactly once (0.0 to 1.0): partial credit that leads an untrained model to the format."""
    return [0.25 * sum(text.count(t) == 1 for t in _TAGS) for text in _texts(completions)]


def countdown_reward(prompts, completions, numbers, target, **kwargs) -> list[float]:
    """1.0 when the last ``<answer>`` is an expression reaching ``target`` from ``numbers``.

    ``numbers`` holds one list of ints per completion, ``target`` one int. The expression may
    use integer literals, binary ``+ - * /`` and parentheses (no unary minus, powers or
    decimals); each literal must be one of the numbers, no more often than it is given (not all
    need be used); the value is computed exactly (``6/(1-3/4) == 24``). ``x`` and ``\\times``
    are read as ``*``, ``\\div`` as ``/``; a trailing ``= N`` is allowed if N is the target.
    """
    texts = _texts(completions)
    pools = _column(numbers, "numbers", len(texts))
    targets = _column(target, "target", len(texts))
    rewards = []
    for text, pool, tgt in zip(texts, pools, targets):
        if isinstance(pool, (str, bytes)) or not isinstance(pool, Iterable):
            raise TypeError(f"numbers: each entry must be a list of ints, got {type(pool).__name__}")
        pool = list(pool)
        if not all(isinstance(v, _numbers.Integral) and not isinstance(v, bool) for v in pool):
            raise TypeError(f"numbers: each entry must be a list of ints, got {pool!r:.80}")
        goal = _gold_value(tgt, "target")
        rewards.append(1.0 if goal is not None and _countdown_ok(extract_answer(text), pool, goal) else 0.0)
    return rewards


def _countdown_ok(expr: str | None, pool: list[int], goal: Fraction) -> bool:
    expr = None if expr is None else _normalize(expr)
    if expr is None:
        return False
    expr, eq, rhs = expr.replace("x", "*").replace("X", "*").partition("=")
    if eq and parse_number(rhs) != goal:
        return False
    result = _evaluate(expr, countdown=True)
    if result is None:
        return False
    value, literals = result
    return value == goal and not (Counter(literals) - Counter(int(v) for v in pool))


# ----------------------------------------------------------------------------- penalties

def get_length_penalty(max_length: int, penalty: float = 1.0, start: int | None = None) -> Callable:
    """A reward 0.0 up to length ``start`` (default ``max_length // 2``), then falling linearly
    to ``-penalty`` at ``max_length`` and staying there beyond.

    Length is ``len(completion_ids[i])`` (tokens) when TRL passes the ``completion_ids`` column,
    else the number of characters of the completion text.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if isinstance(penalty, bool) or not isinstance(penalty, _numbers.Real) or not penalty >= 0:
        raise ValueError(f"penalty must be a number >= 0, got {penalty!r}")
    start = max_length // 2 if start is None else start
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < max_length:
        raise ValueError(f"start must be an int in [0, max_length), got {start!r}")

    def length_penalty(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        texts = _texts(completions)
        if completion_ids is not None:
            lengths = [len(ids) for ids in _column(completion_ids, "completion_ids", len(texts))]
        else:
            lengths = [len(t) for t in texts]
        return [-float(penalty) * min(1.0, (n - start) / (max_length - start)) if n > start else 0.0
                for n in lengths]

    return length_penalty


def get_repetition_penalty(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable:
    """A reward ``max_penalty * (1 - distinct / total)`` over the completion's word n-grams.

    Words are the lower-cased whitespace-separated tokens; a text without repeated n-grams (or
    with fewer than ``ngram_size`` words) gets 0.0, one that repeats a single n-gram throughout
    approaches ``max_penalty``.
    """
    if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"ngram_size must be an int >= 1, got {ngram_size!r}")
    if isinstance(max_penalty, bool) or not isinstance(max_penalty, _numbers.Real) or not max_penalty <= 0:
        raise ValueError(f"max_penalty must be a number <= 0, got {max_penalty!r}")

    def repetition_penalty(prompts, completions, **kwargs) -> list[float]:
        rewards = []
        for text in _texts(completions):
            words = text.lower().split()
            if len(words) < ngram_size:
                rewards.append(0.0)
                continue
            grams = list(zip(*(words[i:] for i in range(ngram_size))))
            repeated = 1.0 - len(set(grams)) / len(grams)
            rewards.append(float(max_penalty) * repeated if repeated else 0.0)
        return rewards

    return repetition_penalty


# ----------------------------------------------------------------------------- registry


def _scratchpad_steps(completions, a, b, op, who: str) -> list[tuple[list[tuple[int, bool]], int] | None]:
    """Per completion: ``([(end offset, right?) per written step], reference step count)``, or
    None without ``<think>...</think>``. Steps are the comma-separated parts of the think text,
    compared in place with the reference pad of ``a op b``; the offset is where the step ends
    in the completion text (the last character's index + 1)."""
    from r1x.data.tasks import arithmetic_scratchpad

    texts = _texts(completions)
    n = len(texts)
    a, b, op = _column(a, "a", n), _column(b, "b", n), _column(op, "op", n)
    out = []
    for text, x, y, o in zip(texts, a, b, op):
        if o not in ("+", "-", "*") or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in (x, y)):
            raise ValueError(f"{who}: need non-negative int `a`, `b` and `op` in '+-*', got {x!r} {o!r} {y!r}")
        ref = arithmetic_scratchpad(x, o, y).split(",")
        m = _THINK_RE.search(text)
        if m is None:
            out.append(None)
            continue
        steps, pos = [], m.start(1)
        for i, part in enumerate(m.group(1).split(",")):
            if part.strip():
                steps.append((pos + len(part.rstrip()), i < len(ref) and part.strip() == ref[i]))
            pos += len(part) + 1
        out.append((steps, len(ref)))
    return out


def scratchpad_reward(prompts, completions, a, b, op, **kw) -> list[float]:
    """The share of the arithmetic task's scratchpad steps that are right, in place: the
    ``<think>`` part is split at commas and step ``i`` is compared with step ``i`` of the
    reference pad of ``a op b`` (:func:`r1x.data.tasks.add_scratchpad` and its siblings).

    A process reward checked by rule, for shaping next to :func:`accuracy_reward`: a sample
    that gets two of three digit steps right scores above one that gets none, where the
    outcome reward gives both 0. No ``<think>...</think>``: 0. Columns ``a``, ``b``, ``op``
    are the ``arithmetic`` task's. :func:`scratchpad_step_rewards` gives the same per step."""
    return [0.0 if r is None else sum(ok for _, ok in r[0]) / r[1]
            for r in _scratchpad_steps(completions, a, b, op, "scratchpad_reward")]


def scratchpad_step_rewards(prompts, completions, a, b, op, **kw) -> list[list[tuple[int, float]]]:
    """The arithmetic scratchpad checked step by step, for process supervision (GRPO's
    ``process_reward``): per completion, one ``(end, reward)`` pair per written step, ``end``
    the offset in the completion text where the step ends and ``reward`` 1.0 when the step
    equals the reference step in its place (0.0 when wrong, or past the reference's last step).
    No ``<think>...</think>``: no steps (``[]``)."""
    return [[] if r is None else [(end, float(ok)) for end, ok in r[0]]
            for r in _scratchpad_steps(completions, a, b, op, "scratchpad_step_rewards")]


_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)

REWARD_FUNCS: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "countdown": countdown_reward,
    "scratchpad": scratchpad_reward,
    "length": get_length_penalty(4096),
    "repetition": get_repetition_penalty(),
}
"""Rewards by name; ``length`` is ``get_length_penalty(4096)``, ``repetition`` the defaults."""

PROCESS_REWARD_FUNCS: dict[str, Callable] = {"scratchpad": scratchpad_step_rewards}
"""Step-level (process) rewards by name: ``f(prompts, completions, **columns)`` returning, per
completion, a list of ``(end offset in the text, reward)`` pairs (see GRPO's ``process_reward``)."""


def get_reward_funcs(names) -> list[Callable]:
    """Reward functions for ``names``: a list of registry names and/or callables, or a single
    comma-separated string (``"accuracy,format"``). Unknown names raise ValueError."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    elif callable(names):
        names = [names]
    elif not isinstance(names, Iterable):
        raise TypeError(f"names must be reward names or callables, got {type(names).__name__}")
    funcs = []
    for name in names:
        if callable(name):
            funcs.append(name)
        elif isinstance(name, str) and name in REWARD_FUNCS:
            funcs.append(REWARD_FUNCS[name])
        else:
            raise ValueError(f"names: unknown reward {name!r}; known: {sorted(REWARD_FUNCS)}")
    return funcs


def combine_rewards(funcs, weights=None, prompts=None, completions=None, **columns):
    """Run ``funcs`` (names or callables) and sum their weighted rewards per completion.

    Returns ``(total, per_func)``: ``total[i] = sum_k weights[k] * r_k[i]`` with None / NaN
    rewards counted as 0 (TRL's nansum), and ``per_func`` the raw lists by function name
    (``__name__``; repeated names get ``_2``, ``_3``...). ``weights`` default to 1.
    """
    funcs = get_reward_funcs(funcs)
    if completions is None:
        raise TypeError("completions is required")
    n = len(_texts(completions))
    if weights is None:
        weights = [1.0] * len(funcs)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a list of numbers, got {type(weights).__name__}")
    weights = list(weights)
    if any(isinstance(w, (str, bytes, bool)) for w in weights):
        raise TypeError(f"weights must be numbers, got {list(weights)!r:.200}")
    try:
        weights = [float(w) for w in weights]  # also 0-d tensors / numpy scalars
    except (TypeError, ValueError) as e:
        raise TypeError(f"weights must be numbers: {e}") from None
    if len(weights) != len(funcs):
        raise ValueError(f"weights has {len(weights)} entries but there are {len(funcs)} reward functions")
    prompts = [""] * n if prompts is None else prompts
    total, per_func = [0.0] * n, {}
    for func, weight in zip(funcs, weights):
        name = base = getattr(func, "__name__", type(func).__name__)
        k = 1
        while name in per_func:
            k += 1
            name = f"{base}_{k}"
        values = list(func(prompts=prompts, completions=completions, **columns))
        if len(values) != n:
            raise ValueError(f"reward {name} returned {len(values)} values for {n} completions")
        per_func[name] = values
        for i, v in enumerate(values):
            if v is not None and not math.isnan(v):
                total[i] += weight * float(v)
    return total, per_func
