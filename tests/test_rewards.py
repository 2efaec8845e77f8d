"""r1x.rewards: value-based answer checking, the R1 format rewards, Countdown, the penalties, and
their robustness against hostile model output."""

import math
import random
import re
import sys
import time
import types
from fractions import Fraction

import pytest

from conftest import SESSION_SEED
from r1x import rewards
from r1x.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    combine_rewards,
    countdown_reward,
    extract_answer,
    format_reward,
    get_length_penalty,
    get_repetition_penalty,
    get_reward_funcs,
    parse_number,
    tag_count_reward,
)


def wrap(answer, think="let me think"):
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def acc(pred, gold):
    """accuracy_reward of one completion answering ``pred`` against ``gold``."""
    return accuracy_reward(["Q"], [wrap(pred)], answer=[gold])[0]


# ----------------------------------------------------------------------------- parse_number

@pytest.mark.parametrize(
    "text, value",
    [
        ("42", 42), ("42.0", 42), ("42.00", 42), (" 42 ", 42), ("42.", 42), ("-3", -3),
        ("- 3", -3), ("\u22123", -3), ("1/2", Fraction(1, 2)), ("0.5", Fraction(1, 2)),
        (".5", Fraction(1, 2)), ("1,234", 1234), ("1,234,567.5", Fraction(2469135, 2)),
        ("3+4*2", 11), ("(1+2)/3", 1), ("2^3", 8), ("2**3", 8), ("2^3^2", 512), ("-2^2", -4),
        ("(-2)^2", 4), ("2^-1", Fraction(1, 2)), ("--3", 3), ("+5", 5), ("0.1+0.2", Fraction(3, 10)),
        ("\\boxed{7}", 7), ("$7$", 7), ("$\\boxed{-7}$", -7), ("\\(12\\)", 12),
        ("\\frac{1}{2}", Fraction(1, 2)), ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("\\boxed{\\frac{2}{6}}", Fraction(1, 3)), ("\\left(1+2\\right)\\cdot 3", 9),
        ("3 \\times 4", 12), ("8 \\div 2", 4), ("6 \u00d7 7", 42), ("x = 12", 12), ("= 12", 12),
        ("50%", 50), ("50\\%", 50), ("1e3", 1000), ("2.5E-1", Fraction(1, 4)), ("1\\,234", 1234),
        ("1{,}234", 1234), ("\\$5", 5), ("007", 7),
        (3, 3), (Fraction(2, 3), Fraction(2, 3)), (0.1, Fraction(1, 10)), (2.0, 2),
    ],
)
def test_parse_number_values(text, value):
    assert parse_number(text) == value
    assert isinstance(parse_number(text), Fraction)


@pytest.mark.parametrize(
    "text",
    [
        "", "   ", "abc", "forty-two", "12 apples", "1,23", "1,2345", "1 2", "2(3)", "(1+2", "1+2)",
        "1/0", "5/(3-3)", "0^-1", "2^(1/2)", "9**9**9**9", "10^100000", "(10^1000)^1000",
        "x", "x=", "\\boxed{3", "\\sqrt{2}", "__import__('os').system('echo hi')", "1;2", "()", "+",
        "1_000", "0x10", "\u0663", "2\u00b2", "\uff11", "\\frac{1}{0}", "nan", "inf", float("nan"), float("inf"), None, [1], True,
    ],
)
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_parse_number_limits():
    ok = "+".join(["1"] * 100)  # 199 characters
    assert parse_number(ok) == 100
    assert parse_number(ok + "+1") is None  # 201 > MAX_EXPR_CHARS
    assert parse_number("(" * 30 + "1" + ")" * 30) == 1
    assert parse_number("(" * 60 + "1" + ")" * 60) is None  # nesting guard
    assert parse_number("-" * 60 + "1") is None
    assert parse_number("2^1024") == 2**1024
    assert parse_number("2^1025") is None  # exponent bound


