"""``length``: DAPO's soft overlong punishment, a penalty that grows as a completion nears the length limit.

DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", eq. 13) adds, with
``L_max = max_length`` and ``L_cache = buffer``, for a completion of length ``|y|``:

    R(y) =  0                              |y| <= L_max - L_cache
            (L_max - L_cache - |y|) / L_cache   L_max - L_cache < |y| <= L_max      (linear from 0 to -1)
            -1                             |y| > L_max

so that truncated or nearly truncated answers are discouraged smoothly instead of by a cliff. The reward only
sees text, so ``unit`` says how a length is counted: ``"chars"`` (characters; about 4 per token for English
text) or ``"words"`` (whitespace-separated words; about 0.75 per token). Set ``max_length`` a little below the
generation limit converted to that unit.
"""

from __future__ import annotations

from swiftk.contracts import hookimpl, register_reward

UNITS = ("chars", "words")


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO eq. 13: 0 up to ``max_length - buffer``, then linear down to -1 at ``max_length``, -1 beyond."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    return max(-1.0, (start - length) / buffer)


@register_reward("length")
class Length:
    """0 while short enough, linear down to -1 at ``max_length`` (in ``unit``), -1 beyond."""

    def __init__(self, max_length: int = 4096, buffer: int = 1024, unit: str = "chars") -> None:
        if unit not in UNITS:
            raise ValueError(f"length: unit must be one of {', '.join(UNITS)}, got {unit!r}")
        if max_length <= 0 or not 0 < buffer <= max_length:
            raise ValueError(f"length: need max_length > 0 and 0 < buffer <= max_length, got max_length = "
                             f"{max_length}, buffer = {buffer}")
        self.max_length, self.buffer, self.unit = max_length, buffer, unit

    def measure(self, text: str) -> int:
        return len(text) if self.unit == "chars" else len(text.split())

    @hookimpl
    def swiftk_reward_compute(self, completions: list[str]) -> dict[str, list[float]]:
        return {"length": [overlong_penalty(self.measure(c), self.max_length, self.buffer) for c in completions]}
