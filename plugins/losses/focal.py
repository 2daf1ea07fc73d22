"""Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", eq. 5), per supervised token.

    FL(p_t) = -alpha * (1 - p_t)^gamma * log p_t

with p_t the probability the model gives the label token. The factor (1 - p_t)^gamma shrinks the loss of
tokens the model already predicts well (p_t -> 1), so the gradient goes to the hard ones; gamma = 0 and
alpha = 1 give plain cross-entropy, exactly (x^0 = 1). ``1 - p_t`` is computed as ``-expm1(log p_t)``, which keeps
its precision when p_t is close to 1, where ``1 - exp(log p_t)`` would round to 0.

The kernel's ``TokenLoss`` adapter passes the supervised tokens only and divides the sum of the per-token
losses by the step's label count, as for cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swiftk.contracts import register_loss

TINY = torch.finfo(torch.float32).tiny


@register_loss("focal")
class FocalLoss(torch.nn.Module):
    """Cross-entropy down-weighted by ``alpha * (1 - p_t)^gamma``; returns per-token losses ``[N]``."""

    def __init__(self, alpha: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        if alpha <= 0 or gamma < 0:
            raise ValueError(f"focal needs alpha > 0 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)  # [N, V]
        logp_t = logp.gather(-1, labels[:, None])[:, 0]  # [N] log p_t
        # Clamped away from 0: for gamma < 1 the derivative of x^gamma is infinite at x = 0, and a token
        # predicted with certainty (log p_t == 0 in float32) would turn the whole gradient into NaN.
        weight = (-torch.expm1(logp_t)).clamp(min=TINY).pow(self.gamma)  # [N] (1 - p_t)^gamma
        return -self.alpha * weight * logp_t  # [N]
