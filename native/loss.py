"""A native loss plugin as autograd sees it, and as the kernel calls it (``swiftk_loss_compute``).

The native side defines ``defaults()``, ``forward(logits[N, V], labels[N], hyper) -> [losses[N], *saved]`` and
``backward(grad_losses[N], logits, labels, saved, hyper) -> grad_logits[N, V]`` (see native/README.md); rows
whose label is ``ignore_index`` get loss 0 and gradient 0, so the kernel passes every position of the batch
(a view of the logits, no copy of the supervised rows) with the shifted labels.
"""

from __future__ import annotations

from typing import Any

import torch

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, shifted_labels
from swiftk.native.load import NativePlugin, hyper


class NativeLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, module: Any,
                settings: dict[str, float]) -> torch.Tensor:
        losses, *saved = module.forward(logits, labels, settings)
        ctx.save_for_backward(logits, labels, *saved)
        ctx.module, ctx.settings = module, settings
        return torch.as_tensor(losses)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, labels, *saved = ctx.saved_tensors
        grad_logits = ctx.module.backward(grad.contiguous(), logits, labels, saved, ctx.settings)
        return grad_logits, None, None, None


def native_loss(plugin: NativePlugin, logits: torch.Tensor, labels: torch.Tensor,
                settings: dict[str, float]) -> torch.Tensor:
    """Per-row losses ``[N]`` of ``logits [N, V]`` against ``labels [N]``, differentiable w.r.t. the logits."""
    logits = logits if logits.is_contiguous() else logits.contiguous()
    losses: torch.Tensor = NativeLossFunction.apply(logits, labels, plugin.module, settings)  # type: ignore[no-untyped-call]
    return losses


class NativeTokenLoss:
    """The step's loss from a native per-token loss: the sum over supervised tokens / the step's token count.

    Subclasses name their plugin with ``load_plugin``; ``__init__`` takes the plugin's hyperparameters."""

    def __init__(self, **config: Any) -> None:
        self.plugin = self.load_plugin()
        self.settings = hyper(self.plugin.defaults(), config, f"loss '{self.plugin.info.name}'")

    @classmethod
    def load_plugin(cls) -> NativePlugin:
        raise NotImplementedError

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        logits = outputs.logits.flatten(0, 1)  # [B*T, V], a view
        targets = shifted_labels(batch.labels).flatten()  # [B*T], IGNORE_INDEX where not supervised
        losses = native_loss(self.plugin, logits, targets, self.settings)
        return LossResult(losses.sum() / max(batch.num_items_in_batch, 1))
