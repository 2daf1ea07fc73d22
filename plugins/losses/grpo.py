"""Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical
Reasoning in Open Language Models", eq. 3), with the asymmetric clip of DAPO (Yu et al. 2025, arXiv 2503.14476)
and the aggregations of TRL 1.16's ``GRPOTrainer._compute_loss``.

For B completions with advantages A [B] (group-normalised rewards, computed by the stage), the current log-probs
l, those at generation time l_old and the reference's l_ref [B, L], and the completion mask m [B, L]:

    rho_t  = exp(l_t - l_old_t)                                             # [B, L] importance ratio
    pg_t   = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)        # PPO's clipped surrogate
    kl_t   = exp(l_ref_t - l_t) - (l_ref_t - l_t) - 1                       # k3 estimate of KL(pi || pi_ref) >= 0
    loss_t = w_t pg_t + beta kl_t                                           # w: optional importance weights

The KL is added to the loss, not subtracted from the reward, and l_ref is a constant. Aggregation over the mask:

    grpo     sum_b [sum_t m loss / sum_t m] / S        per-sequence mean, then the mean over S sequences
    bnpo     sum m loss / N                            token mean over the N completion tokens
    dapo     sum m loss / N                            the same: TRL counts N over the generation batch (dapo)
                                                       or the micro-batch (bnpo); here the caller passes the count
    dr_grpo  sum m loss / (S * max_completion_length)  Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): no length bias

S and N default to this batch's sequences and tokens; the plugin passes those of the whole optimizer step, so the
micro-batch losses sum to the step's loss. There is no bias correction of the KL (TRL's ``use_bias_correction_kl``).
"""

from __future__ import annotations

import torch

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss, token_logps

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _clip_metrics(rho: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                  epsilon_high: float) -> dict[str, float]:
    """TRL's clip ratios: token means over the mask, and the min / max over sequences of per-sequence means."""
    low = (rho < 1 - epsilon_low) & (advantages < 0)  # [B, L]
    high = (rho > 1 + epsilon_high) & (advantages > 0)
    tokens, lengths = mask.sum().clamp(min=1), mask.sum(-1)  # [], [B]
    scored = lengths > 0  # TRL's nanmin / nanmax skip empty sequences

    def mean(x: torch.Tensor) -> float:
        return ((x & mask).sum() / tokens).item()

    def per_sequence(x: torch.Tensor) -> torch.Tensor:
        return (x & mask).sum(-1)[scored] / lengths[scored]  # [B']

    low_seq, high_seq = per_sequence(low), per_sequence(high)
    return {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
            "clip_ratio/region_mean": mean(low | high),
            "clip_ratio/low_min": low_seq.min().item() if low_seq.numel() else 0.0,
            "clip_ratio/high_max": high_seq.max().item() if high_seq.numel() else 0.0}


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    num_sequences: int | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The 0-dim GRPO loss of ``[B, L]`` log-probs and ``[B]`` advantages, and TRL's metrics (``kl`` when beta > 0,
    ``clip_ratio/*``).

    ``old_per_token_logps`` None means on-policy (the current log-probs, detached); ``ref_per_token_logps`` may be
    None only at beta 0. ``num_items_in_batch`` (N) and ``num_sequences`` (S) default to this batch's tokens and
    sequences; ``is_weights`` ``[B, L]`` multiplies the clipped surrogate, not the KL, as TRL's vLLM correction."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if beta < 0:
        raise ValueError(f"grpo_loss: beta must be >= 0, got {beta}")
    if not 0 <= epsilon_low < 1 or epsilon_high < 0:
        raise ValueError(f"grpo_loss: need 0 <= epsilon_low < 1 and epsilon_high >= 0, got {epsilon_low}, "
                         f"{epsilon_high}")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length <= 0):
        raise ValueError(f"grpo_loss: loss_type 'dr_grpo' divides by max_completion_length; set it to a positive "
                         f"number of tokens (got {max_completion_length})")
    if beta > 0 and ref_per_token_logps is None:
        raise ValueError(f"grpo_loss: beta = {beta} needs the reference log-probs; pass ref_per_token_logps")
    mask = completion_mask.to(per_token_logps.dtype)  # [B, L]
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    a = advantages.unsqueeze(-1)  # [B, 1]
    rho = torch.exp(per_token_logps - old)  # [B, L]
    losses = -torch.min(rho * a, rho.clamp(1 - epsilon_low, 1 + epsilon_high) * a)  # [B, L]
    if is_weights is not None:
        losses = losses * is_weights
    metrics = _clip_metrics(rho.detach(), a, completion_mask.bool(), epsilon_low, epsilon_high)
    if beta > 0:
        log_ratio = ref_per_token_logps - per_token_logps  # [B, L]
        kl = torch.exp(log_ratio) - log_ratio - 1
        losses = losses + beta * kl
        metrics["kl"] = ((kl.detach() * mask).sum() / mask.sum().clamp(min=1)).item()
    sequences = per_token_logps.size(0) if num_sequences is None else num_sequences
    tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
    if loss_type == "grpo":
        loss = ((losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / sequences
    elif loss_type == "dr_grpo":
        loss = (losses * mask).sum() / (sequences * max_completion_length)
    else:
        loss = (losses * mask).sum() / torch.as_tensor(tokens).clamp(min=1)
    return loss, metrics


@register_loss("grpo")
class GRPO:
    """GRPO on the stage's rollouts: the batch's labels mark the completion tokens, ``batch.extras`` carries
    ``advantages`` [B], ``num_sequences`` (the step's sequences) and optionally ``old_logps``, ``ref_logps`` and
    ``is_weights`` [B, T-1], in the layout of the shifted labels. The log-probs it is given must come from
    logits / ``temperature``, as the current ones do here."""

    def __init__(self, beta: float = 0.04, epsilon_low: float = 0.2, epsilon_high: float | None = None,
                 loss_type: str = "grpo", max_completion_length: int | None = None,
                 temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.options = {"beta": beta, "epsilon_low": epsilon_low, "loss_type": loss_type,
                        "epsilon_high": epsilon_low if epsilon_high is None else epsilon_high,
                        "max_completion_length": max_completion_length}
        zeros = torch.zeros(1, 1)
        grpo_loss(zeros, None, zeros, torch.zeros(1), zeros.bool(), **self.options)  # checks the arguments now
        self.beta, self.temperature = beta, temperature

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        extras = batch.extras
        if self.beta > 0 and "ref_logps" not in extras:
            raise ValueError(f"loss 'grpo': [train] beta = {self.beta} needs the reference log-probs, but the batch "
                             f"has no extras['ref_logps']; the stage must provide them, or set [train] beta = 0")
        for key in ("advantages", "num_sequences"):
            if key not in extras:
                raise ValueError(f"loss 'grpo': the batch has no extras[{key!r}]; the stage must provide it")
        logps, mask = token_logps(outputs, batch.labels, self.temperature)  # [B, T-1]
        loss, metrics = grpo_loss(
            logps, extras.get("old_logps"), extras.get("ref_logps"), extras["advantages"], mask, **self.options,
            num_items_in_batch=batch.num_items_in_batch, num_sequences=extras["num_sequences"],
            is_weights=extras.get("is_weights"))
        metrics["completions/mean_length"] = mask.sum(-1).float().mean().item()
        return LossResult(loss, metrics)
