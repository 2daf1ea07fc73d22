"""Hook specifications: every point where the kernel hands control to plugins.

Grouped by phase, in the order a run meets them. The kernel calls each hook through pluggy **with keyword
arguments only**; an implementation may accept any subset of the arguments, so a spec can gain arguments
without breaking old plugins. "First result" hooks stop at the first implementation that returns something
other than None; the others collect every non-None result.

Where it may run: a spec marked ``@remote`` takes and returns only `contracts.types` records, tensors and
plain data, so the same implementation may run in an isolated plugin host; ``@remote(differentiable=True)``
says its result is a loss, which a host returns with its gradient w.r.t. the tensors it was given. Plugin
hosts forward exactly the marked hooks (``remote_hooks()``). An unmarked spec receives live kernel objects
(the model, the optimizer) and runs in the kernel only. Each docstring says the same in words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from swiftk.contracts.markers import HookTraits, hookspec, remote, traits_of
from swiftk.contracts.types import Batch, LossResult, ModelOutputs, StepState

# --------------------------------------------------------------------------------------------- run


@hookspec
@remote()
def swiftk_run_start(config: Mapping[str, Any], state: StepState) -> None:
    """The run is assembled (model, data, optimizer built; resume applied) and the first step is next.

    Called once per process. May run in a plugin host. ``config`` is the resolved configuration as plain data.
    """


@hookspec
@remote()
def swiftk_run_end(state: StepState, status: str) -> None:
    """The run is over. ``status`` is "completed", "interrupted" or "failed".

    Called once per process, after the final checkpoint, also when the run failed. May run in a plugin host.
    """


# --------------------------------------------------------------------------------------------- model


@hookspec
def swiftk_model_loaded(model: torch.nn.Module, tokenizer: Any, config: Mapping[str, Any]) -> torch.nn.Module | None:
    """The base model is loaded, before the tuner (LoRA...) is applied: patch it in place, or return a
    replacement module (e.g. a wrapper).

    Called once per process. In-process only (it receives the model). Return None to leave the model as it
    is; if several plugins return a replacement, the run stops (the order would be ambiguous).
    """


# --------------------------------------------------------------------------------------------- data


@hookspec(firstresult=True)
@remote()
def swiftk_data_row(row: Mapping[str, Any], split: str) -> dict[str, Any] | None:
    """One raw dataset row, before it is rendered and tokenized; return a replacement row.

    Called by the kernel for every row of the train ("train") and eval ("eval") files, once, at start-up.
    May run in a plugin host. First non-None result wins; return None to keep the row as it is.
    """


@hookspec(firstresult=True)
@remote()
def swiftk_data_collate(samples: list[dict[str, list[int]]], pad_id: int) -> Batch | None:
    """Build one micro-batch from tokenized samples (each has "input_ids" and "labels", and "position_ids"
    when packed), replacing the kernel's right-padding collator.

    Called for every micro-batch, training and eval. May run in a plugin host. First non-None result wins.
    The kernel fills ``Batch.num_items_in_batch`` afterwards.
    """


# --------------------------------------------------------------------------------------------- step


@hookspec
@remote()
def swiftk_batch_start(batch: Batch, step: int, state: StepState) -> None:
    """A micro-batch is about to go through forward; a plugin may add tensors to ``batch.extras``.

    Called once per training micro-batch, after ``num_items_in_batch`` is set. May run in a plugin host, which
    reads a copy: only an in-process plugin can add to ``batch.extras``.
    """


@hookspec(firstresult=True)
@remote(differentiable=True)
def swiftk_loss_compute(batch: Batch, outputs: ModelOutputs, step: int, state: StepState) -> LossResult | None:
    """Turn one micro-batch's model outputs into the scalar that is back-propagated.

    Called by the kernel once per micro-batch, after forward, before backward. May run in a plugin host:
    then the host returns the loss and its gradient w.r.t. the tensors it was given.
    First non-None result wins; return None to defer to the next plugin.
    :returns: a 0-dim loss that requires grad, normalised by ``batch.num_items_in_batch`` (token-level
        losses) or by the step's example count (sequence-level losses), and float metrics for logging.
    """


@hookspec
@remote()
def swiftk_step_end(state: StepState, metrics: Mapping[str, float]) -> dict[str, float] | None:
    """An optimizer step finished; ``metrics`` holds what the kernel logged for it (loss, lr, grad_norm...).

    Called once per optimizer step on every rank; for metrics and callbacks. May run in a plugin host.
    :returns: extra float metrics merged into this step's ``metrics.jsonl`` record, or None.
        A callback may return ``{"stop_training": 1.0}`` to end the run after this step (early stopping).
    """


@hookspec
@remote()
def swiftk_metrics_logged(state: StepState, record: Mapping[str, Any]) -> None:
    """The step's final record, as written to ``metrics.jsonl`` (kernel metrics, eval metrics when this step
    evaluated, and every ``swiftk_step_end`` result merged): for loggers such as TensorBoard or W&B.

    Called once per optimizer step on every rank, after ``swiftk_step_end``. May run in a plugin host.
    """


# --------------------------------------------------------------------------------------------- optimisation


@hookspec(firstresult=True)
def swiftk_optimizer_build(
    param_groups: list[dict[str, Any]], lr: float, model: torch.nn.Module
) -> torch.optim.Optimizer | None:
    """Build the optimizer for the trainable parameters.

    Called once per process before the first step (and before a resume loads the optimizer state). In-process
    only (it receives the model).
    ``param_groups`` already split weight-decayed from non-decayed tensors (each group carries its own
    ``weight_decay``) and name their tensors in ``"names"``; ``lr`` is the peak learning rate from
    ``[train] lr``. First non-None result wins.
    """


@hookspec(firstresult=True)
def swiftk_scheduler_build(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Build the learning-rate schedule; the kernel calls ``scheduler.step()`` after every optimizer step.

    Called once per process, right after ``swiftk_optimizer_build``. In-process only (it receives the
    optimizer). First non-None result wins.
    """


