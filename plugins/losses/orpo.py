"""Odds Ratio Preference Optimization (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
Reference Model", eqs. 4-7): the odds-ratio penalty that ORPO adds to the chosen completions' NLL.

With P(y|x) = exp(l), l the per-token-mean log-prob of a completion, its odds are P / (1 - P), so

    log odds(y|x) = l - log(1 - exp(l))                                         # [B]
    log_odds      = log odds(y_w|x) - log odds(y_l|x)                           # [B]  eqs. 4-5, in logs
    penalty       = -lambda * log s(log_odds)                                   # [B]  eq. 7, lambda = beta

and ORPO minimises mean(NLL(y_w)) + mean(penalty) (eq. 6). s is the logistic sigmoid (``logsigmoid``: finite for
any log_odds). ``log(1 - exp(l))`` loses everything near l = 0 when written ``log1p(-exp(l))`` (exp(l) rounds
to 1), and near l = -inf when written ``log(-expm1(l))``; ``log1mexp`` switches form at -ln 2 (Maechler 2012,
"Accurately Computing log(1 - exp(-|a|))").

Returned for logging, detached, as TRL's ``ORPOTrainer`` names them: the rewards ``beta * l`` ``[B]``,
``log_odds_ratio`` = mean(log s(log_odds)) (a log-probability, despite its name) and ``log_odds_chosen`` =
mean(log_odds).

The ``orpo`` loss below adds the penalty to the chosen completion's per-token NLL (ORPO eq. 6); no reference model.
That NLL is the paper's L_SFT (eq. 2: each chosen completion's token mean, then the mean over pairs). TRL's
``ORPOTrainer`` takes one token mean over all the micro-batch's chosen tokens instead, which weighs long
completions more and ties a pair's loss to its micro-batch neighbours; the two agree when every completion has
the same length. swiftk follows the paper, so the loss accumulates exactly across micro-batches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss
from swiftk.plugins.losses.preference import pair_metrics, split_logps

LN2 = math.log(2)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate over the whole range and with a finite gradient everywhere."""
    # A log-prob of exactly 0 (every token certain in floating point) would give log 0 = -inf and a NaN gradient;
    # the smallest normal number below 0 stands in for it.
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -LN2
    # Each branch sees only inputs it is safe on: torch.where back-propagates through both, and the unused
    # log1p(-exp(x)) at x ~ 0 has an infinite derivative that would turn the gradient into NaN (0 * inf).
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(x.clamp(min=-LN2))),
        torch.log1p(-torch.exp(x.clamp(max=-LN2))),
    )


def orpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The odds-ratio penalty ``[B]`` from per-token-mean log-probs ``[B]``; then the detached rewards of the chosen
    and rejected completions ``[B]`` and the 0-dim logging means ``log_odds_ratio`` and ``log_odds_chosen``."""
    if beta <= 0:
        raise ValueError(f"orpo_loss: beta must be > 0, got {beta}")
    log_odds = (chosen_logps - log1mexp(chosen_logps)) - (rejected_logps - log1mexp(rejected_logps))  # [B]
    log_sigmoid = F.logsigmoid(log_odds)  # [B]
    penalty = -beta * log_sigmoid  # [B]
    return (
        penalty,
        beta * chosen_logps.detach(),
        beta * rejected_logps.detach(),
        log_sigmoid.detach().mean(),
        log_odds.detach().mean(),
    )


@register_loss("orpo")
class ORPO:
    """ORPO (Hong et al. 2024, eq. 6): the chosen completion's per-token NLL plus ``beta`` times the odds-ratio
    penalty, on per-token-mean log-probs."""

    def __init__(self, beta: float = 0.1) -> None:
        if beta <= 0:
            raise ValueError(f"orpo: beta must be > 0, got {beta}")
        self.beta = beta

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        chosen, rejected, _ = split_logps(batch, outputs, average=True)  # [B] per-token means
        penalty, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo_loss(
            chosen, rejected, beta=self.beta)
        nll = -chosen  # [B]
        metrics = pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        metrics.update({"nll_loss": float(nll.detach().mean()), "log_odds_ratio": float(log_odds_ratio),
                        "log_odds_chosen": float(log_odds_chosen)})
        return LossResult((nll + penalty).sum() / batch.num_items_in_batch, metrics)