def test_parse_number_random_sums_and_fractions():
    rng = random.Random(SESSION_SEED)
    for _ in range(300):
        a, b, c = (rng.randint(-10**6, 10**6) for _ in range(3))
        assert parse_number(f"{a}+{b}*{c}") == a + b * c
        assert parse_number(f"({a}) - ({b})") == a - b
        if c:
            assert parse_number(f"{a}/{c}") == Fraction(a, c)


# ----------------------------------------------------------------------------- extract_answer

def test_extract_answer():
    assert extract_answer("<answer> 5 </answer>") == "5"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("<answer>1</answer><answer>2") == "1"  # unclosed last one ignored
    assert extract_answer("<answer>3") is None
    assert extract_answer("3</answer>") is None
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>\n a\nb \n</answer>") == "a\nb"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("<answer><answer>1</answer></answer>") == "<answer>1"  # as re.findall
    assert extract_answer("<answer>1</answer> 2</answer>") == "1"
    rng = random.Random(SESSION_SEED + 3)
    for _ in range(300):  # same pairs as the non-greedy regex, on random tag soup
        text = "".join(rng.choice(["<answer>", "</answer>", "1", " x", "<answer", "answer>"]) for _ in range(12))
        found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
        assert extract_answer(text) == (found[-1].strip() if found else None), text
    assert extract_answer([{"role": "assistant", "content": "<answer>9</answer>"}]) == "9"


# ----------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize(
    "pred, gold",
    [
        ("42", 42), ("42.0", 42), ("42", 42.0), ("42.00", "42"), ("1/2", 0.5), ("0.5", "1/2"),
        ("1/2", Fraction(1, 2)), ("-3", "-3"), ("-3", -3), ("1,234", 1234), ("1234", "1,234"),
        ("3+4*2", 11), ("(1+2)/3", "1"), ("2^3", 8), ("2**3", "8"), ("\\boxed{7}", 7),
        ("$7$", "7"), (" 7. ", 7), ("x = 12", 12), ("0.1+0.2", "0.3"), ("1/3", 1 / 3),
        ("\\frac{1}{3}", "1/3"), ("7", "\\boxed{7}"), ("B", "B"), ("  b  ", "b"),
    ],
)
def test_accuracy_equal(pred, gold):
    assert acc(pred, gold) == 1.0


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("43", 42), ("-42", 42), ("0.3333", 1 / 3), ("0.3333", "1/3"), ("1,23", 123), ("12 apples", 12),
        ("", 0), ("1/0", 0), ("A", "B"), ("b", "B"), ("42", "B"), ("0.30000000000000004", "0.3"),
    ],
)
def test_accuracy_not_equal(pred, gold):
    assert acc(pred, gold) == 0.0


def test_accuracy_last_answer_and_missing_tags():
    completions = [
        "<think>x</think><answer>1</answer><answer>2</answer>",
        "<think>x</think><answer>2</answer><answer>1</answer>",
        "<think>x</think> the answer is 2",
        "<think>x</think><answer>2",
        "<think>x</think>2</answer>",
        "<think><answer>2</answer></think><answer>1</answer>",
    ]
    assert accuracy_reward(None, completions, answer=[2] * 6) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_accuracy_chat_messages_and_extra_columns():
    completions = [
        [{"role": "assistant", "content": wrap("1/2")}],
        {"role": "assistant", "content": wrap("3")},
        [{"role": "user", "content": "<answer>5</answer>"}, {"role": "assistant", "content": wrap("4")}],
        [{"role": "assistant", "content": wrap("5")}, {"role": "user", "content": "<answer>0</answer>"}],
        [],
    ]
    prompts = [[{"role": "user", "content": "q"}]] * 5
    out = accuracy_reward(prompts, completions, answer=[0.5, "3", 5, 5, 0], problem=["p"] * 5, id=list(range(5)))
    assert out == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert all(type(r) is float for r in out)


