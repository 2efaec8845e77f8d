"""r1x.data: the chat template, the generated tasks (scratchpads checked step by step), JSONL, SFT ids."""

import ast
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest
from conftest import SESSION_SEED

from r1x.data import (R1_SYSTEM, TASKS, ArithmeticTask, CountdownTask, apply_template, encode_prompt, encode_sft,
                      format_completion, get_task, load_dataset, load_jsonl, save_jsonl, split_completion)
from r1x.data.tasks import add_scratchpad, arithmetic_scratchpad, mul_scratchpad, solve_countdown, sub_scratchpad
from r1x.model.tokenizer import ByteTokenizer


def rng_for(name):
    return random.Random(f"{SESSION_SEED}:{name}")


# ----------------------------------------------------------------------------------------------
# independent checkers
# ----------------------------------------------------------------------------------------------
def digit(v, i):
    return v // 10 ** i % 10


def replay_arithmetic(a, op, b, think):
    """Checks every step of an arithmetic pad against the operands' digits and returns the value
    the pad computes (its digits, carries and borrows), asserting the running results agree."""
    steps = think.split(",")
    sign, top, bot = 1, a, b
    if op == "-" and a < b:
        assert steps[0] == f"{a}<{b}"
        steps, sign, top, bot = steps[1:], -1, b, a
    assert "<" not in ",".join(steps)
    n = max(len(str(top)), len(str(bot)))
    assert len(steps) == n
    carry, value = 0, 0
    for i, step in enumerate(steps):
        if op == "+":
            m = re.fullmatch(r"(\d)\+(\d)(\+1)?=(\d+)>(\d+)", step)
            assert m, step
            x, y, s = int(m[1]), int(m[2]), int(m[4])
            assert bool(m[3]) == bool(carry)
            assert s == x + y + carry
            out, carry = s % 10, s // 10
        elif op == "-":
            m = re.fullmatch(r"(1?)(\d)-(\d)(-1)?=(\d)>(-?\d+)", step)
            assert m, step
            x, y, out = int(m[2]), int(m[3]), int(m[5])
            assert bool(m[4]) == bool(carry)  # the incoming borrow
            assert out == x + 10 * (m[1] == "1") - y - carry
            carry = int(m[1] == "1")
        else:
            m = re.fullmatch(r"(\d)\*(\d)(?:\+([1-9]))?=(\d+)>(\d+)", step)
            assert m, step
            x, y, p = int(m[1]), int(m[2]), int(m[4])
            assert int(m[3] or 0) == carry
            assert p == x * y + carry
            out, carry = p % 10, p // 10
        assert x == digit(top, i) and y == (bot if op == "*" else digit(bot, i))
        value += out * 10 ** i
        partial = step.rsplit(">", 1)[1]
        if i < n - 1:
            assert partial == str(value).zfill(i + 1)
    if op == "-":
        assert carry == 0
    value = sign * (value + carry * 10 ** n)
    assert partial == str(value)
    return value


def parse_prompt(prompt):
    m = re.fullmatch(r"(\d+)([+\-*])(\d+)", prompt)
    assert m, prompt
    return int(m[1]), m[2], int(m[3])


def eval_expr(text):
    """Value (Fraction) and the numbers of an expression of ints, + - * / and parentheses."""
    used = []

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            a, b = ev(node.left), ev(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b, ast.Div: a / b if b else None}[type(node.op)]
        raise AssertionError(f"disallowed syntax in {text!r}: {ast.dump(node)}")

    return ev(ast.parse(text, mode="eval").body), used


def replay_countdown_steps(numbers, target, think):
    pool = Counter(numbers)
    for step in think.split(","):
        m = re.fullmatch(r"(\d+)([+\-*/])(\d+)=(\d+)", step)
        assert m, step
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        for v in (a, b):
            assert pool[v] > 0, f"{step}: {v} is not available in {dict(pool)}"
            pool[v] -= 1
        assert a >= b
        exact = {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b)}[op]
        assert exact == c and c > 0
        pool[c] += 1
    assert c == target


