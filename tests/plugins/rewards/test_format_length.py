"""The ``format`` and ``length`` rewards: the R1 shape, a custom pattern, DAPO's overlong penalty by hand."""

from __future__ import annotations

import pytest

from swiftk.plugins.rewards.format import Format
from swiftk.plugins.rewards.length import Length


def test_format_default_is_think_then_answer() -> None:
    completions = ["<think>\n2+2\n</think>\n<answer>4</answer>\n", "<answer>4</answer>",
                   "<think>x</think><answer>4</answer> and more", "<think>a</think>  <answer>\n4\n</answer>"]
    assert Format().swiftk_reward_compute(completions=completions) == {"format": [1.0, 0.0, 0.0, 1.0]}


def test_format_custom_pattern_and_bad_regex() -> None:
    reward = Format(pattern=r"^Answer: \d+$", dotall=False)
    assert reward.swiftk_reward_compute(completions=["Answer: 12", "Answer: x"]) == {"format": [1.0, 0.0]}
    with pytest.raises(ValueError, match="format: pattern"):
        Format(pattern="(unclosed")


def test_length_is_dapo_soft_overlong() -> None:
    """max 10, buffer 4: 0 up to 6 characters, then (6 - n) / 4: 7 -> -0.25, 8 -> -0.5, 10 -> -1, 12 -> -1."""
    reward = Length(max_length=10, buffer=4)
    completions = ["a" * n for n in (0, 6, 7, 8, 10, 12)]
    assert reward.swiftk_reward_compute(completions=completions) == {"length": [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]}


def test_length_in_words_and_bad_config() -> None:
    reward = Length(max_length=4, buffer=2, unit="words")
    assert reward.swiftk_reward_compute(completions=["one two", "a b  c", "a b c d e"]) == {"length": [0.0, -0.5, -1.0]}
    for bad in ({"unit": "tokens"}, {"max_length": 0}, {"buffer": 0}, {"max_length": 4, "buffer": 5}):
        with pytest.raises(ValueError, match="length"):
            Length(**bad)  # type: ignore[arg-type]
