"""Cross-entropy with the z-loss auxiliary term (PaLM, Chowdhery et al. 2022, sec. 5), per supervised token.

    Z   = logsumexp_v(logits_v)          # the softmax normaliser, log Z
    L   = (Z - logits_y) + z_weight * Z^2

The first term is the usual cross-entropy -log p_y; the second pulls log Z towards 0, which keeps the
logits from drifting to large magnitudes and stabilises training (PaLM uses z_weight = 1e-4).
"""

from __future__ import annotations

import torch

from swiftk.contracts import register_loss


@register_loss("z_loss")
class ZLoss(torch.nn.Module):
    """Cross-entropy plus ``z_weight * logsumexp(logits)^2``; returns per-token losses ``[N]``."""

    def __init__(self, z_weight: float = 1e-4) -> None:
        super().__init__()
        if z_weight < 0:
            raise ValueError(f"z_loss needs z_weight >= 0, got {z_weight}")
        self.z_weight = z_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # [N, V]
        log_z = torch.logsumexp(logits, dim=-1)  # [N]
        nll = log_z - logits.gather(-1, labels[:, None])[:, 0]  # [N] -log p_y
        return nll + self.z_weight * log_z.square()  # [N]