def brute_force_reachable(values):
    """Values reachable using all of ``values`` (ordered pairs, positive integer intermediates)."""
    if len(values) == 1:
        return {values[0]}
    out = set()
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            if i != j:
                rest = [v for k, v in enumerate(values) if k not in (i, j)]
                for r in [a + b, a * b] + ([a - b] if a > b else []) + ([a // b] if a % b == 0 else []):
                    out |= brute_force_reachable(rest + [r])
    return out


# ----------------------------------------------------------------------------------------------
# template
# ----------------------------------------------------------------------------------------------
def test_apply_template():
    assert apply_template("1+2") == "User: 1+2\nAssistant:"
    assert apply_template("1+2", system="Be brief.") == "Be brief.\nUser: 1+2\nAssistant:"
    assert apply_template("x", system=R1_SYSTEM).startswith(R1_SYSTEM + "\nUser: x")
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in R1_SYSTEM
    assert "reasoning process" not in R1_SYSTEM  # own wording, not the paper's


def test_format_and_split_completion():
    text = format_completion("2+9=11>1", "11")
    assert text == "<think>2+9=11>1</think><answer>11</answer>"
    assert split_completion(text) == ("2+9=11>1", "11")
    assert split_completion("<think>a</think> <answer> 42 \n</answer>junk") == ("a", "42")
    assert split_completion("prefilled</think><answer>7</answer>") == ("prefilled", "7")
    assert split_completion("<think>a</think><answer>7") == ("a", None)
    assert split_completion("<answer>7</answer>") == (None, "7")
    assert split_completion("<think></think><answer>1</answer><answer>2</answer><answer>3") == ("", "2")
    assert split_completion("no tags") == (None, None)
    # an <answer> inside the reasoning is not the answer
    assert split_completion("<think>try <answer>1</answer></think><answer>2</answer>") == ("try <answer>1</answer>", "2")


def test_encode_sft_masks_prompt_and_labels_completion():
    tok = ByteTokenizer()
    ex = ArithmeticTask().dataset("train", 1, seed=SESSION_SEED % 1000)[0]
    for kwargs in (None, {"system": R1_SYSTEM}):
        ids, labels = encode_sft(ex, tok, kwargs)
        prompt_ids = encode_prompt(ex["prompt"], tok, kwargs)
        assert prompt_ids[0] == tok.bos_token_id
        assert tok.decode(prompt_ids[1:]) == apply_template(ex["prompt"], **(kwargs or {}))
        k = len(prompt_ids)
        assert len(ids) == len(labels) and ids[:k] == prompt_ids
        assert labels[:k] == [-100] * k
        assert labels[k:] == ids[k:] and -100 not in labels[k:]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[k:]) == ex["completion"] + "<eos>"
        specials = [tok.id_to_token(i) for i in labels[k:] if i >= 256]
        assert specials == ["<think>", "</think>", "<answer>", "</answer>", "<eos>"]
        assert labels[k] == tok.token_to_id("<think>")
    assert len(encode_sft(ex, tok, {"system": R1_SYSTEM})[0]) > len(encode_sft(ex, tok)[0])
    with pytest.raises(ValueError, match="completion"):
        encode_sft({"prompt": "1+1", "answer": "2"}, tok)


# ----------------------------------------------------------------------------------------------
# arithmetic
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ops", ["+", "-", "*", "+-*"])
def test_arithmetic_scratchpad_computes_the_answer(ops):
    task = ArithmeticTask(min_digits=1, max_digits=4, ops=ops)
    rng = rng_for(ops)
    for _ in range(400):
        ex = task.sample(rng)
        a, op, b = parse_prompt(ex["prompt"])
        assert op in ops and (ex["a"], ex["op"], ex["b"]) == (a, op, b)
        true = a + b if op == "+" else a - b if op == "-" else a * b
        think, answer = split_completion(ex["completion"])
        assert ex["answer"] == answer == str(true)
        assert replay_arithmetic(a, op, b, think) == true
        assert len(think) <= task.max_think_bytes()
        if op == "*":
            assert 2 <= b <= 9


def test_arithmetic_scratchpad_exhaustive_small_and_edges():
    pads = {"+": add_scratchpad, "-": sub_scratchpad, "*": mul_scratchpad}
    for a in range(0, 120):
        for b in range(0, 120):
            for op, pad in pads.items():
                if op == "*" and b > 9:
                    continue
                true = a + b if op == "+" else a - b if op == "-" else a * b
                assert replay_arithmetic(a, op, b, pad(a, b)) == true
    for a, op, b in [(999, "+", 999), (5, "-", 999), (1000, "-", 1), (100, "-", 99), (0, "-", 0), (999, "*", 9),
                     (12345678, "+", 87654322), (10, "-", 100000)]:
        true = a + b if op == "+" else a - b if op == "-" else a * b
        assert replay_arithmetic(a, op, b, pads[op](a, b)) == true
    # the module docstring's examples
    assert add_scratchpad(372, 459) == "2+9=11>1,7+5+1=13>31,3+4+1=8>831"
    assert sub_scratchpad(372, 459) == "372<459,9-2=7>7,15-7=8>87,4-3-1=0>-87"
    assert mul_scratchpad(372, 7) == "2*7=14>4,7*7+1=50>04,3*7+5=26>2604"


def test_arithmetic_scratchpad_lengths_as_documented():
    assert ArithmeticTask().max_think_bytes() == 42
    assert ArithmeticTask(ops="+").max_think_bytes() == ArithmeticTask(ops="*").max_think_bytes() == 34
    # the documented longest pads for 3 digits reach (or nearly reach) the bounds
    assert len(add_scratchpad(109, 999)) == 34
    assert len(sub_scratchpad(101, 300)) == 41
    assert len(mul_scratchpad(112, 9)) == 34
    rng = rng_for("lengths")
    for max_digits in (1, 2, 3, 5):
        task = ArithmeticTask(max_digits=max_digits, ops="+-*")
        worst = 0
        for _ in range(300):
            think, _ = split_completion(task.sample(rng)["completion"])
            worst = max(worst, len(think.encode()))
        assert worst <= task.max_think_bytes()
    for n in (1, 2, 3, 4):  # all-nines / borrow-everywhere worst cases stay within the bound
        big, low = 10 ** n - 1, 10 ** (n - 1) + (n > 1)
        bound = ArithmeticTask(max_digits=n, ops="+-*").max_think_bytes()
        assert len(add_scratchpad(big, big)) <= bound and len(mul_scratchpad(big, 9)) <= bound
        assert len(sub_scratchpad(low, big)) <= bound


# ----------------------------------------------------------------------------------------------
# countdown
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"num_numbers": 4, "max_number": 12, "max_target": 200},
                                    {"num_numbers": 2, "min_number": 5, "max_number": 9}])