def test_accuracy_random_fractions():
    rng = random.Random(SESSION_SEED + 1)
    for _ in range(300):
        q = 2 ** rng.randint(0, 6) * 5 ** rng.randint(0, 4)  # terminating decimal
        p = rng.randint(-10**5, 10**5)
        decimal = str(Fraction(p, q).numerator * 10**10 // Fraction(p, q).denominator)
        sign, digits = ("-", decimal[1:]) if decimal.startswith("-") else ("", decimal)
        digits = digits.rjust(11, "0")
        text = f"{sign}{digits[:-10]}.{digits[-10:]}"
        assert Fraction(text) == Fraction(p, q)  # the test's own decimal is exact
        assert acc(f"{p}/{q}", text) == 1.0
        assert acc(text, f"{p}/{q}") == 1.0
        assert acc(f"{p}/{q}", p / q) == 1.0  # float gold
        assert acc(f"{p + 1}/{q}", text) == 0.0
        a, b = rng.randint(-10**9, 10**9), rng.randint(-10**9, 10**9)
        assert acc(f"{a} + {b}", a + b) == 1.0
        assert acc(f"{a} + {b}", a + b + 1) == 0.0
        assert acc(f"{a + b:,}", str(a + b)) == 1.0  # thousands separators


def test_accuracy_bad_arguments():
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(None, ["a", "b"], answer=[1])
    with pytest.raises(TypeError, match="answer"):
        accuracy_reward(None, ["a"], answer=[None])
    with pytest.raises(TypeError, match="answer"):
        accuracy_reward(None, ["a"], answer=[True])
    with pytest.raises(TypeError, match="answer"):
        accuracy_reward(None, ["a"], answer="1")
    with pytest.raises(TypeError, match="completions"):
        accuracy_reward(None, "<answer>1</answer>", answer=[1])
    with pytest.raises(TypeError, match="completions"):
        accuracy_reward(None, [3], answer=[1])


def test_accuracy_math_verify_fallback_is_optional_and_bounded(monkeypatch):
    calls = []
    fake = types.ModuleType("math_verify")
    fake.parse = lambda s: calls.append(s) or s
    fake.verify = lambda g, p: g == "$\\sqrt{2}$" and p == "$2^{1/2}$"
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    monkeypatch.setattr(rewards, "_math_verify_available", lambda: True)
    assert acc("2^{1/2}", "\\sqrt{2}") == 1.0
    assert acc("2^{1/3}", "\\sqrt{2}") == 0.0
    assert acc("7", 7) == 1.0 and acc("8", 7) == 0.0  # both parse: math_verify not consulted
    n = len(calls)
    assert acc("1" * 150 + "x" + "1" * 150, "\\sqrt{2}") == 0.0  # too long: not passed on
    assert len(calls) == n

    def boom(*args):
        raise RuntimeError("timeout")

    fake.verify = boom
    assert acc("2^{1/2}", "\\sqrt{2}") == 0.0


# ----------------------------------------------------------------------------- format / tags

@pytest.mark.parametrize(
    "text",
    [
        "<think>reasoning</think><answer>42</answer>",
        "<think>\nline 1\nline 2\n</think>\n<answer>\n42\n</answer>",
        "  \n<think>a</think>  \n\n <answer>b</answer>\n\n",
        "<think></think><answer></answer>",
        "<think>I think 3 < 4 and a > b</think><answer>x</answer>",
    ],
)
def test_format_positive(text):
    assert format_reward(None, [text]) == [1.0]
    assert format_reward(None, [[{"role": "assistant", "content": text}]]) == [1.0]


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><answer>b</answer> trailing",
        "<think>a</think><answer>b</answer><answer>c</answer>",
        "<think>a</think><think>b</think><answer>c</answer>",
        "<answer>b</answer>",
        "<answer>b</answer><think>a</think>",
        "<think>a</think> text <answer>b</answer>",
        "preamble <think>a</think><answer>b</answer>",
        "<think>a<answer>b</answer></think>",
        "<think>a</think><answer>b",
        "<think>a<answer>b</answer>",
        "<think>a</think>",
        "",
        "<THINK>a</THINK><ANSWER>b</ANSWER>",
    ],
)
def test_format_negative(text):
    assert format_reward(None, [text]) == [0.0]


