"""Metrics of vision-language answers: VQA accuracy by answer type, and the overlap of predicted boxes (grounding).

Both read the greedy answers to the held-out questions (``[eval] generate = true``) and their references.

``vqa_accuracy``: an answer is right when it equals the reference after VQA's normalisation (lower case, no
punctuation, no articles, number words as digits), reported overall and per answer type, as VQA reports them:
yes/no, number, other (the type is the reference's):

    eval_vqa_accuracy = right / n;  eval_vqa_yes_no, eval_vqa_number, eval_vqa_other: the same within each type

``box_iou``: answers and references hold a box ``[x0, y0, x1, y1]`` (the first four numbers of the text); the
intersection over union of the two boxes, averaged, and the share of answers at IoU >= 0.5 (a detection, as
COCO and RefCOCO count one). An answer without four numbers scores 0 and is counted:

    eval_mean_iou, eval_iou50, eval_box_unreadable (the share of answers without a box)
"""

from __future__ import annotations

import re

from swiftk.contracts import StepState, hookimpl, register_metric

ARTICLES = {"a", "an", "the"}
NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
           "eight": "8", "nine": "9", "ten": "10"}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def vqa_normal(text: str) -> str:
    """VQA's comparison form: lower case, punctuation removed, articles dropped, number words as digits."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBERS.get(w, w) for w in words if w not in ARTICLES)


def answer_type(reference: str) -> str:
    normal = vqa_normal(reference)
    if normal in ("yes", "no"):
        return "yes_no"
    return "number" if NUMBER.fullmatch(normal) else "other"


@register_metric("vqa_accuracy")
class VQAAccuracy:
    """Share of answers equal to their reference after VQA's normalisation, overall and per answer type."""

    def __init__(self) -> None:
        self.right: dict[str, int] = {}
        self.seen: dict[str, int] = {}

    @hookimpl
    def swiftk_eval_start(self, state: StepState) -> None:
        self.right, self.seen = {}, {}

    @hookimpl
    def swiftk_eval_predictions(
        self, prompts: list[str], predictions: list[str], references: list[str], state: StepState
    ) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"vqa_accuracy got {len(predictions)} predictions for {len(references)} references")
        for prediction, reference in zip(predictions, references, strict=True):
            kind = answer_type(reference)
            self.seen[kind] = self.seen.get(kind, 0) + 1
            self.right[kind] = self.right.get(kind, 0) + (vqa_normal(prediction) == vqa_normal(reference))

    @hookimpl
    def swiftk_eval_end(self, state: StepState) -> dict[str, float] | None:
        total = sum(self.seen.values())
        if not total:
            return None
        metrics = {"eval_vqa_accuracy": sum(self.right.values()) / total}
        metrics.update({f"eval_vqa_{kind}": self.right[kind] / n for kind, n in self.seen.items()})
        return metrics


def read_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of ``text`` as a box (corners in either order), or None."""
    found = NUMBER.findall(text)
    if len(found) < 4:
        return None
    x0, y0, x1, y1 = (float(v) for v in found[:4])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(a == b)


@register_metric("box_iou")
class BoxIoU:
    """Mean IoU of the predicted boxes with the reference boxes, and the share at IoU >= 0.5."""

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"box_iou: threshold must be in (0, 1], not {threshold}")
        self.threshold = threshold
        self.scores: list[float] = []
        self.unreadable = 0

    @hookimpl
    def swiftk_eval_start(self, state: StepState) -> None:
        self.scores, self.unreadable = [], 0

    @hookimpl
    def swiftk_eval_predictions(
        self, prompts: list[str], predictions: list[str], references: list[str], state: StepState
    ) -> None:
        for prediction, reference in zip(predictions, references, strict=True):
            truth = read_box(reference)
            if truth is None:
                raise ValueError(f"box_iou: the reference {reference!r} holds no [x0, y0, x1, y1] box")
            guess = read_box(prediction)
            self.unreadable += guess is None
            self.scores.append(0.0 if guess is None else iou(guess, truth))

    @hookimpl
    def swiftk_eval_end(self, state: StepState) -> dict[str, float] | None:
        if not self.scores:
            return None
        n = len(self.scores)
        return {"eval_mean_iou": sum(self.scores) / n,
                "eval_iou50": sum(s >= self.threshold for s in self.scores) / n,
                "eval_box_unreadable": self.unreadable / n}
