"""A new training stage from one plugin file: unlikelihood training (Welleck et al. 2020), an SFT variant that
also pushes probability away from a known-bad completion.

    L = -(1/|y+|) sum_t log p(y+_t | x, y+_<t)  +  alpha * -(1/|y-|) sum_t log(1 - p(y-_t | x, y-_<t))

Rows are preference pairs ``{"prompt", "chosen", "rejected"}``: the chosen completion is learnt, the rejected
one unlearnt. Held out, the stage reports how often the model prefers the chosen completion
(``eval_accuracy``: summed log-prob of chosen > rejected) and both log-probs. Everything lives here: the
stage (its ``[train] unlikelihood_alpha`` key, data, batching, evaluation) and its loss.

    plugins = ["configs/plugins/unlikelihood.py"]
    [train]
    stage = "unlikelihood"
    unlikelihood_alpha = 1.0

Run: swiftk run configs/unlikelihood.toml
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field

from swiftk.plugin import (
    Batch,
    LossChoice,
    LossResult,
    ModelOutputs,
    Stage,
    StageConfig,
    hookimpl,
    register_loss,
    register_stage,
    sequence_logps,
)
from swiftk.plugins.stages.pairs import build_pairs, collate_pairs

SWIFTK_CONTRACT = "0.1"


class UnlikelihoodConfig(StageConfig):
    unlikelihood_alpha: float = Field(1.0, ge=0, description="weight of the unlikelihood term")


@register_stage("unlikelihood")
class Unlikelihood(Stage):
    config = UnlikelihoodConfig
    task_types = ("preference",)
    unit = "pairs"

    def loss(self) -> LossChoice:
        return LossChoice("unlikelihood", {"alpha": self.train.unlikelihood_alpha}, "[train] stage",
                          "[train] unlikelihood_alpha")

    def load(self, path: str, split: str, ctx: Any) -> Sequence[Any]:
        return build_pairs(path, ctx.tokenizer, ctx.data, ctx.transform(split))

    def collate(self, ctx: Any) -> Callable[[list[Any]], Batch]:
        self.batches = functools.partial(collate_pairs, pad_id=ctx.tokenizer.pad_token_id)  # [B chosen; B rejected]
        return self.batches

    @torch.no_grad()
    def evaluate(self, ctx: Any, held_out: Sequence[Any]) -> dict[str, float]:
        model = ctx.unwrapped()
        model.eval()
        wins, chosen_sum, rejected_sum = 0.0, 0.0, 0.0
        for start in range(0, len(held_out), 32):
            chunk = list(held_out[start:start + 32])
            batch = self.batches(chunk).to(ctx.device)
            logps = sequence_logps(self.forward(ctx, model, batch).logits, batch.labels)[0]  # [2B]
            chosen, rejected = logps[:len(chunk)], logps[len(chunk):]
            wins += float((chosen > rejected).sum())
            chosen_sum, rejected_sum = chosen_sum + float(chosen.sum()), rejected_sum + float(rejected.sum())
        model.train()
        n = len(held_out)
        return {"eval_accuracy": wins / n, "eval_logps/chosen": chosen_sum / n, "eval_logps/rejected": rejected_sum / n}


@register_loss("unlikelihood")
class UnlikelihoodLoss:
    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        pairs = int(batch.extras.get("num_pairs", batch.input_ids.shape[0] // 2))  # rows: B chosen, then B rejected
        targets = batch.labels[:, 1:]  # [2B, T-1]
        mask = (targets != -100).float()
        logp = outputs.logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        per_row = mask.sum(-1).clamp(min=1)  # [2B] completion tokens
        likelihood = -(logp * mask).sum(-1)[:pairs] / per_row[:pairs]  # [B]
        one_minus_p = (1 - logp.exp()).clamp(min=1e-6)
        unlikelihood = -(one_minus_p.log() * mask).sum(-1)[pairs:] / per_row[pairs:]  # [B]
        loss = (likelihood + self.alpha * unlikelihood).sum() / batch.num_items_in_batch
        return LossResult(loss, {"likelihood": float(likelihood.detach().mean()),
                                 "unlikelihood": float(unlikelihood.detach().mean())})
