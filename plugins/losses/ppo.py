"""Proximal Policy Optimization for RLHF (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7),
with generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16) and the details of Huang et
al. 2024, "The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031), as in TRL's PPOv2 trainer.

Per completion token t, with m the mask [B, L], the policy's log-probs l, the reference's l_ref, the value V and the
reward model's score s [B] of the whole completion:

    r_t   = -kl_coef kl_t  (+ s at the last valid token)   kl_t = l_t - l_ref_t (k1) or e^-x - 1 + x, x = l - l_ref (k3)
    d_t   = r_t + gamma V_{t+1} - V_t                       V_{t+1} = 0 past the last valid token
    A_t   = d_t + gamma lam A_{t+1},   R_t = A_t + V_t      GAE advantages and returns (then A is whitened)
    pg_t  = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),   rho_t = exp(l_t - l_old_t)
    vf_t  = 1/2 max((V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2)

The rewards, GAE and whitening run in the stage, once per rollout; the two losses run per micro-batch here. The
``ppo`` plugin sums ``pg + vf_coef vf`` over the step's completion tokens and divides by their count.
"""

from __future__ import annotations

import torch

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss, token_logps


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set, over ``axis`` (all positions when None)."""
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis) / mask.sum(axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions; ``unbiased`` applies Bessel's correction n / (n - 1)."""
    centred = values - masked_mean(values, mask)
    variance = masked_mean(centred**2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"masked_var: the unbiased variance needs at least 2 valid positions, got {int(count)}")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) with the masked mean and unbiased variance; ``shift_mean`` False adds the
    mean back. Every position is transformed: the caller masks the result."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *,
               kl_coef: float = 0.05, kl_estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards ``[B, L]``: the KL penalty at every valid token, plus the score ``[B]`` at each row's last
    valid token; 0 on padding. Rows must have at least one valid token."""
    x = logps - ref_logps  # [B, L]: log pi / pi_ref
    estimators = {"k1": lambda: x, "k3": lambda: torch.exp(-x) - 1 + x}
    if kl_estimator not in estimators:
        raise ValueError(f"kl_rewards: unknown kl_estimator {kl_estimator!r}; expected k1 or k3")
    rewards = -kl_coef * estimators[kl_estimator]() * mask  # [B, L]
    positions = torch.arange(mask.size(1), device=mask.device)
    last = (positions * mask.bool()).argmax(-1)  # [B]: the last valid position of each row
    return rewards.index_put((torch.arange(mask.size(0), device=mask.device), last), scores, accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns ``[B, L]`` from rewards and values ``[B, L]``; a masked token's value does not
    bootstrap its predecessor, and both outputs are 0 where the mask is 0."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # [B]: A_{t+1}
    next_value = torch.zeros_like(values[:, 0])  # [B]: V_{t+1}, 0 when t+1 is not valid
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    cliprange: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped-surrogate losses ``[B, L]`` (unmasked) and the masked ``policy/clipfrac_avg`` and
    ``policy/approxkl_avg`` (1/2 mean (l - l_old)^2)."""
    log_ratio = logps - old_logps  # [B, L]
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    losses = torch.max(unclipped, clipped)
    metrics = {"policy/clipfrac_avg": masked_mean((clipped > unclipped).float(), mask).item(),
               "policy/approxkl_avg": 0.5 * masked_mean(log_ratio.detach() ** 2, mask).item()}
    return losses, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value losses ``[B, L]`` (unmasked) and the masked ``val/clipfrac_avg``."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    losses = 0.5 * torch.max(unclipped, clipped)
    return losses, {"val/clipfrac_avg": masked_mean((clipped > unclipped).float(), mask).item()}


@register_loss("ppo")
class PPO:
    """PPO's policy and value losses on a rollout: ``outputs.extras["values"]`` [B, T] from the value head, and in
    ``batch.extras`` the rollout's ``old_logps``, ``advantages``, ``returns`` and ``old_values``, all [B, T-1] in
    the layout of the shifted labels."""

    def __init__(self, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
                 temperature: float = 1.0) -> None:
        for name, value in {"cliprange": cliprange, "cliprange_value": cliprange_value,
                            "temperature": temperature}.items():
            if value <= 0:
                raise ValueError(f"ppo: {name} must be > 0, got {value}")
        if vf_coef < 0:
            raise ValueError(f"ppo: vf_coef must be >= 0, got {vf_coef}")
        self.cliprange, self.cliprange_value, self.vf_coef, self.temperature = (
            cliprange, cliprange_value, vf_coef, temperature)

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        missing = {"old_logps", "advantages", "returns", "old_values"} - batch.extras.keys()
        if missing or "values" not in outputs.extras:
            raise ValueError(f"loss 'ppo': missing batch extras {sorted(missing)} or model extras['values']; the "
                             f"stage must provide the rollout and the value head")
        extras = batch.extras
        logps, mask = token_logps(outputs, batch.labels, self.temperature)  # [B, T-1]
        values = outputs.extras["values"][:, :-1].float()  # [B, T-1]: the value before emitting token t+1
        pg, metrics = ppo_policy_loss(logps, extras["old_logps"], extras["advantages"], mask,
                                      cliprange=self.cliprange)
        vf, value_metrics = ppo_value_loss(values, extras["old_values"], extras["returns"], mask,
                                           cliprange_value=self.cliprange_value)
        pg, vf = pg * mask, vf * mask
        tokens = max(batch.num_items_in_batch, 1)
        metrics |= value_metrics | {"loss/policy_avg": masked_mean(pg.detach(), mask).item(),
                                    "loss/value_avg": masked_mean(vf.detach(), mask).item()}
        return LossResult((pg.sum() + self.vf_coef * vf.sum()) / tokens, metrics)
