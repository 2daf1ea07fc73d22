"""Contrastive Preference Optimization (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the
Boundaries of LLM Performance in Machine Translation", eq. 3) and SimPO (Meng et al. 2024, "SimPO: Simple
Preference Optimization with a Reference-Free Reward", eq. 6): DPO's losses without a reference model.

For B pairs of a chosen completion y_w and a rejected one y_l, the margin is the policy's own log-prob gap

    h = log pi(y_w|x) - log pi(y_l|x)        # [B]

and, with s the logistic sigmoid and eps = ``label_smoothing``:

    sigmoid  L = -(1 - eps) log s(beta h) - eps log s(-beta h)              CPO eq. 3 (eps = 0)
    hinge    L = max(0, 1 - beta h)                                         SLiC-HF (Zhao et al. 2023)
    ipo      L = (h - 1 / (2 beta))^2                                       IPO (Azar et al. 2023, eq. 17)
    simpo    L = -(1 - eps) log s(beta h - gamma) - eps log s(-(beta h - gamma))     SimPO eq. 6 (eps = 0)

For simpo the caller passes length-normalised log-probs, (1/|y|) log pi(y|x), so beta h is the paper's reward
margin and gamma = ``simpo_gamma`` the target margin it must clear, on the same (beta-scaled) scale. This is
TRL's ``CPOTrainer`` convention, written there as beta * (h - gamma / beta); the SimPO authors' own code instead
takes the ratio gamma / beta as its knob (``gamma_beta_ratio``). log s is ``logsigmoid``, finite for any margin.

CPO proper adds a behaviour-cloning NLL term on the chosen completions (``cpo_alpha``, the ``cpo`` loss below);
SimPO has none (the ``simpo`` loss). The rewards ``beta * log pi`` come back detached, for logging.

The NLL term is each chosen completion's per-token mean, averaged over pairs, like the pairwise term. TRL's
``CPOTrainer`` instead takes one token mean over all the micro-batch's chosen tokens, which weighs a pair by its
length and makes one pair's loss depend on which others share its micro-batch (so on ``batch_size`` and
``grad_accum``); with equal-length completions the two agree. swiftk keeps the per-pair form, so the loss is a
plain mean over pairs and accumulates exactly across micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss
from swiftk.plugins.losses.preference import pair_metrics, split_logps

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log s(z) - eps log s(-z): the logistic loss on a label flipped with probability eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses ``[B]`` and the detached rewards ``beta * logps`` of the chosen and rejected completions
    ``[B]``, from the policy's log-probs ``[B]`` (completion sums, or per-token means for ipo and simpo)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"cpo_loss: unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"cpo_loss: beta must be > 0, got {beta}")
    if label_smoothing and loss_type not in ("sigmoid", "simpo"):
        raise ValueError(f"cpo_loss: label_smoothing applies to sigmoid and simpo only, not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"cpo_loss: label_smoothing is a flip probability in [0, 0.5), got {label_smoothing}")
    h = chosen_logps - rejected_logps  # [B]
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * h, label_smoothing)
    elif loss_type == "simpo":
        losses = _smoothed_sigmoid(beta * h - simpo_gamma, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


@register_loss("cpo")
class CPO:
    """CPO (Xu et al. 2024, eq. 6): the pairwise loss on summed log-probs (per-token means for ipo and simpo), no
    reference model, plus ``cpo_alpha`` times the per-token NLL of the chosen completion."""

    average_types = ("ipo", "simpo")

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, cpo_alpha: float = 1.0) -> None:
        cpo_loss(torch.zeros(1), torch.zeros(1), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.simpo_gamma, self.cpo_alpha = simpo_gamma, cpo_alpha

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        chosen, rejected, counts = split_logps(batch, outputs, self.loss_type in self.average_types)
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            chosen, rejected, beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma)
        metrics = pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        if self.cpo_alpha:
            sums, _, _ = split_logps(batch, outputs, average=False)
            nll = -sums / counts[: sums.shape[0]].clamp(min=1)  # [B] per-token NLL of each chosen completion
            losses = losses + self.cpo_alpha * nll
            metrics["nll_loss"] = float(nll.detach().mean())
        return LossResult(losses.sum() / batch.num_items_in_batch, metrics)


@register_loss("simpo")
class SimPO(CPO):
    """SimPO (Meng et al. 2024, eq. 6): length-normalised log-probs, a target margin ``simpo_gamma``, no reference
    model and no NLL term."""

    def __init__(self, beta: float = 2.0, simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__(beta=beta, loss_type="simpo", label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                         cpo_alpha=0.0)
