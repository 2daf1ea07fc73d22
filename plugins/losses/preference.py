"""What the preference losses share: the policy's (and reference's) log-probs of a chosen-then-rejected batch,
and the metrics every stage logs. A batch of B pairs holds the B chosen sequences, then the B rejected ones,
prompts masked in the labels; the kernel puts the frozen reference's summed log-probs in
``outputs.extras["ref_logps"]`` (``[2B]``) for the stages that need one."""

from __future__ import annotations

import torch

from swiftk.contracts import Batch, ModelOutputs, sequence_logps


def split_logps(batch: Batch, outputs: ModelOutputs, average: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
    """(chosen ``[B]``, rejected ``[B]``, token counts ``[2B]``): summed log-probs, or per-token means."""
    logps, counts = sequence_logps(outputs, batch.labels)  # [2B], [2B]
    if average:
        logps = logps / counts.clamp(min=1)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:], counts


def reference_logps(outputs: ModelOutputs, counts: torch.Tensor, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's chosen and rejected log-probs ``[B]``, on the same scale as the policy's."""
    if "ref_logps" not in outputs.extras:
        raise ValueError("this loss needs the reference model's log-probs (outputs.extras['ref_logps']); run it "
                         "with [train] stage set to its name, so that the kernel computes them")
    ref = outputs.extras["ref_logps"].to(counts.device).float()
    if average:
        ref = ref / counts.clamp(min=1)
    half = ref.shape[0] // 2
    return ref[:half], ref[half:]


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                 rejected_logps: torch.Tensor) -> dict[str, float]:
    """The metrics every pairwise stage logs, as TRL names them (means over the micro-batch's pairs)."""
    return {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
        "logps/chosen": float(chosen_logps.detach().mean()),
        "logps/rejected": float(rejected_logps.detach().mean()),
    }
