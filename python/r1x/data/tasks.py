"""Generated tasks with verifiable answers and short reference scratchpads.

Every example is a dict with ``prompt`` (the raw question), ``answer`` (the gold answer string),
``completion`` (``format_completion(scratchpad, answer)``) and task columns, so TRL-style reward
functions ``f(prompts, completions, answer=..., numbers=..., target=...)`` can be fed by column.

Train/test split: a problem is in "test" iff a blake2b hash of its canonical key falls in the
first ``test_fraction`` of the hash range, so the split is the same on every machine and run and
the two splits never share a problem.

Scratchpads (designed for a tiny byte-level model; every byte is a token):

* arithmetic ``a+b``: one step per digit from the least significant, ``x+y[+1]=s>P`` where
  ``+1`` is the incoming carry, ``s`` the digit sum and ``P`` the result so far (``s mod 10``
  prepended to the previous ``P``; the last step prepends all of ``s``). The answer is the last
  ``P``. ``372+459`` -> ``2+9=11>1,7+5+1=13>31,3+4+1=8>831``. Missing digits are written ``0``.
* ``a-b``: steps ``x-y[-1]=d>P``, ``-1`` the incoming borrow; a digit that must borrow is
  written ``1x`` (x + 10). When ``a < b`` the pad starts ``a<b,`` and subtracts ``b-a``, the last
  ``P`` carrying the ``-`` sign. Leading zeros are dropped in the last ``P``.
  ``372-459`` -> ``372<459,9-2=7>7,15-7=8>87,4-3-1=0>-87``.
* ``a*d`` (single-digit ``d``): ``x*d[+c]=p>P`` with carry ``c``. ``372*7`` ->
  ``2*7=14>4,7*7+1=50>04,3*7+5=26>2604``.

  Longest pads with 3-digit operands: ``+`` 34 bytes, ``-`` 41, ``*`` 34 (the bounds of
  :meth:`ArithmeticTask.max_think_bytes` are 34, 42, 34: ``10n-2+n(n+1)/2``, ``12n+n(n+1)/2``).
* countdown: the steps of one solution, ``a op b=c`` joined by ``,`` (larger operand first), the
  answer the same solution as an expression with minimal parentheses.
  e.g. ``Use 3 7 25 to make 54`` -> think ``25-7=18,18*3=54``, answer ``(25-7)*3``. Reference
  solutions use every number once; the task itself only requires each at most once. Longest pad
  with the defaults (3 numbers in 1..20, target <= 100): 20 bytes (``11*10=110,110-10=100``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
from fractions import Fraction

from r1x.data.template import format_completion

__all__ = ["Task", "ArithmeticTask", "CountdownTask", "get_task", "TASKS", "add_scratchpad", "sub_scratchpad",
           "mul_scratchpad", "arithmetic_scratchpad", "solve_countdown"]

_SPLITS = ("train", "test")
_HASH_RANGE = 1 << 64
_MAX_MISSES = 2000  # draws in a row finding nothing new (scaled by 1/split fraction) before repeats


class Task:
    """A generator of verifiable problems. Subclasses set ``name`` and ``default_rewards`` (names of
    reward functions in :mod:`r1x.rewards`) and implement :meth:`sample` and :meth:`key`."""

    name = "task"
    default_rewards: tuple[str, ...] = ()

    def __init__(self, test_fraction: float = 0.1):
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = float(test_fraction)

    def sample(self, rng: random.Random) -> dict:
        """One random example (of either split)."""
        raise NotImplementedError

    def key(self, example: dict) -> str:
        """The canonical problem key: equal for problems that must land in the same split."""
        raise NotImplementedError

    def split_of(self, example: dict) -> str:
        """``"test"`` or ``"train"``, from a stable hash of :meth:`key`."""
        return "test" if self._hash_unit("", example) < self.test_fraction else "train"

    def _hash_unit(self, salt: str, example: dict) -> float:
        """A stable number in [0, 1) from a blake2b hash of ``salt`` and the problem key."""
        text = f"{salt}:{self.name}:{self.key(example)}" if salt else f"{self.name}:{self.key(example)}"
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / _HASH_RANGE

    def dataset(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """``n`` examples of ``split`` ("train" or "test"), deterministic in ``seed``.

        Problems are distinct while the split has enough of them; once ``_MAX_MISSES / fraction``
        draws in a row find nothing new (the space is exhausted), the rest repeat those found.
        """
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[dict] = []
        seen: set[str] = set()
        fraction = self.test_fraction if split == "test" else 1.0 - self.test_fraction
        misses, max_misses = 0, math.ceil(_MAX_MISSES / fraction)
        while len(out) < n and misses < max_misses:
            ex = self.sample(rng)
            key = self.key(ex)
            if key in seen or self.split_of(ex) != split:
                misses += 1
                continue
            seen.add(key)
            out.append(ex)
            misses = 0
        if not out and n:
            raise RuntimeError(f"{self!r} found no {split} problem in {max_misses} draws")
        found = len(out)
        while len(out) < n:
            out.append(copy.deepcopy(out[rng.randrange(found)]))
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# arithmetic
# ----------------------------------------------------------------------------------------------
def _digits(v: int, n: int) -> list[int]:
    """The ``n`` least significant decimal digits of ``v``, least significant first."""
    return [(v // 10 ** i) % 10 for i in range(n)]


def _finish(partial: str, sign: str = "") -> str:
    return sign + (partial.lstrip("0") or "0")


def add_scratchpad(a: int, b: int, forget_carry: bool = False) -> str:
    """Digit-by-digit addition pad of ``a+b`` (``a, b >= 0``); see the module docstring.
    ``forget_carry``: the flawed pad of a solver that never carries (its last ``P`` is wrong
    whenever a digit sum reaches 10 before the last digit)."""
    n = max(len(str(a)), len(str(b)))
    steps, partial, carry = [], "", 0
    for i, (x, y) in enumerate(zip(_digits(a, n), _digits(b, n))):
        s = x + y + carry
        partial = (str(s) if i == n - 1 else str(s % 10)) + partial
        if i == n - 1:
            partial = _finish(partial)
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}>{partial}")
        carry = 0 if forget_carry else s // 10
    return ",".join(steps)


def sub_scratchpad(a: int, b: int, forget_carry: bool = False) -> str:
    """Digit-by-digit subtraction pad of ``a-b`` (``a, b >= 0``), swapping when ``a < b``.
    ``forget_carry``: the flawed pad of a solver that borrows 10 but never pays it back from
    the next digit."""
    prefix, sign = "", ""
    if a < b:
        prefix, sign, a, b = f"{a}<{b},", "-", b, a
    n = len(str(a))
    steps, partial, borrow = [], "", 0
    for i, (x, y) in enumerate(zip(_digits(a, n), _digits(b, n))):
        d = x - y - borrow
        top = f"1{x}" if d < 0 else str(x)  # borrow 10 from the next digit
        borrow_in = "-1" if borrow else ""
        borrow = int(d < 0 and not forget_carry)
        d += 10 * (d < 0)
        partial = str(d) + partial
        if i == n - 1:
            partial = _finish(partial, sign)
        steps.append(f"{top}-{y}{borrow_in}={d}>{partial}")
    return prefix + ",".join(steps)


def mul_scratchpad(a: int, d: int, forget_carry: bool = False) -> str:
    """Digit-by-digit pad of ``a*d`` for a single digit ``d`` (``forget_carry``: a flawed
    pad that never carries)."""
    n = len(str(a))
    steps, partial, carry = [], "", 0
    for i, x in enumerate(_digits(a, n)):
        p = x * d + carry
        partial = (str(p) if i == n - 1 else str(p % 10)) + partial
        if i == n - 1:
            partial = _finish(partial)
        steps.append(f"{x}*{d}{f'+{carry}' if carry else ''}={p}>{partial}")
        carry = 0 if forget_carry else p // 10
    return ",".join(steps)


def arithmetic_scratchpad(a: int, op: str, b: int, forget_carry: bool = False) -> str:
    """The pad of ``a op b`` for ``op`` in ``"+-*"`` (:func:`add_scratchpad` and its siblings)."""
    pads = {"+": add_scratchpad, "-": sub_scratchpad, "*": mul_scratchpad}
    if op not in pads:
        raise ValueError(f"op must be one of '+', '-', '*', got {op!r}")
    return pads[op](a, b, forget_carry=forget_carry)


class ArithmeticTask(Task):
    """``a+b``, ``a-b`` with ``min_digits..max_digits``-digit operands, and ``a*d`` with a
    single-digit ``d`` in 2..9. Prompt ``"372+459"``; columns ``a``, ``b``, ``op``.

    ``scratchpad_fraction``: the share of examples whose reference ``completion`` works the
    problem in the scratchpad; the others answer at once, ``<think></think><answer>831</answer>``
    (a cold start that mixes short answers with worked ones, as chat data does). Which examples
    get the pad is fixed per problem by a hash (like the split), so the problems drawn, their
    answers and the split do not depend on it.

    ``flawed_fraction``: the share of worked examples whose pad forgets every carry (and never
    pays back a borrow), its stated answer following the flawed chain: wrong whenever a carry
    was due. The gold ``answer`` column stays right. A cold start with the systematic mistake
    that unverified chains of thought carry, for RL with a verifier to remove (also chosen per
    problem by a hash).
    """

    name = "arithmetic"
    default_rewards = ("accuracy", "format")

    def __init__(self, min_digits: int = 1, max_digits: int = 3, ops: str = "+-", test_fraction: float = 0.1,
                 scratchpad_fraction: float = 1.0, flawed_fraction: float = 0.0):
        super().__init__(test_fraction)
        for name, v in (("scratchpad_fraction", scratchpad_fraction), ("flawed_fraction", flawed_fraction)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        self.scratchpad_fraction = float(scratchpad_fraction)
        self.flawed_fraction = float(flawed_fraction)
        self.min_digits = _check_int("min_digits", min_digits, 1, 18)
        self.max_digits = _check_int("max_digits", max_digits, 1, 18)
        if max_digits < min_digits:
            raise ValueError(f"max_digits ({max_digits}) must be >= min_digits ({min_digits})")
        if not isinstance(ops, str) or not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got {ops!r}")
        self.ops = "".join(dict.fromkeys(ops))

    def _operand(self, rng: random.Random) -> int:
        k = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if k == 1 else 10 ** (k - 1), 10 ** k - 1)

    def sample(self, rng: random.Random) -> dict:
        op = rng.choice(self.ops)
        a = self._operand(rng)
        b = rng.randint(2, 9) if op == "*" else self._operand(rng)
        answer = str({"+": a + b, "-": a - b, "*": a * b}[op])
        ex = {"prompt": f"{a}{op}{b}", "answer": answer, "a": a, "b": b, "op": op}
        if self._hash_unit("pad", ex) >= self.scratchpad_fraction:
            ex["completion"] = format_completion("", answer)
        elif self._hash_unit("flaw", ex) < self.flawed_fraction:
            think = arithmetic_scratchpad(a, op, b, forget_carry=True)  # its answer follows the flawed chain
            ex["completion"] = format_completion(think, think.rsplit(">", 1)[1])
        else:
            ex["completion"] = format_completion(arithmetic_scratchpad(a, op, b), answer)
        return ex

    def key(self, example: dict) -> str:
        a, b, op = example["a"], example["b"], example["op"]
        if op == "+":  # a+b and b+a are one problem
            a, b = min(a, b), max(a, b)
        return f"{a}{op}{b}"

    def max_think_bytes(self) -> int:
        """An upper bound on the scratchpad length in bytes for this task's settings."""
        n, partials = self.max_digits, self.max_digits * (self.max_digits + 1) // 2
        # per step "x+y" "+1" (not the first) "=ss" ">" and P (one more digit at the end); commas
        bounds = {"+": 10 * n - 2 + partials, "*": 10 * n - 2 + partials,
                  "-": 12 * n + partials}  # "a<b," prefix, "1x-y-1=d>", the sign
        return max(bounds[op] for op in self.ops)


