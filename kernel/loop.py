"""The step loop: one optimizer step after another, reading top to bottom.

    batches -> forward (autocast) -> hook swiftk_loss_compute -> backward   (x grad_accum micro-batches)
            -> clip -> optimizer step -> scheduler step -> hook swiftk_step_end -> metrics.jsonl / progress
            -> eval and checkpoint at their intervals

The micro-batches' forward, loss and backward run in the parallel engine's order (``ParallelEngine.learn`` over a
``StepWork``): one after another, or interleaved across the ranks of a pipeline (kernel/parallel/pp.py).
With ``[train] optimizer_in_backward`` the optimizer updates each parameter inside backward (kernel/in_backward.py)
and the clip and step between backward and the scheduler are skipped.

Everything user-defined is reached through the plugin manager's hooks, called with keywords only.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from swiftk.contracts import Batch, Generator, LossResult, ModelOutputs, PluginError, StepState, checks
from swiftk.contracts.engines import ParallelEngine
from swiftk.contracts.rewards import PauseRun
from swiftk.contracts.stages import LEARN, Stage
from swiftk.kernel import checkpoint
from swiftk.kernel.compiled import CompiledBlocks
from swiftk.kernel.config import RunConfig
from swiftk.kernel.data import Loader
from swiftk.kernel.dist import DistInfo, agreed, any_rank, mean_across_ranks, sum_across_ranks
from swiftk.kernel.errors import SwiftkError
from swiftk.kernel.generation import configured_generator, push_weights
from swiftk.kernel.heads import ChunkedHead
from swiftk.kernel.in_backward import InBackward
from swiftk.kernel.model import forward_logits
from swiftk.kernel.parallel.none import OneProcess
from swiftk.kernel.plugins import Plugins
from swiftk.kernel.progress import Reporter
from swiftk.kernel.reference import ReferenceModel
from swiftk.kernel.reload import Reloader
from swiftk.kernel.rewards import PendingScores, RewardScorer


class TrainingError(SwiftkError):
    """Training cannot go on (the loss became NaN, a plugin broke its contract)."""


@dataclass
class Run:
    """Everything the loop needs, assembled by ``kernel.run``; the counters are what a checkpoint restores."""

    cfg: RunConfig
    run_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    plugins: Plugins
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Loader
    device: torch.device
    dist: DistInfo
    reporter: Reporter
    total_steps: int
    autocast: Callable[[], AbstractContextManager[Any]]
    stage: Stage  # what one step does: its phases, forward and evaluation
    eval_samples: Sequence[Any] = field(default_factory=list)  # the stage's held-out examples
    meta: dict[str, Any] = field(default_factory=dict)  # recorded in every checkpoint
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    last_saved_step: int | None = None  # the step the newest checkpoint of this process holds
    reloader: Reloader | None = None  # hot reload of plugin files (--watch)
    reference: ReferenceModel | None = None  # the frozen reference model, for a stage that needs one (dpo)
    parallel: ParallelEngine = field(default_factory=OneProcess)  # one process, DDP, FSDP2, DeepSpeed...
    _generator: Generator | None = None  # [generation], built on first use (ctx.generator())
    _scorer: RewardScorer | None = None  # the reward plugins, called on first use (ctx.score())
    logged: dict[str, float] = field(default_factory=dict)  # the stage's metrics for this step (ctx.log())
    stage_parameters: frozenset[str] = frozenset()  # added by Stage.adapt (a value head): never sent to a generator
    eval_tasks: list[Any] = field(default_factory=list)  # [eval] tasks, resolved (kernel.evals.runner.Resolved)
    processor: Any = None  # a vision-language model's processor (saved with the model)
    in_backward: InBackward | None = None  # [train] optimizer_in_backward: the optimizer steps inside backward
    head: ChunkedHead | None = None  # forward passes to the hidden states ([train] chunked_loss), None: logits
    compiled: CompiledBlocks | None = None  # [train] compile: the blocks running compiled code

    def state(self) -> StepState:
        return StepState(
            step=self.step, max_steps=self.total_steps, epoch=self.loader.epoch,
            lr=self.scheduler.get_last_lr()[0], tokens_seen=self.tokens_seen, elapsed_s=self.elapsed_s,
            run_dir=str(self.run_dir), rank=self.dist.rank, world_size=self.dist.world_size,
        )

    @property
    def model_config(self) -> Any:
        return self.cfg.model

    @property
    def loss_name(self) -> str:
        """The loss plugin the stage trains with (dpo's, not its loss_type variant)."""
        return self.stage.loss().name

    # --- what a stage reaches the run through (contracts.stages.StepContext)

    def forward_logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return forward_logits(model, batch)

    def forward_outputs(self, model: torch.nn.Module, batch: Batch) -> ModelOutputs:
        if self.head is not None and (why := self.head.check_once(self.unwrapped(), batch)):
            self.head = None
            self.say(f"chunked loss off: {why}; the losses read full logits")
        if self.head is None:
            return ModelOutputs(forward_logits(model, batch))
        return self.head.outputs(model, batch)

    def unwrapped(self) -> torch.nn.Module:
        return self.parallel.unwrap(self.model)

    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = configured_generator(
                self.cfg.generation, self.unwrapped(), self.tokenizer, model_cfg=self.cfg.model,
                system_prompt=self.cfg.data.system_prompt, autocast=self.autocast, report=self.say)
        if self._generator.version != self.step:
            push_weights(self._generator, self.unwrapped(), self.step, skip=self.stage_parameters)
        return self._generator

    def close_generator(self) -> None:
        if self._generator is not None:
            self._generator.close()
            self._generator = None
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    def score(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]
              ) -> PendingScores:
        if self._scorer is None:
            self._scorer = RewardScorer(self.plugins, self.reporter.event)
        return self._scorer.submit(prompts, completions, references, self.state())

    def call(self, hook: str, **kwargs: Any) -> Any:
        return self.plugins.call(hook, **kwargs)

    def log(self, metrics: dict[str, float]) -> None:
        self.logged.update(metrics)

    def data_sum(self, value: float) -> float:
        return sum_across_ranks(value) / self.parallel.replicas

    def say(self, message: str) -> None:
        self.reporter.say(message)


