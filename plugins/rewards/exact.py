"""``exact_match``: 1.0 when a completion, stripped, equals its reference, stripped; else 0.0.

The strictest check: the answer's form counts as much as its content (the quickstart's ``Answer: Cairo.``). Use
``accuracy`` to compare extracted answers instead. A row without a reference scores NaN.
"""

from __future__ import annotations

from swiftk.contracts import hookimpl, register_reward


@register_reward("exact_match")
class ExactMatch:
    """1.0 / 0.0: ``completion.strip() == reference.strip()`` (case-sensitive unless ``ignore_case``)."""

    def __init__(self, ignore_case: bool = False) -> None:
        self.ignore_case = ignore_case

    def equal(self, completion: str, reference: str) -> bool:
        a, b = completion.strip(), reference.strip()
        return a.lower() == b.lower() if self.ignore_case else a == b

    @hookimpl
    def swiftk_reward_compute(self, completions: list[str], references: list[str | None]) -> dict[str, list[float]]:
        return {"exact_match": [float("nan") if r is None else float(self.equal(c, r))
                                for c, r in zip(completions, references, strict=True)]}
