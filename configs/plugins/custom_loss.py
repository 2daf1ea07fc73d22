"""An outside plugin, as a user writes one: focal loss (Lin et al. 2017) registered under "focal_loss".

    FL(p_t) = -alpha * (1 - p_t)^gamma * log p_t

Named in a config with ``plugins = ["configs/plugins/custom_loss.py"]`` and ``loss_type = "focal_loss"``.
With gamma = 0 and alpha = 1 it is plain cross-entropy.
"""

import torch
import torch.nn.functional as F

from swiftk.plugin import register_loss

SWIFTK_CONTRACT = "0.1"


@register_loss("focal_loss")
class FocalLoss(torch.nn.Module):
    def __init__(self, alpha: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=-1).gather(-1, labels[:, None])[:, 0]  # [N] log p_t
        # (1 - p_t) is kept above 0: x^gamma has an infinite derivative at 0 for gamma < 1 (NaN gradients).
        weight = (1 - logp.exp()).clamp(min=1e-12) ** self.gamma  # [N]
        return -self.alpha * weight * logp  # [N] per-token losses