def train(run: Run) -> str:
    """Train until ``run.total_steps``; returns "completed", "interrupted" (SIGINT/SIGTERM) or "paused" (a
    stage's ``PauseRun``)."""
    cfg = run.cfg
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    call = run.plugins.call
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(run.loader)
    stop = StopSignal()
    interrupted = False  # agreed by every rank, like every decision to stop
    model.train()
    call("swiftk_run_start", config=cfg.model_dump(), state=run.state())
    if (run.eval_samples or run.eval_tasks) and cfg.eval.on_start and run.step == 0:
        evaluate(run)  # the baseline: a step-0 eval record
    try:
        while run.step < run.total_steps and not interrupted:
            if run.reloader is not None:  # edited plugin code is swapped in here, between steps
                run.reloader.apply(run.step, run.reporter.event, run.reporter.say)
            started = time.perf_counter()
            micro = next_window(batches, run.stage.draw(run.step, cfg.train.grad_accum))
            learn_at = run.stage.phases.index(LEARN)
            try:
                for phase in run.stage.phases[:learn_at]:  # e.g. rollout, score: they make what is learnt from
                    micro = run.stage.run_phase(phase, run, [b.to(run.device) for b in micro])
            except PauseRun as exc:  # something the user must fix (rewards that keep failing): stop, resumable
                save_checkpoint(run)
                run.reporter.event("run_paused", step=run.step, reason=str(exc))
                run.reporter.say(f"run paused at step {run.step}: {exc}\nA checkpoint of step {run.step} is "
                                 f"saved; fix the cause and continue with `swiftk run CONFIG --resume`.")
                return "paused"
            if run.in_backward is not None and len(micro) != 1:
                raise TrainingError(f"stage '{cfg.train.stage}' learns from {len(micro)} micro-batches per step, "
                                    f"but [train] optimizer_in_backward updates the weights in the first backward; "
                                    f"leave optimizer_in_backward off for this stage")
            # The loss is normalised over the whole step, on every rank: its label tokens (or pairs, for a stage).
            work = StepWork(run, model, [b.to(run.device) for b in micro],
                            int(run.data_sum(sum(b.num_items for b in micro))))
            run.parallel.learn(work)  # forward, loss and backward of each micro-batch, in the engine's order
            step_loss, plugin_metrics = work.total, work.metrics

            # Each micro-batch loss is already divided by the step's global token count: the sum is the mean.
            loss_value = run.data_sum(float(step_loss))
            lr = scheduler.get_last_lr()[0]
            if run.in_backward is not None:  # already applied, parameter by parameter
                grad_norm = run.in_backward.finish()
                if run.in_backward.not_finite:
                    raise not_applied(run, f"the gradient of {len(run.in_backward.not_finite)} parameter(s) "
                                           f"became non-finite (loss {loss_value:.4g})",
                                      updated=run.in_backward.updated)
            else:
                grad_norm = run.parallel.clip_grad_norm(params, cfg.train.max_grad_norm or None)  # None: DeepSpeed
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm or 0.0)):  # before the update
                    raise not_applied(run, f"the loss became {loss_value}" if not math.isfinite(loss_value) else
                                      f"the gradient norm became {grad_norm} (loss {loss_value:.4g})")
                grad_norm = run.parallel.step(optimizer, grad_norm)  # DeepSpeed returns the norm it clipped with
            if not math.isfinite(grad_norm):  # an engine that measures inside its step skips a non-finite one
                raise TrainingError(
                    f"the gradient norm became {grad_norm} (loss {loss_value:.4g}) at step {run.step + 1} (loss "
                    f"'{run.loss_name}'); the engine skipped the update. Lower [train] lr, or check the data "
                    f"and the loss; the last checkpoint is "
                    f"{checkpoint.latest_checkpoint(run.run_dir) or 'none (save_every is not set)'}.")
            scheduler.step()
            run.parallel.zero_grad(optimizer)

            run.step += 1
            if run.compiled is not None:
                run.compiled.report()  # after the first compiled step: the graph breaks, once
            for phase in run.stage.phases[learn_at + 1:]:  # after the update (e.g. push weights to a generator)
                run.stage.run_phase(phase, run, micro)
            step_time = time.perf_counter() - started
            tokens = int(run.data_sum(sum(b.num_tokens for b in micro)))
            plugin_metrics = mean_across_ranks({**run.logged, **plugin_metrics})
            run.logged = {}
            run.tokens_seen += tokens
            run.elapsed_s += step_time
            record: dict[str, Any] = {
                "step": run.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / step_time, "tokens": tokens, "epoch": run.loader.epoch,
                "elapsed_s": round(run.elapsed_s, 3), **plugin_metrics,
            }
            last = run.step == run.total_steps
            if (run.eval_samples or run.eval_tasks) and cfg.eval.every and (run.step % cfg.eval.every == 0 or last):
                record.update(evaluate(run))  # callbacks (early stopping) see this step's eval metrics
            for extra in call("swiftk_step_end", state=run.state(), metrics=dict(record)):
                record.update(extra)
            call("swiftk_metrics_logged", state=run.state(), record=dict(record))
            run.reporter.step(record)
            if cfg.output.save_every and run.step % cfg.output.save_every == 0:
                save_checkpoint(run)
            interrupted, early_stop = any_rank(stop.requested, bool(record.get("stop_training")))
            if early_stop:
                run.reporter.event("stop_requested", step=run.step, by="swiftk_step_end")
                break
    finally:
        stop.restore()
    status = "interrupted" if interrupted else "completed"
    if status == "interrupted" or cfg.output.save_final:
        save_checkpoint(run)
    return status


