"""Pairwise reward-model loss: the Bradley-Terry model (Bradley & Terry 1952) as used to train reward models from
human comparisons (Ouyang et al. 2022, "Training language models to follow instructions with human feedback",
eq. 1), with Llama 2's margin (Touvron et al. 2023, eq. 2) and a centring term (Eisenstein et al. 2023, "Helping
or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking", eq. 2).

The model scores each completion with a scalar r; Bradley-Terry says the chosen one wins with probability
s(r_c - r_r), s the logistic sigmoid. Over B pairs, with an optional per-pair margin m (how much better the
chosen one was rated: Llama 2 maps "significantly better" to a larger m than "slightly better") and centring
coefficient c:

    L = mean_i [-log s(r_c,i - r_r,i - m_i)] + c * mean_i [(r_c,i + r_r,i)^2]        # scalar

The first term only sees differences, so the rewards may drift by any constant; the second pins their mean near
0 (so that rewards from different runs, or an ensemble, are comparable). ``-log s`` is ``-logsigmoid``: finite
for any difference. This is TRL's ``RewardTrainer`` loss.

``[train] stage = "rm"`` trains a reward model (the backbone with a scalar head) with the ``rm`` loss below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss


def pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """The mean Bradley-Terry loss (0-dim) of the rewards ``[B]`` of the chosen and rejected completions.

    ``margin`` ``[B]`` (or a scalar) is subtracted from each reward difference; ``center_rewards_coefficient``, if
    given, weighs the squared sum of each pair's rewards (TRL recommends 0.01)."""
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        # A reward head's [B, 1] against a squeezed [B] would broadcast to [B, B] and compare every pair with every
        # other, silently.
        raise ValueError(
            f"pairwise_loss: expected chosen and rejected rewards of one shape [B], got "
            f"{list(chosen_rewards.shape)} and {list(rejected_rewards.shape)}; squeeze the reward head's last dim"
        )
    difference = chosen_rewards - rejected_rewards  # [B]
    if margin is not None:
        difference = difference - torch.as_tensor(margin, dtype=difference.dtype, device=difference.device)
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


@register_loss("rm")
class RewardModel:
    """Bradley-Terry on a chosen-then-rejected batch: ``outputs.logits`` ``[2B, 1]`` are the reward head's scores
    at each sequence's last token; ``margin`` is a constant margin the chosen reward must clear."""

    def __init__(self, margin: float | None = None, center_rewards_coefficient: float | None = None) -> None:
        self.margin, self.center = margin, center_rewards_coefficient

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        rewards = outputs.logits.float().reshape(-1)  # [2B]
        half = rewards.shape[0] // 2
        chosen, rejected = rewards[:half], rewards[half:]
        margin = None if self.margin is None else torch.full_like(chosen, self.margin)
        loss = pairwise_loss(chosen, rejected, margin=margin, center_rewards_coefficient=self.center)  # mean
        metrics = {"rewards/chosen": float(chosen.detach().mean()), "rewards/rejected": float(rejected.detach().mean()),
                   "rewards/margins": float((chosen - rejected).detach().mean()),
                   "rewards/accuracies": float((chosen > rejected).float().mean())}
        return LossResult(loss * half / batch.num_items_in_batch, metrics)  # the pairs' sum over the step's
