"""Token-level cross-entropy for supervised fine-tuning (the causal-LM objective).

    L = sum_{b,t} m_{b,t} * -log p(x_{b,t} | x_{b,<t}) / N

with ``m`` the label mask after the causal shift and ``N = batch.num_items_in_batch``, the label tokens of the
whole optimizer step (all micro-batches, all ranks). Dividing by the step's N, not by each micro-batch's own
count, keeps the gradient independent of how the step is split into micro-batches.
"""

from __future__ import annotations

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss, token_cross_entropy


@register_loss("cross_entropy")
class CrossEntropy:
    """Next-token cross-entropy over the supervised tokens, summed and divided by the step's token count."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        # From the logits, or from the hidden states and the head chunk by chunk (never [B, T, V] at once).
        total = token_cross_entropy(outputs, batch.labels, self.label_smoothing)
        return LossResult(total / max(batch.num_items_in_batch, 1))