class StepWork:
    """One step's micro-batches as the engine's ``learn`` runs them (contracts.engines.StepWork): the stage's
    forward, the loss hook checked and counted, the backward (armed for optimizer_in_backward)."""

    def __init__(self, run: Run, model: torch.nn.Module, micro: list[Batch], num_items: int) -> None:
        self.run, self.model, self.micro, self.step = run, model, micro, run.step
        for batch in micro:
            batch.num_items_in_batch = num_items
        self.total = torch.zeros((), device=run.device)
        self.metrics: dict[str, float] = {}

    def begin(self, batch: Batch) -> None:
        self.run.plugins.call("swiftk_batch_start", batch=batch, step=self.step, state=self.run.state())

    def forward(self, batch: Batch) -> ModelOutputs:
        self.begin(batch)
        return self.run.stage.forward(self.run, self.model, batch)  # logits [B, T, V], and what else the loss needs

    def loss(self, batch: Batch, outputs: ModelOutputs) -> torch.Tensor:
        run = self.run
        result = run.plugins.call("swiftk_loss_compute", batch=batch, outputs=outputs, step=run.step,
                                  state=run.state())
        loss = checked_loss(result, run)
        if run.reloader is not None:  # what a reloaded loss is probed on
            run.reloader.remember(batch, outputs, run.state())
        self.total += loss.detach()
        for key, value in result.metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value / len(self.micro)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        run = self.run
        if run.in_backward is not None:  # the weights change during backward: a NaN loss must not reach it
            if not math.isfinite(now := float(loss.detach())):
                raise not_applied(run, f"the loss became {now}")
            run.in_backward.arm()
        run.parallel.backward(loss)


def not_applied(run: Run, what: str, updated: int = 0) -> TrainingError:
    """The error that stops a step whose update was not (or, inside backward, only partly) applied."""
    applied = "the step was not applied" if not updated else \
        f"optimizer_in_backward had already updated {updated} other parameter(s) in this backward"
    return TrainingError(
        f"{what} at step {run.step + 1} (loss '{run.loss_name}'); {applied}. Lower [train] lr, keep max_grad_norm "
        f"set, or check the data and the loss; the last checkpoint is "
        f"{checkpoint.latest_checkpoint(run.run_dir) or 'none (save_every is not set)'}.")


