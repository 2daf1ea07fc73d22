"""The ``countdown`` and ``exact_match`` rewards: right answers score 1.0, near misses 0.0, and nothing in an
answer is ever run as Python."""

from __future__ import annotations

import json
import math

import pytest

from swiftk.plugins.rewards.countdown import Countdown, answer_of, evaluate
from swiftk.plugins.rewards.exact import ExactMatch

PUZZLE = json.dumps({"numbers": [3, 7, 4], "target": 25})


@pytest.mark.parametrize(("answer", "right"), [
    ("3*7+4", True),
    ("7*4-3", True),
    ("Let me see: 7*3 is 21. Answer: 7*3 + 4 = 25.", True),
    ("<think>try 3*7</think><answer>(7 * 3) + 4</answer>", True),
    ("3*7+4+0", False),                # 0 is not given
    ("3*7+4*1", False),                # neither is 1
    ("3*7+3+1", False),                # 3 used twice
    ("(7-3)*4", False),                # 16, not 25
    ("3*7", False),
    ("__import__('os').system('true')", False),  # parsed, not evaluated: a call is not arithmetic
    ("4/(7-7)", False),                # division by zero is wrong, not a crash
    ("", False),
])
def test_countdown_checks_numbers_and_value(answer: str, right: bool) -> None:
    scores = Countdown().swiftk_reward_compute(completions=[answer], references=[PUZZLE])["countdown"]
    assert scores == [float(right)]


def test_countdown_reads_the_last_answer_and_drops_the_equation() -> None:
    assert answer_of("Answer: 1+2\nAnswer: 7*(12/3)-3 = 25.") == "7*(12/3)-3"
    assert evaluate("7/2*2")[0] == 7  # exact fractions
    value, used = evaluate("-(3-12)*3-2")
    assert value == 25 and used == [3, 12, 3, 2]
    with pytest.raises(ValueError):
        evaluate("1" * 300)
    assert math.isnan(Countdown().swiftk_reward_compute(completions=["1"], references=[None])["countdown"][0])


def test_exact_match_strips_and_optionally_ignores_case() -> None:
    strict, loose = ExactMatch(), ExactMatch(ignore_case=True)
    completions, references = ["  Answer: Cairo.\n", "answer: cairo.", "Answer: Cairo"], ["Answer: Cairo."] * 3
    assert strict.swiftk_reward_compute(completions, references)["exact_match"] == [1.0, 0.0, 0.0]
    assert loose.swiftk_reward_compute(completions, references)["exact_match"] == [1.0, 1.0, 0.0]
    assert math.isnan(strict.swiftk_reward_compute(["x"], [None])["exact_match"][0])
