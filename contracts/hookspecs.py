"""Hook specifications: every point where the kernel hands control to plugins.

Grouped by phase, in the order a run meets them. The kernel calls each hook through pluggy **with keyword
arguments only**; an implementation may accept any subset of the arguments, so a spec can gain arguments
without breaking old plugins. "First result" hooks stop at the first implementation that returns something
other than None; the others collect every non-None result.

Where it may run: *in-process* hooks receive live Python objects (the model, the optimizer) and always run
in the kernel. *Remote-capable* hooks take and return only `contracts.types` records, tensors and plain
data, so the same implementation may run in an isolated plugin host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from swiftk.contracts.markers import hookspec
from swiftk.contracts.types import Batch, LossResult, ModelOutputs, StepState

# --------------------------------------------------------------------------------------------- run


@hookspec
def swiftk_run_start(config: Mapping[str, Any], state: StepState) -> None:
    """The run is assembled (model, data, optimizer built; resume applied) and the first step is next.

    Called once per process. In-process. ``config`` is the resolved configuration as plain data.
    """


@hookspec
def swiftk_run_end(state: StepState, status: str) -> None:
    """The run is over. ``status`` is "completed", "interrupted" or "failed". Called once per process,
    after the final checkpoint. In-process. Must not raise: an error here is logged, not propagated."""


# --------------------------------------------------------------------------------------------- loss


@hookspec(firstresult=True)
def swiftk_loss_compute(batch: Batch, outputs: ModelOutputs, step: int, state: StepState) -> LossResult | None:
    """Turn one micro-batch's model outputs into the scalar that is back-propagated.

    Called by the kernel once per micro-batch, after forward, before backward. Remote-capable: in a plugin
    host, the host returns the loss and its gradient w.r.t. the tensors it was given.
    First non-None result wins; return None to defer to the next plugin.
    :returns: a 0-dim loss that requires grad, normalised by ``batch.num_items_in_batch`` (token-level
        losses) or by the step's example count (sequence-level losses), and float metrics for logging.
    """


# --------------------------------------------------------------------------------------------- optimisation


@hookspec(firstresult=True)
def swiftk_optimizer_build(
    param_groups: list[dict[str, Any]], lr: float, model: torch.nn.Module
) -> torch.optim.Optimizer | None:
    """Build the optimizer for the trainable parameters.

    Called once per process before the first step (and before a resume loads the optimizer state). In-process.
    ``param_groups`` already split weight-decayed from non-decayed tensors (each group carries its own
    ``weight_decay``); ``lr`` is the peak learning rate from ``[train] lr``.
    First non-None result wins.
    """


@hookspec(firstresult=True)
def swiftk_scheduler_build(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Build the learning-rate schedule; the kernel calls ``scheduler.step()`` after every optimizer step.

    Called once per process, right after ``swiftk_optimizer_build``. In-process. First non-None result wins.
    """


# --------------------------------------------------------------------------------------------- step


@hookspec
def swiftk_step_end(state: StepState, metrics: Mapping[str, float]) -> dict[str, float] | None:
    """An optimizer step finished; ``metrics`` holds what the kernel logged for it (loss, lr, grad_norm...).

    Called once per optimizer step on every rank; for metrics and callbacks. Remote-capable.
    :returns: extra float metrics merged into this step's ``metrics.jsonl`` record, or None.
        A callback may return ``{"stop_training": 1.0}`` to end the run after this step (early stopping).
    """


# --------------------------------------------------------------------------------------------- checkpoints


@hookspec
def swiftk_checkpoint_save(state: StepState, path: str) -> None:
    """A checkpoint is being written; ``path`` is a folder inside it (not yet renamed into place) where
    plugins may write files of their own.

    Called on every rank at each save, before the checkpoint is committed. In-process. Plugins whose state
    fits a ``state_dict()``/``load_state_dict()`` pair need not implement this: the kernel stores those by
    plugin name and restores them on resume.
    """


@hookspec
def swiftk_checkpoint_load(state: StepState, path: str) -> None:
    """A run resumes from a checkpoint; ``path`` is the folder ``swiftk_checkpoint_save`` was given.

    Called once per process after the model, optimizer, scheduler and data position are restored. In-process.
    """


def hook_names() -> list[str]:
    """Names of every hook declared above."""
    return sorted(name for name in globals() if name.startswith("swiftk_"))
