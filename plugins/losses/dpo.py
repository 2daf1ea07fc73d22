"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", eq. 7) and three losses on the same margin.

For B pairs of a chosen completion y_w and a rejected one y_l, the policy pi and the frozen reference pi_ref give
the margin of the log-ratios

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]        # [B]

and, with eps = ``label_smoothing``, the probability that a pair's label is flipped:

    sigmoid  L = -(1 - eps) log s(beta h) - eps log s(-beta h)        DPO eq. 7; eps > 0 is conservative DPO
                                                                       (Mitchell 2023, "A note on DPO with noisy
                                                                       preferences and relationship to IPO")
    hinge    L = max(0, 1 - beta h)                                    SLiC-HF (Zhao et al. 2023), on log-ratios
    ipo      L = (h - 1 / (2 beta))^2                                  IPO (Azar et al. 2023, "A General Theoretical
                                                                       Paradigm to Understand Learning from Human
                                                                       Preferences", eq. 17); beta is their tau
    robust   L = [-(1 - eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps)
                                                                       rDPO (Chowdhury et al. 2024, "Provably Robust
                                                                       DPO"): unbiased under flip rate eps < 1/2

where s is the logistic sigmoid; log s is computed as ``logsigmoid``, finite for any margin. Robust DPO can go
below 0: it subtracts the flipped-label term instead of adding it. The log-probs are used as given: the caller
passes completion sums, or per-token means for ipo (the IPO authors normalise by length). The implicit rewards
``beta * (log pi - log pi_ref)`` come back detached, for logging.

``[train] stage = "dpo"`` selects the ``dpo`` loss below; the kernel computes the reference log-probs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss
from swiftk.plugins.losses.preference import pair_metrics, reference_logps, split_logps

Loss = Callable[[torch.Tensor, float, float], torch.Tensor]  # (margin h [B], beta, eps) -> losses [B]


def _sigmoid(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _hinge(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return torch.relu(1 - beta * h)


def _ipo(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return (h - 1 / (2 * beta)) ** 2


def _robust(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


LOSSES: dict[str, Loss] = {"sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "robust": _robust}
SMOOTHED = ("sigmoid", "robust")  # the loss types that read label_smoothing


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses ``[B]`` and the detached implicit rewards of the chosen and rejected completions ``[B]``.

    All four inputs are ``[B]`` log-probs; the reference ones should carry no gradient."""
    if loss_type not in LOSSES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected one of {', '.join(LOSSES)}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if label_smoothing and loss_type not in SMOOTHED:
        raise ValueError(f"dpo_loss: label_smoothing applies to {' and '.join(SMOOTHED)} only, not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing is a flip probability in [0, 0.5), got {label_smoothing}")
    chosen_logratios = chosen_logps - ref_chosen_logps  # [B]
    rejected_logratios = rejected_logps - ref_rejected_logps  # [B]
    losses = LOSSES[loss_type](chosen_logratios - rejected_logratios, beta, label_smoothing)  # [B]
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@register_loss("dpo")
class DPO:
    """DPO on a chosen-then-rejected batch: summed completion log-probs (per-token means for ipo), against the
    frozen reference's; the step's loss is the mean over its pairs."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=beta, loss_type=loss_type,
                 label_smoothing=label_smoothing)  # checks the arguments now, not at the first step
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        average = self.loss_type == "ipo"
        chosen, rejected, counts = split_logps(batch, outputs, average)  # [B], [B], [2B]
        ref_chosen, ref_rejected = reference_logps(outputs, counts, average)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing)
        return LossResult(losses.sum() / batch.num_items_in_batch,
                          pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected))
