"""``format``: 1.0 when a completion has the shape the prompt asked for, else 0.0.

The format reward of DeepSeek-R1 (Guo et al. 2025, section 2.2.2): reasoning inside ``<think>...</think>``, then
the answer inside ``<answer>...</answer>``, and nothing else. It teaches the shape that the ``accuracy`` reward's
``answer_tag`` extractor reads. The test is a regular expression (``pattern``) matched against the whole
completion, stripped of surrounding whitespace, with ``.`` matching newlines (``dotall``).
"""

from __future__ import annotations

import re

from swiftk.contracts import hookimpl, register_reward

THINK_ANSWER = r"^<think>.*?</think>\s*<answer>.*?</answer>$"


@register_reward("format")
class Format:
    """1.0 / 0.0: ``re.match(pattern, completion.strip())``."""

    def __init__(self, pattern: str = THINK_ANSWER, dotall: bool = True) -> None:
        try:
            self.pattern = re.compile(pattern, re.DOTALL if dotall else 0)
        except re.error as exc:
            raise ValueError(f"format: pattern {pattern!r} is not a valid regular expression: {exc}") from None

    @hookimpl
    def swiftk_reward_compute(self, completions: list[str]) -> dict[str, list[float]]:
        return {"format": [float(self.pattern.match(c.strip()) is not None) for c in completions]}
