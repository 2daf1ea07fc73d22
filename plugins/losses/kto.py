"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", eq. 7), on unpaired completions labelled desirable or undesirable.

With the log-ratio of the policy pi to the frozen reference pi_ref

    r(x, y) = log pi(y|x) - log pi_ref(y|x)

the reference point z0 is the batch's estimate of KL(pi || pi_ref), taken on mismatched pairs: each prompt x_j
with the completion y'_j of another row, so it measures how far the policy drifted, not how well it answers:

    z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])        # scalar, detached

and the value of a completion is a sigmoid around that point:

    desirable y     L = lambda_D * (1 - s(beta (r - z0)))        # [Nc]
    undesirable y   L = lambda_U * (1 - s(beta (z0 - r)))        # [Nr]

with s the logistic sigmoid. ``1 - s(t)`` is computed as ``s(-t)``: exact, where ``1 - s(t)`` rounds to 0 for a
large t. z0 carries no gradient (the paper treats it as a constant; it only shifts the reference point), and its
clamp at 0 keeps a noisy negative estimate from rewarding a drift. lambda_D, lambda_U (``desirable_weight``,
``undesirable_weight``) rebalance a data set with unequal counts; the paper keeps lambda_D n_D / (lambda_U n_U)
in [1, 4/3].

``[train] stage = "kto"`` selects the ``kto`` loss below; the kernel builds the mismatched rows and computes the
reference log-probs.
"""

from __future__ import annotations

import torch

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss, sequence_logps


def kto_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    kl_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO losses ``[Nc + Nr]`` (desirable first), detached rewards ``[Nc]`` and ``[Nr]``, and the detached KL
    estimate z0 (0-dim, >= 0).

    ``chosen_logps`` ``[Nc]`` and ``rejected_logps`` ``[Nr]`` are the desirable and undesirable completions'
    log-probs, either of them possibly empty; ``kl_logps`` ``[M]`` (M >= 1) those of the mismatched completions."""
    if beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}")
    if kl_logps.numel() == 0:
        raise ValueError("kto_loss: kl_logps is empty; the KL estimate needs at least one mismatched completion")
    kl = (kl_logps - ref_kl_logps).detach().mean().clamp(min=0)  # [] z0
    chosen_logratios = chosen_logps - ref_chosen_logps  # [Nc]
    rejected_logratios = rejected_logps - ref_rejected_logps  # [Nr]
    chosen_losses = desirable_weight * torch.sigmoid(-beta * (chosen_logratios - kl))  # [Nc]
    rejected_losses = undesirable_weight * torch.sigmoid(-beta * (kl - rejected_logratios))  # [Nr]
    losses = torch.cat([chosen_losses, rejected_losses])  # [Nc + Nr]
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


@register_loss("kto")
class KTO:
    """KTO on an unpaired batch: N examples, then the N mismatched rows (prompt i with completion i+1) that
    estimate the KL term; ``batch.extras["desirable"]`` ``[N]`` marks the good completions."""

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        if beta <= 0:
            raise ValueError(f"kto: beta must be > 0, got {beta}")
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        logps, _ = sequence_logps(outputs, batch.labels)  # [2N]
        if "ref_logps" not in outputs.extras:
            raise ValueError("kto needs the reference model's log-probs; run it with [train] stage = \"kto\"")
        ref = outputs.extras["ref_logps"].to(logps.device).float()  # [2N]
        n = logps.shape[0] // 2
        good = batch.extras["desirable"].to(logps.device).bool()  # [N]
        losses, chosen_rewards, rejected_rewards, kl = kto_loss(
            logps[:n][good], logps[:n][~good], logps[n:], ref[:n][good], ref[:n][~good], ref[n:],
            beta=self.beta, desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        metrics = {"kl": float(kl)}
        if chosen_rewards.numel():
            metrics.update({"rewards/chosen": float(chosen_rewards.mean()),
                            "logps/chosen": float(logps[:n][good].detach().mean())})
        if rejected_rewards.numel():
            metrics.update({"rewards/rejected": float(rejected_rewards.mean()),
                            "logps/rejected": float(logps[:n][~good].detach().mean())})
        return LossResult(losses.sum() / batch.num_items_in_batch, metrics)
