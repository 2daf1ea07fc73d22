"""The frozen reference model a stage may ask for (``Stage.needs_reference``): DPO and KTO compare the policy's
log-probs with it. The kernel builds it because it owns the model: from ``[model] ref_model_id``, else the
policy itself with its LoRA adapters disabled (no second copy in memory), else a frozen copy of the model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from peft import PeftModel

from swiftk.contracts import Batch, ModelOutputs, sequence_logps, token_logps
from swiftk.kernel.heads import ChunkedHead
from swiftk.kernel.model import forward_logits, load_model


class ReferenceModel:
    """A batch's summed log-probs per row, without gradient and without dropout."""

    def __init__(self, model: torch.nn.Module | None, policy: torch.nn.Module,
                 autocast: Callable[[], AbstractContextManager[Any]], chunked: bool = False) -> None:
        self.model, self.policy, self.autocast = model, policy, autocast
        self.released = False
        # Scored from its hidden states chunk by chunk, as the policy's losses are ([train] chunked_loss).
        self.head = ChunkedHead.of(model if model is not None else policy)[0] if chunked else None

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        return sequence_logps(self.outputs(batch), batch.labels)[0]  # [rows]

    @torch.no_grad()
    def token_logps(self, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
        return token_logps(self.outputs(batch), batch.labels, temperature)[0]  # [rows, T-1]

    def outputs(self, batch: Batch) -> ModelOutputs:
        if self.released:
            raise RuntimeError("the reference model was released after precompute_ref_logps scored every example; "
                               "a batch without extras['ref_logps'] reached it (does the stage's collate carry them?)")
        model = self.model if self.model is not None else self.policy
        adapters_off = self.policy.disable_adapter() if self.model is None else contextlib.nullcontext()  # type: ignore[operator]
        training = model.training
        model.eval()
        try:
            with adapters_off, self.autocast():
                if self.head is not None and self.head.check_once(model, batch):
                    self.head = None
                if self.head is not None:
                    return self.head.outputs(model, batch)
                return ModelOutputs(forward_logits(model, batch))  # [rows, T, V]
        finally:
            model.train(training)

    def extras(self, batch: Batch) -> dict[str, torch.Tensor]:
        """What the stage's loss reads in ``ModelOutputs.extras``: precomputed with the batch, or computed now."""
        if "ref_logps" in batch.extras:
            return {"ref_logps": batch.extras["ref_logps"]}
        return {"ref_logps": self.logps(batch)}

    def release(self) -> None:
        """Every example carries its reference log-probs now: a model of its own can go."""
        self.model, self.released = None, True


def make_reference(ref_model_id: str | None, model_cfg: Any, model: torch.nn.Module, vocab_size: int,
                   device: torch.device, autocast: Callable[[], AbstractContextManager[Any]],
                   chunked: bool = False) -> ReferenceModel:
    """``[model] ref_model_id`` when set to another model; else the policy with its LoRA adapters disabled; else
    (full fine-tuning) a frozen copy of the model as loaded. A ``ref_model_id`` equal to ``model_id`` (as ms-swift
    configs write it) is the base as loaded: no second load, and a random-init base is the same random model."""
    if ref_model_id is not None and ref_model_id != model_cfg.model_id:  # the same id: the base as loaded
        ref_cfg = model_cfg.model_copy(update={"model_id": ref_model_id, "gguf_file": None})
        ref_model = load_model(ref_cfg, vocab_size, device)
    elif isinstance(model, PeftModel):
        return ReferenceModel(None, model, autocast, chunked)
    else:
        ref_model = copy.deepcopy(model)
    ref_model.requires_grad_(False)
    return ReferenceModel(ref_model.eval(), model, autocast, chunked)