def test_tag_count_partial_credit():
    texts = [
        "<think>a</think><answer>b</answer>",
        "<think>a</think>",
        "<think>a",
        "<think><think>a</think><answer>b</answer>",
        "nothing",
        "<answer>b</answer><think>a</think>",  # order is not checked here
        "<answer>b</answer></answer>",
    ]
    assert tag_count_reward(None, texts) == [1.0, 0.5, 0.25, 0.75, 0.0, 1.0, 0.25]


# ----------------------------------------------------------------------------- countdown

@pytest.mark.parametrize(
    "expr, numbers, target, expected",
    [
        ("(1 + 2) * 3", [1, 2, 3], 9, 1.0),
        ("1 + 2 + 3", [3, 2, 1], 6, 1.0),
        ("6 / (1 - 3 / 4)", [6, 1, 3, 4], 24, 1.0),  # exact fractions on the way
        ("8 / (3 - 8 / 3)", [3, 3, 8, 8], 24, 1.0),
        ("(1+2)*3 = 9", [1, 2, 3], 9, 1.0),
        ("(1+2)*3 = 10", [1, 2, 3], 9, 0.0),
        ("2 \\times 4", [2, 4], 8, 1.0),
        ("2 x 4", [2, 4], 8, 1.0),
        ("25 * 4", [25, 4, 7], 100, 1.0),  # not all numbers needed
        ("3 * 3", [3, 1], 9, 0.0),  # 3 reused
        ("3 * 3", [3, 3], 9, 1.0),  # ... unless given twice
        ("5 + 4", [1, 4], 9, 0.0),  # 5 not given
        ("1 + 2", [1, 2], 4, 0.0),  # wrong value
        ("12 - 3", [3, 12], 9, 1.0),
        ("-3 + 12", [3, 12], 9, 0.0),  # unary minus not allowed
        ("3^2", [3, 2], 9, 0.0),  # no powers
        ("4.5 * 2", [4, 5, 2], 9, 0.0),  # no decimals
        ("1e1 - 1", [1, 10], 9, 0.0),
        ("1,000 / 100 - 1", [1000, 100, 1], 9, 0.0),
        ("1/0 + 9", [1, 0, 9], 9, 0.0),
        ("", [1], 1, 0.0),
        ("1 + ", [1], 1, 0.0),
        ("9", [9], 9, 1.0),
        ("import os", [1], 1, 0.0),
    ],
)
def test_countdown(expr, numbers, target, expected):
    assert countdown_reward(None, [wrap(expr)], numbers=[numbers], target=[target]) == [expected]


def test_countdown_missing_tag_chat_and_arguments():
    out = countdown_reward(
        None, ["1+2", [{"role": "assistant", "content": wrap("1+2")}]], numbers=[[1, 2], [1, 2]], target=[3, 3]
    )
    assert out == [0.0, 1.0]
    with pytest.raises(ValueError, match="numbers"):
        countdown_reward(None, ["a", "b"], numbers=[[1]], target=[1, 1])
    with pytest.raises(ValueError, match="target"):
        countdown_reward(None, ["a"], numbers=[[1]], target=[1, 2])
    with pytest.raises(TypeError, match="numbers"):
        countdown_reward(None, ["a"], numbers=[["1"]], target=[1])
    with pytest.raises(TypeError, match="numbers"):
        countdown_reward(None, ["a"], numbers=[5], target=[1])
    with pytest.raises(TypeError, match="target"):
        countdown_reward(None, ["a"], numbers=[[1]], target=[None])


def test_countdown_random_sums():
    rng = random.Random(SESSION_SEED + 2)
    for _ in range(100):
        nums = [rng.randint(1, 100) for _ in range(4)]
        used = rng.sample(nums, 3)
        expr = " + ".join(map(str, used))
        assert countdown_reward(None, [wrap(expr)], numbers=[nums], target=[sum(used)]) == [1.0]
        assert countdown_reward(None, [wrap(expr)], numbers=[nums], target=[sum(used) + 1]) == [0.0]
        extra = expr + f" + {max(nums) + 1} - {max(nums) + 1}"  # value right, literal not given
        assert countdown_reward(None, [wrap(extra)], numbers=[nums], target=[sum(used)]) == [0.0]