def next_window(batches: Iterator[Batch], grad_accum: int) -> list[Batch]:
    return [next(batches) for _ in range(grad_accum)]


def checked_loss(result: LossResult | None, run: Run) -> torch.Tensor:
    """The contract of swiftk_loss_compute, enforced with a message naming the loss plugin."""
    if result is None:
        raise PluginError(f"loss:{run.loss_name}", "swiftk_loss_compute",
                          "returned None and no other plugin computed a loss")
    try:  # finiteness: train() checks the step's summed loss (no device sync per micro-batch)
        return checks.checked_loss(result, finite=False).loss
    except checks.ContractViolation as exc:
        raise PluginError(f"loss:{run.loss_name}", "swiftk_loss_compute", str(exc)) from None


def evaluate(run: Run) -> dict[str, float]:
    # every rank evaluates: sharded forwards are collectives
    metrics = run.stage.evaluate(run, run.eval_samples) if run.eval_samples else {}
    if run.eval_tasks:
        metrics.update(benchmark(run))
    run.reporter.event("eval", step=run.step, **metrics)
    run.reporter.say(f"eval @ step {run.step}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def benchmark(run: Run) -> dict[str, float]:
    """The [eval] tasks on the live model, answered by the run's generator; the main process writes the report
    (RUN/eval/results.json, the latest step's) and the figures become ``eval_<task>_<metric>``."""
    from swiftk.kernel.evals import runner
    from swiftk.kernel.evals.results import write_report

    model = run.unwrapped()
    was_training = model.training
    try:
        results, samples = runner.evaluate_live(model, run.tokenizer, run.generator(), run.eval_tasks,
                                                system_prompt=run.cfg.data.system_prompt, limit=run.cfg.eval.task_limit,
                                                batch_size=run.cfg.eval.batch_size)
    finally:
        model.train(was_training)
    if run.dist.is_main:
        report = runner.report(str(run.run_dir), None, run.run_dir, run.cfg.generation.engine, results,
                               run.cfg.eval.task_limit, step=run.step)
        write_report(report, run.run_dir / "eval", samples)
    return {f"eval_{r.task}_{r.metric}": r.value for r in results}


def save_checkpoint(run: Run) -> Path | None:
    """Write a checkpoint of the current step. Every rank hands in its part (sharded weights and optimizer state
    are gathered, each rank writes its RNG state and DeepSpeed partitions); the main process writes the rest."""
    if run.last_saved_step == run.step:
        return None  # this step is already saved (e.g. save_every divides the final step)
    weights = run.parallel.full_weights(run.model)
    optimizer_state = run.parallel.optimizer_state(run.model, run.optimizer)
    shards = checkpoint.rank_folder(run.run_dir, run.step) if run.dist.world_size > 1 else None
    path = None
    with agreed("saving a checkpoint", run.step):
        if shards is not None:
            run.parallel.save_shards(shards)
    with agreed("saving a checkpoint", run.step):
        if run.dist.is_main:
            path = write_checkpoint(run, weights, optimizer_state, shards)
    run.last_saved_step = run.step
    return path


def write_checkpoint(run: Run, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                     shards: Path | None) -> Path:
    plugin_states = {}
    for name, plugin in run.plugins.by_name.items():
        if hasattr(plugin, "state_dict"):
            try:
                plugin_states[name] = plugin.state_dict()
            except Exception as exc:
                raise PluginError(name, "state_dict", f"failed while checkpointing step {run.step}: {exc!r}; "
                                  f"no checkpoint was written for this step, earlier ones are intact") from exc
    trainer_state = {
        "optimizer": optimizer_state,
        "scheduler": run.scheduler.state_dict(),
        "loader": run.loader.state_dict(),
        "rng": checkpoint.rng_state(),
        "plugins": plugin_states,
        "counters": {"step": run.step, "tokens_seen": run.tokens_seen, "elapsed_s": run.elapsed_s},
    }
    meta = {**run.meta, "plugin_code": run.plugins.code_hashes, "total_steps": run.total_steps}
    path = checkpoint.save(
        run.run_dir, run.step, weights, trainer_state, meta, run.cfg.output.keep_last,
        write_extra=lambda folder: run.plugins.call("swiftk_checkpoint_save", state=run.state(), path=str(folder)),
        rank_files=shards,
    )
    run.reporter.event("checkpoint_saved", step=run.step, path=str(path))
    return path


class StopSignal:
    """SIGINT/SIGTERM end the run at the next step boundary, with a checkpoint; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled on the main thread (e.g. a run started by a test harness)
        self.previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in self.previous:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(Ctrl-C again to abort now)", flush=True)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
