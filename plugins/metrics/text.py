"""Exact match between greedy generations and reference answers.

    exact_match = sum_i [norm(prediction_i) == norm(reference_i)] / n

over the n eval prompts of the pass. With ``normalize``, ``norm`` strips the ends and collapses every run
of whitespace to one space (a trailing newline or a double space is not a wrong answer); ``ignore_case``
also case-folds. The kernel generates only when ``[eval] generate`` or ``exact_match`` is set.
"""

from __future__ import annotations

from swiftk.contracts import StepState, hookimpl, register_metric


@register_metric("exact_match")
class ExactMatch:
    """Share of predictions equal to their reference, after normalisation: ``eval_exact_match``."""

    def __init__(self, normalize: bool = True, ignore_case: bool = False) -> None:
        self.normalize = normalize
        self.ignore_case = ignore_case
        self.hits, self.total = 0, 0

    def norm(self, text: str) -> str:
        if self.normalize:
            text = " ".join(text.split())
        return text.casefold() if self.ignore_case else text

    @hookimpl
    def swiftk_eval_start(self, state: StepState) -> None:
        self.hits, self.total = 0, 0

    @hookimpl
    def swiftk_eval_predictions(
        self, prompts: list[str], predictions: list[str], references: list[str], state: StepState
    ) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"exact_match got {len(predictions)} predictions for {len(references)} references")
        self.hits += sum(self.norm(p) == self.norm(r) for p, r in zip(predictions, references, strict=True))
        self.total += len(references)

    @hookimpl
    def swiftk_eval_end(self, state: StepState) -> dict[str, float] | None:
        return {"eval_exact_match": self.hits / self.total} if self.total else None
