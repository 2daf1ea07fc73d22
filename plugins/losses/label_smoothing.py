"""Label-smoothed cross-entropy (Szegedy et al. 2016, "Rethinking the Inception Architecture", sec. 7).

The one-hot target is mixed with the uniform distribution over the V vocabulary entries,
q = (1 - eps) * onehot(y) + eps / V, so the per-token loss -sum_v q_v log p_v is

    L = (1 - eps) * -log p_y + eps * mean_v(-log p_v)

The second term keeps the logits from growing without bound to push p_y to 1. It equals PyTorch's
``F.cross_entropy(label_smoothing=eps)``; written out here so the maths and the code read side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swiftk.contracts import register_loss


@register_loss("label_smoothed_ce")
class LabelSmoothedCE(torch.nn.Module):
    """Cross-entropy against targets smoothed by ``epsilon``; returns per-token losses ``[N]``."""

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label_smoothed_ce needs 0 <= epsilon < 1, got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)  # [N, V]
        nll = -logp.gather(-1, labels[:, None])[:, 0]  # [N] -log p_y
        uniform = -logp.mean(dim=-1)  # [N] mean_v -log p_v
        return (1 - self.epsilon) * nll + self.epsilon * uniform  # [N]
