"""Pairwise preference stages: chosen/rejected pairs, one forward of ``[2B, T]`` per micro-batch, learnt by the
loss plugin named like the stage (plugins/losses/dpo.py, cpo.py, orpo.py).

  dpo    Direct Preference Optimization (Rafailov et al. 2023): against a frozen reference
  simpo  SimPO (Meng et al. 2024): length-normalised, reference-free, with a target margin
  orpo   ORPO (Hong et al. 2024): SFT plus an odds-ratio penalty, reference-free
  cpo    CPO (Xu et al. 2024): reference-free DPO with an NLL term on the chosen answers

Held out, the pairs go through the same loss: ``eval_loss`` and its metrics (``eval_rewards/accuracies`` is
the held-out preference accuracy).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field

from swiftk.contracts import Batch
from swiftk.contracts.stages import DataContext, LossChoice, Stage, StageConfig, StepContext, register_stage
from swiftk.plugins.stages.pairs import Pair, build_pairs, collate_pairs


class PreferenceConfig(StageConfig):
    """[train] keys of the preference stages."""

    beta: float | None = Field(None, gt=0, description="the loss's beta (default: the stage's own)")


class VariantConfig(PreferenceConfig):
    """dpo and cpo: ``loss_type`` names the loss variant, not a loss plugin (as in ms-swift and TRL)."""

    loss_type: str = Field("sigmoid", description="the variant: sigmoid, hinge, ipo... (see the stage's loss)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="the assumed label-flip probability")


class DPOConfig(VariantConfig):
    precompute_ref_logps: bool = Field(False, description="score the pairs with the reference once, before "
                                       "training, instead of a reference forward every step")


class PairStage(Stage):
    """Chosen/rejected pairs, trained by the loss registered under the stage's name."""

    config = PreferenceConfig
    task_types = ("preference",)
    unit = "pairs"
    read_examples = staticmethod(build_pairs)  # a data file -> examples
    batch_examples = staticmethod(collate_pairs)  # examples -> one micro-batch ([2B, T]: chosen, then rejected)

    def __init__(self, train: Any) -> None:
        super().__init__(train)
        self.batches: Callable[[list[Any]], Batch] | None = None
        self.eval_batch_size = 8

    def loss(self) -> LossChoice:
        arguments: dict[str, Any] = {}
        if getattr(self.train, "beta", None) is not None:
            arguments["beta"] = self.train.beta
        variant = self.train.loss_type
        if variant != "cross_entropy":  # the generic default means "the stage's own loss, as it is"
            arguments["loss_type"] = variant
        if getattr(self.train, "label_smoothing", 0.0):
            arguments["label_smoothing"] = self.train.label_smoothing
        return LossChoice(self.name, {**arguments, **self.train.loss_config}, "[train] stage", "[train] loss_config")

    def load(self, path: str, split: str, ctx: DataContext) -> Sequence[Any]:
        self.eval_batch_size = ctx.eval.batch_size
        return self.read_examples(path, ctx.tokenizer, ctx.data, ctx.transform(split))

    def collate(self, ctx: DataContext) -> Callable[[list[Any]], Batch]:
        self.batches = functools.partial(self.batch_examples, pad_id=ctx.tokenizer.pad_token_id)
        return self.batches

    @torch.no_grad()
    def evaluate(self, ctx: StepContext, held_out: Sequence[Any]) -> dict[str, float]:
        """Held-out examples through the stage's own loss, weighted by example."""
        assert self.batches is not None
        model = ctx.unwrapped()
        training = model.training
        model.eval()
        totals: dict[str, float] = {}
        state = ctx.state()
        try:
            for start in range(0, len(held_out), self.eval_batch_size):
                chunk = list(held_out[start:start + self.eval_batch_size])
                batch = self.batches(chunk).to(ctx.device)
                batch.num_items_in_batch = len(chunk)
                result = ctx.call("swiftk_loss_compute", batch=batch, outputs=self.forward(ctx, model, batch),
                                  step=state.step, state=state)
                for key, value in {"loss": float(result.loss), **result.metrics}.items():
                    totals[key] = totals.get(key, 0.0) + value * len(chunk)
        finally:
            model.train(training)
        return {f"eval_{key}": value / len(held_out) for key, value in totals.items()}


@register_stage("dpo")
class DPO(PairStage):
    """Against a frozen reference: the policy's log-prob margin over the reference's."""

    config = DPOConfig
    needs_reference = True

    def prepare(self, ctx: StepContext, train: Sequence[Any], held_out: Sequence[Any]) -> None:
        """With ``precompute_ref_logps``: score every pair with the reference once; no step needs it again."""
        if not self.train.precompute_ref_logps or ctx.reference is None or self.batches is None:
            return
        started = time.perf_counter()
        for pairs in (train, held_out):
            for start in range(0, len(pairs), self.train.batch_size):
                chunk: list[Pair] = list(pairs[start:start + self.train.batch_size])
                logps = ctx.reference.logps(self.batches(chunk).to(ctx.device)).tolist()  # [2B]
                for pair, chosen, rejected in zip(chunk, logps[:len(chunk)], logps[len(chunk):], strict=True):
                    pair.ref = (chosen, rejected)
        ctx.reference.release()
        ctx.say(f"reference: scored {len(train) + len(held_out)} pairs in {time.perf_counter() - started:.1f} s "
                f"(precompute_ref_logps)")


@register_stage("cpo")
class CPO(PairStage):
    """Reference-free, with an NLL term on the chosen answers."""

    config = VariantConfig


@register_stage("simpo")
class SimPO(PairStage):
    """Length-normalised and reference-free, with a target margin (``loss_config.simpo_gamma``)."""


@register_stage("orpo")
class ORPO(PairStage):
    """SFT on the chosen answers plus an odds-ratio penalty; reference-free."""