# ----------------------------------------------------------------------------------------------
# countdown
# ----------------------------------------------------------------------------------------------
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class _Node:
    """An expression tree node: a leaf number or ``left op right``."""

    __slots__ = ("value", "op", "left", "right")

    def __init__(self, value: int, op: str | None = None, left: "_Node | None" = None, right: "_Node | None" = None):
        self.value, self.op, self.left, self.right = value, op, left, right

    def expr(self) -> str:
        if self.op is None:
            return str(self.value)
        p = _PREC[self.op]
        left, right = self.left.expr(), self.right.expr()
        if self.left.op is not None and _PREC[self.left.op] < p:
            left = f"({left})"
        if self.right.op is not None and (_PREC[self.right.op] < p or (_PREC[self.right.op] == p and self.op in "-/")):
            right = f"({right})"
        return f"{left}{self.op}{right}"

    def steps(self) -> list[str]:
        if self.op is None:
            return []
        return self.left.steps() + self.right.steps() + [f"{self.left.value}{self.op}{self.right.value}={self.value}"]


def solve_countdown(numbers: list[int]) -> dict[int, _Node]:
    """Every value reachable using *all* ``numbers`` (each once) with + - * / and positive-integer
    intermediates, mapped to one expression tree. Exhaustive over subsets (fine for <= 5 numbers)."""
    n = len(numbers)
    reach: dict[int, dict[int, _Node]] = {1 << i: {v: _Node(v)} for i, v in enumerate(numbers)}
    for mask in range(1, 1 << n):
        if mask & (mask - 1) == 0:  # a single number
            continue
        table: dict[int, _Node] = {}
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            if sub > rest:  # each unordered split once
                for x, nx in reach[sub].items():
                    for y, ny in reach[rest].items():
                        big, nb, small, ns = (x, nx, y, ny) if x >= y else (y, ny, x, nx)
                        cands = [(big + small, "+"), (big * small, "*")]
                        if big > small:
                            cands.append((big - small, "-"))
                        if big % small == 0:
                            cands.append((big // small, "/"))
                        for v, op in cands:
                            if v not in table:
                                table[v] = _Node(v, op, nb, ns)
            sub = (sub - 1) & mask
        reach[mask] = table
    return reach[(1 << n) - 1]


class CountdownTask(Task):
    """Reach ``target`` from ``numbers`` with + - * / (each number at most once). Prompt
    ``"Use 3 7 25 to make 54"``; columns ``numbers`` (list[int]) and ``target`` (int)."""

    name = "countdown"
    default_rewards = ("countdown", "format")

    def __init__(self, num_numbers: int = 3, min_number: int = 1, max_number: int = 20, max_target: int = 100,
                 test_fraction: float = 0.1):
        super().__init__(test_fraction)
        self.num_numbers = _check_int("num_numbers", num_numbers, 2, 5)
        self.min_number = _check_int("min_number", min_number, 1)
        self.max_number = _check_int("max_number", max_number, 1)
        if max_number < min_number:
            raise ValueError(f"max_number ({max_number}) must be >= min_number ({min_number})")
        self.max_target = _check_int("max_target", max_target, 1)

    def sample(self, rng: random.Random) -> dict:
        for _ in range(1000):
            numbers = [rng.randint(self.min_number, self.max_number) for _ in range(self.num_numbers)]
            solutions = solve_countdown(numbers)
            targets = sorted(v for v in solutions if 1 <= v <= self.max_target and v not in numbers)
            if targets:
                break
        else:
            raise ValueError(f"{self!r}: no reachable target in [1, max_target] after 1000 draws")
        target = rng.choice(targets)
        node = solutions[target]
        answer = node.expr()
        return {"prompt": f"Use {' '.join(map(str, numbers))} to make {target}", "answer": answer,
                "completion": format_completion(",".join(node.steps()), answer),
                "numbers": numbers, "target": target}

    def key(self, example: dict) -> str:
        return f"{sorted(example['numbers'])}->{example['target']}"

    def max_think_bytes(self) -> int:
        """A (loose) upper bound on the scratchpad length: ``k-1`` steps ``a op b=c`` whose
        values have at most as many digits as ``max_number ** k``."""
        k, d = self.num_numbers, len(str(self.max_number ** self.num_numbers))
        return (k - 1) * (3 * d + 3) - 1


TASKS: dict[str, type[Task]] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask}


def get_task(name: str, **kwargs) -> Task:
    """A task by registry name (``"arithmetic"``, ``"countdown"``) built with ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
