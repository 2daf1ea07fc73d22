"""The ``accuracy`` reward: answer extraction, the cheap comparisons, math-verify's symbolic ones, NaN without a
reference, and a pathological answer that cannot hang the reward."""

from __future__ import annotations

import math
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from swiftk.contracts import lookup
from swiftk.plugins.rewards.accuracy import Accuracy, extract
from swiftk.plugins.rewards.judge import MathJudge

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def reward() -> Iterator[Accuracy]:
    plugin = Accuracy(timeout_s=2.0)
    yield plugin
    plugin.close()


def scores(reward: Accuracy, completions: list[str], references: list[str | None]) -> list[float]:
    return reward.swiftk_reward_compute(completions=completions, references=references)["accuracy"]


def test_extractors_in_order() -> None:
    order = ("boxed", "answer_tag", "answer_line", "hashes", "last_number", "text")
    assert extract("so \\boxed{\\frac{1}{2}} and 7", order) == "\\frac{1}{2}"
    assert extract("<think>2+2</think><answer> 4 </answer>", order) == "4"
    assert extract("<answer>\\boxed{3}</answer>", order) == "3"
    assert extract("work...\nFinal answer: 12 apples\nthanks", order) == "12 apples"
    assert extract("Natalia sold 48+24 = 72 clips.\n#### 72", order) == "72"
    assert extract("she has 3, then 1,234.5 left", order) == "1,234.5"
    assert extract("  blue  ", order) == "blue"
    assert extract("cut off \\boxed{\\frac{1}{", ("boxed",)) is None


def test_numbers_fractions_and_tags(reward: Accuracy) -> None:
    completions = ["The answer is 72.", "1/2", "x = 0.5", "\\boxed{\\frac{1}{2}}", "Answer: 1,000",
                   "<answer>41</answer>", "I think 3", "no number at all"]
    references = ["#### 72", "0.5", "1/2", "0.5", "1000", "42", "1/3", "7"]
    assert scores(reward, completions, references) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_symbolic_answers_need_math_verify(reward: Accuracy) -> None:
    completions = ["\\boxed{\\{1, 2\\}}", "\\boxed{\\sqrt{2}/2}", "\\boxed{\\frac{\\pi}{3}}", "\\boxed{x+1}"]
    references = ["\\boxed{\\{2, 1\\}}", "\\frac{1}{\\sqrt{2}}", "\\boxed{\\pi/3}", "\\boxed{x-1}"]
    assert scores(reward, completions, references) == [1.0, 1.0, 1.0, 0.0]


def test_no_reference_is_nan(reward: Accuracy) -> None:
    result = scores(reward, ["\\boxed{1}", "\\boxed{2}"], [None, "2"])
    assert math.isnan(result[0]) and result[1] == 1.0


def test_pathological_answer_is_cut_off() -> None:
    """SymPy expands (1+x)^100000 for minutes; the worker is killed at the deadline and the next item scores."""
    reward = Accuracy(timeout_s=1.0)
    try:
        scores(reward, ["\\boxed{1}"], ["1/1"])  # the worker's start (SymPy's import) is not timed
        started = time.perf_counter()
        result = scores(reward, ["\\boxed{(1+x)^{100000}}", "\\boxed{\\frac{2}{4}}"],
                        ["\\boxed{(1+x)^{99999}}", "1/2"])
        assert result == [0.0, 1.0]
        assert time.perf_counter() - started < 8.0
    finally:
        reward.close()


def test_config_is_checked_and_registered() -> None:
    with pytest.raises(ValueError, match="extract"):
        Accuracy(extract=["boxed", "last_word"])
    with pytest.raises(ValueError, match="timeout_s"):
        Accuracy(timeout_s=0)
    assert lookup("reward", "accuracy").target is Accuracy


def test_judge_is_killed_at_its_deadline() -> None:
    """A deadline shorter than math-verify's own 1 s alarm: the parent kills the worker, and a new one answers."""
    judge = MathJudge(timeout_s=0.5)
    try:
        assert judge.equal("\\frac{1}{2}", "0.5") is True
        assert judge.equal("(1+x)^{99999}", "(1+x)^{100000}") is None
        assert judge.equal("\\{1,2\\}", "\\{2,1\\}") is True and judge.restarts == 1
    finally:
        judge.close()


def test_judge_in_process_when_no_worker_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a sandboxed host (no fork): math-verify in the main thread with its own alarms, not in other threads."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    judge = MathJudge(timeout_s=1.0)
    assert judge.equal("\\frac{1}{2}", "0.5") is True and judge.in_process
    results: list[bool | None] = []
    thread = threading.Thread(target=lambda: results.append(judge.equal("\\frac{1}{2}", "0.5")))
    thread.start()
    thread.join()
    assert results == [None]