# ----------------------------------------------------------------------------- hostile output

ADVERSARIAL = [
    "9**9**9**9", "9^9^9^9", "(" * 10000, ")" * 10000, "1/0", "__import__('os').system('echo hi')",
    "1" * 1_000_000, "<answer>" * 100_000, "</answer>" * 100_000, "<think>" * 50_000 + "</answer>",
    "\\boxed{" * 5000, "{" * 10000 + "1" + "}" * 10000, "-" * 100000 + "1", "2" + "^2" * 10000,
    "\x00\xff\ud7ff\U0001f600" * 1000, "".join(chr(random.Random(0).randrange(1, 0x10FFFF) & 0xD7FF) for _ in range(5000)),
    "<answer>" + "9" * 100000 + "</answer>", "<answer>10^100000</answer>", "<answer>(10^1000)^1000</answer>",
    "<answer><answer>1</answer></answer>", "<answer>" + "(" * 5000 + "</answer>",
]


def test_adversarial_outputs_are_zero_and_fast():
    start = time.perf_counter()
    for raw in ADVERSARIAL:
        for text in (raw, f"<answer>{raw}</answer>", wrap(raw)):
            assert accuracy_reward(None, [text], answer=[1]) in ([0.0], [1.0])
            assert countdown_reward(None, [text], numbers=[[9, 9, 9, 9]], target=[1]) == [0.0]
            assert parse_number(raw) is None
            assert 0.0 <= tag_count_reward(None, [text])[0] <= 1.0
            assert format_reward(None, [raw]) == [0.0]
    assert time.perf_counter() - start < 10.0  # a hang guard only (1 MB strings x 3 x 5 funcs)


def test_adversarial_accuracy_zero():
    for raw in ADVERSARIAL:
        assert accuracy_reward(None, [f"<answer>{raw}</answer>"], answer=[1]) == [0.0], raw[:40]
    assert accuracy_reward(None, ["<answer><answer>1</answer></answer>"], answer=[1]) == [0.0]


def test_power_bomb_is_fast():
    for text in ["9**9**9**9", "9^9^9^9", "(10^1024)^1024", "2^1024^2", "1e999^9"]:
        start = time.perf_counter()
        assert parse_number(text) is None
        assert time.perf_counter() - start < 1.0


# ----------------------------------------------------------------------------- penalties

def test_length_penalty_shape():
    f = get_length_penalty(100, penalty=2.0, start=50)
    assert f.__name__ == "length_penalty"
    texts = ["a" * n for n in (0, 50, 51, 75, 100, 1000)]
    assert f(None, texts) == pytest.approx([0.0, 0.0, -0.04, -1.0, -2.0, -2.0])
    # token ids, when TRL passes them, override the character count
    assert f(None, ["a", "a"], completion_ids=[[1] * 75, [1] * 10]) == pytest.approx([-1.0, 0.0])
    g = get_length_penalty(10)  # start defaults to max_length // 2
    assert g(None, ["a" * 5, "a" * 6, "a" * 10]) == pytest.approx([0.0, -0.2, -1.0])
    assert g(None, [[{"role": "assistant", "content": "a" * 10}]]) == [-1.0]


def test_length_penalty_errors():
    with pytest.raises(ValueError, match="max_length"):
        get_length_penalty(0)
    with pytest.raises(ValueError, match="max_length"):
        get_length_penalty(10.5)
    with pytest.raises(ValueError, match="penalty"):
        get_length_penalty(10, penalty=-1)
    with pytest.raises(ValueError, match="start"):
        get_length_penalty(10, start=10)
    with pytest.raises(ValueError, match="completion_ids"):
        get_length_penalty(10)(None, ["a", "b"], completion_ids=[[1]])