def test_countdown_answers_reach_the_target(kwargs):
    task = CountdownTask(**kwargs)
    rng = rng_for(str(kwargs))
    for _ in range(300):
        ex = task.sample(rng)
        m = re.fullmatch(r"Use ((?:\d+ )*\d+) to make (\d+)", ex["prompt"])
        assert m, ex["prompt"]
        numbers, target = [int(v) for v in m[1].split()], int(m[2])
        assert numbers == ex["numbers"] and target == ex["target"]
        assert len(numbers) == task.num_numbers
        assert all(task.min_number <= v <= task.max_number for v in numbers)
        assert 1 <= target <= task.max_target and target not in numbers
        value, used = eval_expr(ex["answer"])
        assert value == target
        assert not Counter(used) - Counter(numbers)  # each number at most once
        think, answer = split_completion(ex["completion"])
        assert answer == ex["answer"]
        replay_countdown_steps(numbers, target, think)
        assert len(think) <= task.max_think_bytes()
        if not kwargs:
            assert len(think) <= 20  # documented for the defaults


def test_countdown_solver_finds_every_reachable_value():
    for numbers in ([1, 2], [3, 3], [2, 3, 4], [1, 1, 7], [6, 5, 2], [2, 2, 3, 8]):
        table = solve_countdown(numbers)
        assert set(table) == brute_force_reachable(numbers), numbers
        for v, node in table.items():
            value, used = eval_expr(node.expr())
            assert value == v and sorted(used) == sorted(numbers)
    assert solve_countdown([25, 7, 3])[54].expr() in ("(25-7)*3", "3*(25-7)")


# ----------------------------------------------------------------------------------------------
# datasets: split, determinism, dedup
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_train_and_test_are_disjoint_and_deterministic(name):
    task = get_task(name)
    seed = SESSION_SEED % 10_000
    train = task.dataset("train", 3000, seed=seed)
    test = task.dataset("test", 500, seed=seed)
    train_keys, test_keys = {task.key(e) for e in train}, {task.key(e) for e in test}
    assert len(train_keys) == 3000 and len(test_keys) == 500  # distinct within a set
    assert not train_keys & test_keys
    assert all(task.split_of(e) == "train" for e in train) and all(task.split_of(e) == "test" for e in test)
    if name == "arithmetic":  # a+b and b+a are the same problem, never on both sides
        flipped = {f"{e['b']}+{e['a']}" for e in train if e["op"] == "+"}
        assert not flipped & {e["prompt"] for e in test}
    assert task.dataset("train", 50, seed=seed) == train[:50]
    assert get_task(name).dataset("test", 500, seed=seed) == test
    assert task.dataset("train", 50, seed=seed + 1) != train[:50]
    for ex in train[:20] + test[:20]:
        assert {"prompt", "answer", "completion"} <= set(ex)


