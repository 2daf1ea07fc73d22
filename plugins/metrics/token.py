"""Token-level eval metrics over the supervised tokens: accuracy and perplexity.

Both score the same positions as the training loss: after the causal shift, the logits at t-1 score the
label at t, and positions labelled ``IGNORE_INDEX`` (prompt, padding) are skipped. Both are token-weighted
over the whole eval pass, accumulated batch by batch, never a mean of per-batch means:

    token_accuracy = sum_i [argmax_v logits_{i,v} == y_i] / N
    perplexity     = exp(sum_i -log p(y_i) / N)

with i running over the N supervised tokens of every eval batch.
"""

from __future__ import annotations

import math

import torch.nn.functional as F

from swiftk.contracts import Batch, ModelOutputs, StepState, hookimpl, register_metric, supervised


@register_metric("token_accuracy")
class TokenAccuracy:
    """Share of supervised tokens whose greedy (argmax) prediction is the label: ``eval_token_accuracy``."""

    def __init__(self) -> None:
        self.correct, self.total = 0, 0

    @hookimpl
    def swiftk_eval_start(self, state: StepState) -> None:
        self.correct, self.total = 0, 0

    @hookimpl
    def swiftk_eval_batch(self, batch: Batch, outputs: ModelOutputs, state: StepState) -> None:
        logits, labels = supervised(batch, outputs)  # [N, V], [N]
        self.correct += int((logits.argmax(dim=-1) == labels).sum())
        self.total += labels.numel()

    @hookimpl
    def swiftk_eval_end(self, state: StepState) -> dict[str, float] | None:
        return {"eval_token_accuracy": self.correct / self.total} if self.total else None


@register_metric("perplexity")
class Perplexity:
    """exp of the token-weighted mean negative log-likelihood of the pass: ``eval_ppl``."""

    def __init__(self) -> None:
        self.nll, self.tokens = 0.0, 0

    @hookimpl
    def swiftk_eval_start(self, state: StepState) -> None:
        self.nll, self.tokens = 0.0, 0

    @hookimpl
    def swiftk_eval_batch(self, batch: Batch, outputs: ModelOutputs, state: StepState) -> None:
        logits, labels = supervised(batch, outputs)  # [N, V], [N]
        self.nll += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        self.tokens += labels.numel()

    @hookimpl
    def swiftk_eval_end(self, state: StepState) -> dict[str, float] | None:
        if not self.tokens:
            return None
        mean = self.nll / self.tokens
        return {"eval_ppl": math.exp(mean) if mean < 709 else math.inf}  # exp(709) is float64's limit