def test_repetition_penalty_shape():
    f = get_repetition_penalty(ngram_size=3, max_penalty=-1.0)
    assert f.__name__ == "repetition_penalty"
    out = f(None, ["the cat sat on the mat", "a b", "", "go go go go go go", "A b c a B c a b c"])
    # 4 distinct trigrams of 4; too short; empty; 1 of 4; 3 of 7 ("a b c", "b c a", "c a b")
    assert out == pytest.approx([0.0, 0.0, 0.0, -0.75, -(1 - 3 / 7)])
    assert f(None, ["spam " * 10000])[0] == pytest.approx(-1.0, abs=1e-3)
    g = get_repetition_penalty(ngram_size=1, max_penalty=-0.5)
    assert g(None, ["a a b b"]) == pytest.approx([-0.25])
    assert all(-1.0 <= v <= 0.0 for v in f(None, ADVERSARIAL))


def test_repetition_penalty_errors():
    with pytest.raises(ValueError, match="max_penalty"):
        get_repetition_penalty(max_penalty=0.5)
    with pytest.raises(ValueError, match="ngram_size"):
        get_repetition_penalty(ngram_size=0)
    with pytest.raises(ValueError, match="ngram_size"):
        get_repetition_penalty(ngram_size=2.0)
    assert get_repetition_penalty(max_penalty=0.0)(None, ["a a a a"]) == [0.0]


# ----------------------------------------------------------------------------- registry / combine

def test_registry():
    assert set(REWARD_FUNCS) == {"accuracy", "format", "tag_count", "countdown", "scratchpad", "length", "repetition"}
    assert REWARD_FUNCS["accuracy"] is accuracy_reward
    funcs = get_reward_funcs(["accuracy", format_reward, "repetition"])
    assert funcs[:2] == [accuracy_reward, format_reward] and funcs[2].__name__ == "repetition_penalty"
    assert get_reward_funcs("format, tag_count") == [format_reward, tag_count_reward]
    with pytest.raises(ValueError, match="names"):
        get_reward_funcs(["accuracy", "nope"])
    with pytest.raises(TypeError, match="names"):
        get_reward_funcs(3)
    for f in REWARD_FUNCS.values():
        out = f(["p"], [wrap("1")], answer=["1"], numbers=[[1]], target=[1], a=[1], b=[0], op=["+"], other=["x"])
        assert len(out) == 1 and isinstance(out[0], float)


def test_combine_rewards():
    def half_none(prompts, completions, **kw):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    def nan_reward(prompts, completions, **kw):
        return [math.nan] * len(completions)

    completions = [wrap("2"), "<think>x</think> 2", wrap("3"), [{"role": "assistant", "content": wrap("2")}]]
    total, per = combine_rewards(
        ["accuracy", format_reward, half_none, nan_reward], [2.0, 0.5, 3.0, 1.0], ["p"] * 4, completions,
        answer=[2, 2, 2, 2], unused=[0] * 4,
    )
    assert per["accuracy_reward"] == [1.0, 0.0, 0.0, 1.0]
    assert per["format_reward"] == [1.0, 0.0, 1.0, 1.0]
    assert per["half_none"] == [1.0, None, 1.0, None]
    assert all(math.isnan(v) for v in per["nan_reward"])
    assert total == pytest.approx([5.5, 0.0, 3.5, 2.5])
    total, per = combine_rewards([format_reward, format_reward], completions=completions)  # weights 1
    assert total == [2.0, 0.0, 2.0, 2.0] and list(per) == ["format_reward", "format_reward_2"]


def test_combine_rewards_errors():
    with pytest.raises(ValueError, match="weights"):
        combine_rewards(["format", "tag_count"], [1.0], None, ["a"])
    with pytest.raises(TypeError, match="weights"):
        combine_rewards(["format"], ["1"], None, ["a"])
    with pytest.raises(TypeError, match="weights"):
        combine_rewards(["format"], [None], None, ["a"])
    with pytest.raises(TypeError, match="weights"):
        combine_rewards(["format"], 1.0, None, ["a"])
    total, _ = combine_rewards(["format"], (w for w in [3]), None, [wrap("1")])  # any iterable
    assert total == [3.0]
    with pytest.raises(TypeError, match="completions"):
        combine_rewards(["format"], None, None)
    with pytest.raises(ValueError):
        combine_rewards([lambda prompts, completions, **kw: [1.0]], None, None, ["a", "b"])