# --------------------------------------------------------------------------------------------- eval


@hookspec
@remote()
def swiftk_eval_start(state: StepState) -> None:
    """An evaluation pass begins: metric plugins reset their accumulators.

    Called by the kernel at every ``[eval] every`` steps and at the end, before the first eval batch.
    May run in a plugin host.
    """


@hookspec
@remote()
def swiftk_eval_batch(batch: Batch, outputs: ModelOutputs, state: StepState) -> None:
    """One eval micro-batch went through forward (no grad): accumulate what the metric needs.

    Called once per eval micro-batch. May run in a plugin host.
    """


@hookspec
@remote()
def swiftk_eval_predictions(
    prompts: list[str], predictions: list[str], references: list[str], state: StepState
) -> None:
    """Greedy generations for the eval prompts, with the reference answers: accumulate text metrics.

    Called once per eval pass when ``[eval] generate = true``, after the batches. May run in a plugin host.
    """


@hookspec
@remote()
def swiftk_eval_end(state: StepState) -> dict[str, float] | None:
    """The eval pass is over: return this plugin's metrics (keys conventionally start with ``eval_``).

    Called once per eval pass. May run in a plugin host. All results are merged into the pass's ``eval``
    record.
    """


# --------------------------------------------------------------------------------------------- checkpoints


@hookspec
@remote()
def swiftk_checkpoint_save(state: StepState, path: str) -> None:
    """A checkpoint is being written; ``path`` is a folder inside it (not yet renamed into place) where
    plugins may write files of their own.

    Called by the main process at each save, before the checkpoint is committed. May run in a plugin host
    (a sandboxed one writes only where its sandbox lets it). Plugins whose
    state fits a ``state_dict()``/``load_state_dict()`` pair need not implement this: the kernel stores those
    by plugin name and restores them on resume.
    """


@hookspec
@remote()
def swiftk_checkpoint_load(state: StepState, path: str) -> None:
    """A run resumes from a checkpoint; ``path`` is the folder ``swiftk_checkpoint_save`` was given.

    Called once per process after the model, optimizer, scheduler and data position are restored. May run
    in a plugin host.
    """


# --------------------------------------------------------------------------------------------- rewards


@hookspec
@remote()
def swiftk_reward_compute(
    prompts: list[str], completions: list[str], references: list[str | None], state: StepState
) -> dict[str, list[float]] | None:
    """Score generated completions for the online stages (GRPO, PPO): one float per completion.

    Called through ``StepContext.score`` once per rollout micro-batch, on every rank, on a background thread (the
    next micro-batch generates meanwhile); each implementation is called on its own, and what it did is typed
    (``contracts.rewards``: ok, invalid, timeout, crashed), so one that fails costs only its own values. May run in
    a plugin host, where the supervisor enforces ``deadline_s``: the main use of sandboxed hosts, since
    code-execution rewards run untrusted model output. ``prompts[i]`` is completion i's prompt (a chat's last user
    message) and ``references[i]`` its row's reference answer or tests (None if the row has none).
    :returns: ``{reward_name: [r_0, ..., r_{n-1}]}`` aligned with ``completions`` (None or NaN for a completion
        it does not apply to); the stage weights and sums the named rewards. None: this plugin does not score
        this batch.
    """


def hook_names() -> list[str]:
    """Names of every hook declared above."""
    return sorted(name for name in globals() if name.startswith("swiftk_"))


def remote_hooks() -> dict[str, HookTraits]:
    """The hooks marked ``@remote``, with their traits: what a plugin host may serve and its proxy forwards."""
    return {name: traits for name in hook_names() if (traits := traits_of(globals()[name])).remote}