def test_test_fraction_is_respected():
    rng = rng_for("fraction")
    for frac in (0.1, 0.5):
        task = ArithmeticTask(ops="+-*", test_fraction=frac)
        share = sum(task.split_of(task.sample(rng)) == "test" for _ in range(4000)) / 4000
        assert abs(share - frac) < 0.04, (frac, share)


def test_scratchpad_and_flawed_fractions():
    seed = SESSION_SEED % 10_000
    clean = ArithmeticTask(ops="+-*").dataset("train", 3000, seed=seed)
    for frac, flawed in ((0.0, 0.0), (0.3, 0.0), (1.0, 0.5), (0.6, 1.0)):
        task = ArithmeticTask(ops="+-*", scratchpad_fraction=frac, flawed_fraction=flawed)
        rows = task.dataset("train", 3000, seed=seed)
        # the same problems, answers and split: only the completions change
        assert [(r["prompt"], r["answer"]) for r in rows] == [(r["prompt"], r["answer"]) for r in clean]
        pairs = lambda t: [(r["prompt"], r["answer"]) for r in t.dataset("test", 50, seed=seed)]  # noqa: E731
        assert pairs(task) == pairs(ArithmeticTask(ops="+-*"))
        direct = [r for r in rows if r["completion"].startswith("<think></think>")]
        assert abs(len(direct) / len(rows) - (1 - frac)) < 0.04
        for r in direct:
            assert r["completion"] == f"<think></think><answer>{r['answer']}</answer>"
        worked = [r for r in rows if not r["completion"].startswith("<think></think>")]
        wrong = 0
        for r in worked:
            think, said = split_completion(r["completion"])
            right = arithmetic_scratchpad(r["a"], r["op"], r["b"])
            if think != right:  # a flawed pad: the no-carry solver's, its own answer stated
                bad = arithmetic_scratchpad(r["a"], r["op"], r["b"], forget_carry=True)
                assert think == bad and said == bad.rsplit(">", 1)[1]
                wrong += said != r["answer"]
            else:
                assert said == r["answer"]
        if flawed == 0.0:
            assert wrong == 0 and all(r["completion"] == c["completion"] for r, c in zip(rows, clean)
                                      if not r["completion"].startswith("<think></think>"))
        else:  # a carry is due in most multi-digit problems
            assert wrong / len(worked) > 0.3 * flawed
    # the flawed pads by hand
    assert add_scratchpad(372, 459, forget_carry=True) == "2+9=11>1,7+5=12>21,3+4=7>721"
    assert sub_scratchpad(372, 159, forget_carry=True) == "12-9=3>3,7-5=2>23,3-1=2>223"
    assert sub_scratchpad(159, 372, forget_carry=True) == "159<372,12-9=3>3,7-5=2>23,3-1=2>-223"
    assert mul_scratchpad(372, 7, forget_carry=True) == "2*7=14>4,7*7=49>94,3*7=21>2194"
    assert add_scratchpad(12, 34, forget_carry=True) == add_scratchpad(12, 34)  # no carry due
    assert arithmetic_scratchpad(372, "-", 159) == sub_scratchpad(372, 159)
    with pytest.raises(ValueError, match="op"):
        arithmetic_scratchpad(3, "/", 1)


def test_small_problem_space_repeats_instead_of_looping():
    task = ArithmeticTask(min_digits=1, max_digits=1, ops="+")  # 55 problems in all
    rows = task.dataset("train", 300, seed=1)
    keys = [task.key(e) for e in rows]
    assert len(rows) == 300 and len(set(keys)) < 55
    assert len(set(keys)) >= 40  # the unique ones are all found before repeating
    assert all(task.split_of(e) == "train" for e in rows)
    assert task.dataset("train", 300, seed=1) == rows
    assert task.dataset("train", 0) == []