# --------------------------------------------------------------------------------------------
# scratchpad_reward (process reward of the arithmetic task)
def test_scratchpad_reward_counts_right_steps_in_place():
    from r1x.data import load_dataset

    rows = load_dataset("arithmetic", "train", n=200, seed=7, ops="+-*")
    cols = {k: [r[k] for r in rows] for k in ("a", "b", "op")}
    # the reference completions: every step right
    assert rewards.scratchpad_reward(None, [r["completion"] for r in rows], **cols) == [1.0] * len(rows)
    for r in rows[:60]:
        think = r["completion"][len("<think>"): r["completion"].index("</think>")]
        steps = think.split(",")
        for i in range(len(steps)):
            bad = list(steps)
            bad[i] = bad[i] + "7"  # one step wrong
            text = "<think>" + ",".join(bad) + "</think><answer>" + r["answer"] + "</answer>"
            got = rewards.scratchpad_reward(None, [text], a=[r["a"]], b=[r["b"]], op=[r["op"]])[0]
            assert got == pytest.approx((len(steps) - 1) / len(steps))
        # steps shifted by one place earn nothing for the shifted ones
        shifted = "<think>x," + think + "</think>"
        assert rewards.scratchpad_reward(None, [shifted], a=[r["a"]], b=[r["b"]], op=[r["op"]])[0] < 1.0
    # no think block, or an unclosed one: 0
    assert rewards.scratchpad_reward(None, ["<answer>5</answer>", "<think>2+3=5>5"], a=[2, 2], b=[3, 3],
                                     op=["+", "+"]) == [0.0, 0.0]
    assert "scratchpad" in rewards.REWARD_FUNCS


def test_scratchpad_step_rewards_mark_each_step_where_it_ends():
    from r1x.data import load_dataset

    rows = load_dataset("arithmetic", "train", n=80, seed=11, ops="+-*")
    rng = random.Random(SESSION_SEED)
    for r in rows:
        think = r["completion"][len("<think>"): r["completion"].index("</think>")]
        steps = think.split(",")
        bad = {i for i in range(len(steps)) if rng.random() < 0.4}
        written = [s + "7" if i in bad else s for i, s in enumerate(steps)]
        if rng.random() < 0.3:
            written.append("1+1=2>2")  # a step past the reference's last: wrong
        sep = rng.choice([",", ", "])
        text = "<think>" + sep.join(written) + "</think><answer>" + r["answer"] + "</answer>"
        cols = dict(a=[r["a"]], b=[r["b"]], op=[r["op"]])
        got = rewards.scratchpad_step_rewards(None, [text], **cols)[0]
        assert [v for _, v in got] == [0.0 if i in bad or i >= len(steps) else 1.0 for i in range(len(written))]
        for (end, _), step in zip(got, written):  # each offset ends its step's text
            assert text[:end].endswith(step)
        share = rewards.scratchpad_reward(None, [text], **cols)[0]
        assert share == pytest.approx(sum(v for _, v in got[:len(steps)]) / len(steps))
    assert rewards.scratchpad_step_rewards(None, ["<answer>5</answer>", "<think></think>"], a=[2, 2], b=[3, 3],
                                           op=["+", "+"]) == [[], []]
    assert rewards.PROCESS_REWARD_FUNCS["scratchpad"] is rewards.scratchpad_step_rewards
    with pytest.raises(ValueError, match="scratchpad_step_rewards"):
        rewards.scratchpad_step_rewards(None, ["<think>1</think>"], a=[1], b=[2], op=["/"])


def test_scratchpad_reward_bad_columns():
    with pytest.raises(ValueError, match="op"):
        rewards.scratchpad_reward(None, ["<think>1</think>"], a=[1], b=[2], op=["/"])
    with pytest.raises(ValueError, match="a"):
        rewards.scratchpad_reward(None, ["x", "y"], a=[1], b=[2, 3], op=["+", "+"])