def test_split_is_stable_across_processes():
    """The split and the draws do not depend on Python's salted hash()."""
    code = ("import json; from r1x.data import get_task; t = get_task('countdown');"
            "print(json.dumps([t.dataset('test', 5, seed=3), [t.split_of({'numbers': [1, 2, v], 'target': 9})"
            " for v in range(1, 60)]]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    t = get_task("countdown")
    here = [t.dataset("test", 5, seed=3), [t.split_of({"numbers": [1, 2, v], "target": 9}) for v in range(1, 60)]]
    assert json.loads(out) == here
    assert "test" in here[1] and "train" in here[1]


# ----------------------------------------------------------------------------------------------
# registry and validation
# ----------------------------------------------------------------------------------------------
def test_registry():
    assert set(TASKS) == {"arithmetic", "countdown"}
    assert isinstance(get_task("arithmetic", max_digits=2), ArithmeticTask)
    assert get_task("arithmetic", max_digits=2).max_digits == 2
    assert get_task("countdown").default_rewards == ("countdown", "format")
    assert get_task("arithmetic").default_rewards == ("accuracy", "format")
    with pytest.raises(ValueError, match="arithmetic.*countdown"):
        get_task("sudoku")


@pytest.mark.parametrize("name,kwargs,arg", [
    ("arithmetic", {"min_digits": 0}, "min_digits"),
    ("arithmetic", {"min_digits": 3, "max_digits": 2}, "max_digits"),
    ("arithmetic", {"min_digits": 1.5}, "min_digits"),
    ("arithmetic", {"ops": "+/"}, "ops"),
    ("arithmetic", {"ops": ""}, "ops"),
    ("arithmetic", {"test_fraction": 1.0}, "test_fraction"),
    ("arithmetic", {"scratchpad_fraction": 1.5}, "scratchpad_fraction"),
    ("arithmetic", {"scratchpad_fraction": True}, "scratchpad_fraction"),
    ("arithmetic", {"flawed_fraction": -0.1}, "flawed_fraction"),
    ("arithmetic", {"flawed_fraction": "0.5"}, "flawed_fraction"),
    ("countdown", {"num_numbers": 1}, "num_numbers"),
    ("countdown", {"num_numbers": 9}, "num_numbers"),
    ("countdown", {"min_number": 0}, "min_number"),
    ("countdown", {"min_number": 5, "max_number": 4}, "max_number"),
    ("countdown", {"max_target": 0}, "max_target"),
])
def test_argument_validation(name, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        get_task(name, **kwargs)


def test_dataset_rejects_bad_split_and_n():
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().dataset("validation", 3)
    with pytest.raises(ValueError, match="n must"):
        ArithmeticTask().dataset("train", -1)


# ----------------------------------------------------------------------------------------------
# JSONL and load_dataset
# ----------------------------------------------------------------------------------------------
def test_jsonl_round_trip(tmp_path):
    rows = [{"prompt": "1+1", "answer": "2"}, {"prompt": "é ✓", "completion": "<think>x</think><answer>y</answer>"},
            *CountdownTask().dataset("train", 5)]
    path = tmp_path / "sub" / "data.jsonl"
    assert save_jsonl(rows, path) == str(path)
    assert load_jsonl(path) == rows
    assert os.listdir(path.parent) == ["data.jsonl"]  # no temporary left behind
    path.write_text(path.read_text() + "\n   \n")
    assert load_jsonl(path) == rows
    assert load_jsonl(path, required=("prompt",)) == rows
    # a failed save leaves the old file as it was
    with pytest.raises(ValueError, match="dicts"):
        save_jsonl([{"prompt": "a", "answer": "b"}, ["not", "a", "dict"]], path)
    assert load_jsonl(path) == rows and os.listdir(path.parent) == ["data.jsonl"]


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "answer": "1"}', '', '{"prompt": "b", "answer": '], r"bad\.jsonl:3: malformed JSON"),
    (['{"prompt": "a", "answer": "1"}', '[1, 2]'], r"bad\.jsonl:2: expected a JSON object"),
    (['{"prompt": "a"}'], r"bad\.jsonl:1: .*'answer' or 'completion'"),
    (['{"answer": "1"}'], r"bad\.jsonl:1: .*'prompt'"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        load_jsonl(path)


def test_jsonl_required_keys(tmp_path):
    path = tmp_path / "rl.jsonl"
    save_jsonl([{"prompt": "a", "answer": "1"}, {"prompt": "b", "completion": "c"}], path)
    assert len(load_jsonl(path, required=("prompt", "answer")[:1])) == 2
    with pytest.raises(ValueError, match=r"rl\.jsonl:2: .*'answer'"):
        load_jsonl(path, required=("prompt", "answer"))


def test_load_dataset(tmp_path):
    rows = load_dataset("arithmetic", "test", n=7, seed=2, max_digits=2)
    assert rows == ArithmeticTask(max_digits=2).dataset("test", 7, seed=2)
    assert len(load_dataset("countdown")) == 1000
    path = tmp_path / "sft.jsonl"
    save_jsonl(rows, path)
    assert load_dataset(path) == rows and load_dataset(str(path), n=3) == rows[:3]
    with pytest.raises(ValueError, match="neither a task"):
        load_dataset("no_such_thing")
    with pytest.raises(ValueError, match="max_digits"):
        load_dataset(path, max_digits=2)
