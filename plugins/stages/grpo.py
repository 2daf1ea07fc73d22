"""Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", section 4): sample a group of
completions per prompt, score them, and learn from each one's reward relative to its group's.

One optimizer step, top to bottom:

    rollout   the step's prompts, micro-batch by micro-batch, through ``ctx.generator()`` (hf in-process or
              vllm in its own process; it serves this step's weights): ``num_generations`` completions each.
              Each micro-batch is sent to the rewards as soon as it is generated (``ctx.score``), so scoring
              runs while the next one generates.
    score     wait for the rewards: r = the weighted sum of the reward columns (a NaN column does not zero a
              completion; a completion with no reward at all is masked out). Advantages A = r - mean(group),
              divided by the group's std + 1e-4 (``scale_rewards = "group"``), the batch's, or nothing.
              Per-token log-probs of the sampling weights (when the rollouts are learnt from later:
              ``steps_per_generation`` > 1), of the reference (``beta`` > 0), and the truncated importance weight
              min(pi_trainer / pi_engine, cap) when the engine computes its own log-probs (vllm).
    learn     the kernel's forward, the ``grpo`` loss (plugins/losses/grpo.py), backward and optimizer step.

Rewards are plugins (``[train] rewards``, or any ``[[plugins]]`` implementing ``swiftk_reward_compute``, also in a
sandboxed host); one that fails costs only its own column, and when more than ``reward_failure_threshold`` of
the (completion, reward) values fail over the last ``reward_failure_window`` rollouts, the run pauses with a
checkpoint (exit 3; ``--resume`` continues). Held out: greedy answers to the eval prompts, scored by the same
rewards (``eval_reward``, ``eval_rewards/<name>``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import torch
from pydantic import Field

from swiftk.contracts import LEARN, Batch, ModelOutputs, SamplingParams
from swiftk.contracts.rewards import PauseRun, Scores
from swiftk.contracts.stages import (
    DataContext,
    LossChoice,
    RewardChoice,
    Stage,
    StageConfig,
    StepContext,
    register_stage,
)
from swiftk.kernel.dist import any_rank
from swiftk.kernel.errors import ConfigError
from swiftk.plugins.stages.online import (
    Prompts,
    Rollout,
    chunks,
    engine_logps,
    generate,
    load_prompts,
    sequences,
    token_logps,
)


class RewardsConfig(StageConfig):
    """The reward keys the online stages share."""

    rewards: list[str] = Field(["accuracy"], description="registered reward plugins to score with (accuracy, "
                               "format, length, code, or your own); [[plugins]] implementing swiftk_reward_compute "
                               "score as well")
    reward_weights: dict[str, float] = Field(default_factory=dict, description="weight per reward name (default 1)")
    reward_config: dict[str, dict[str, Any]] = Field(default_factory=dict, description="arguments per reward "
                                                     "plugin, e.g. { code = { timeout_s = 5 } }")
    reward_failure_threshold: float = Field(0.5, gt=0, le=1, description="pause the run when more than this share "
                                            "of reward values failed (timeout, crash, garbage) ...")
    reward_failure_window: int = Field(3, ge=1, description="... over this many rollouts")


class GRPOConfig(RewardsConfig):
    """[train] keys of the grpo stage (``batch_size`` counts prompts: each brings ``num_generations``)."""

    num_generations: int = Field(8, ge=2, description="completions sampled per prompt (the group)")
    max_completion_length: int = Field(64, ge=1, description="tokens per completion at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (also divides the logits in the loss)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int = Field(0, ge=0, description="top-k sampling (0: off)")
    beta: float = Field(0.04, ge=0, description="weight of the k3 KL to the reference (0: no reference model)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="ratio clip below: [1 - epsilon, ...]")
    epsilon_high: float | None = Field(None, gt=0, description="ratio clip above (default epsilon; DAPO: 0.28)")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="how token losses are averaged: per sequence then batch (grpo), over tokens (bnpo, dapo), "
        "over batch x max_completion_length (dr_grpo)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="divide advantages by the group's "
                                                             "reward std, the batch's, or nothing (Dr. GRPO)")
    steps_per_generation: int = Field(1, ge=1, description="optimizer steps learnt from one generation round")
    importance_sampling_cap: float = Field(3.0, ge=0, description="cap of the truncated importance weight "
                                           "pi_trainer/pi_engine for engines with their own log-probs (0: off)")
    mask_truncated_completions: bool = Field(False, description="leave completions cut at max_completion_length "
                                             "out of the loss (DAPO's overlong filtering)")
    generate_ahead: bool = Field(False, description="generate the next step's rollouts while this step learns: one "
                                 "step stale, the importance weight corrects for it; needs an engine in its own "
                                 "process ([generation] engine = 'vllm')")


class OnlineStage(Stage):
    """Prompt data, rewards and their failure accounting: what GRPO and PPO share."""

    task_types = ("prompt",)
    unit = "prompts"

    def __init__(self, train: Any) -> None:
        super().__init__(train)
        self.prompts: dict[str, Prompts] = {}
        self.failure_rates: deque[float] = deque(maxlen=train.reward_failure_window)

    def rewards(self) -> list[RewardChoice]:
        return [RewardChoice(name, dict(self.train.reward_config.get(name, {})), "[train] rewards",
                             f"[train] reward_config.{name}") for name in self.train.rewards]

    def problems(self, config: Any) -> list[str]:
        unknown = sorted(set(self.train.reward_config) - set(self.train.rewards))
        return [f"[train] reward_config.{name}: '{name}' is not in [train] rewards {self.train.rewards}"
                for name in unknown]

    def load(self, path: str, split: str, ctx: DataContext) -> Sequence[Any]:
        room = ctx.data.max_length - self.train.max_completion_length
        if room < 1:
            raise ConfigError(f"[data] max_length = {ctx.data.max_length} leaves no room for a prompt before "
                              f"[train] max_completion_length = {self.train.max_completion_length} tokens")
        examples = load_prompts(path, ctx.tokenizer, ctx.data, ctx.transform(split), room)
        self.prompts[split] = Prompts(examples, ctx.tokenizer.pad_token_id)
        if split == "eval" and ctx.eval.max_batches:  # evaluate on the first max_batches x batch_size prompts
            examples = examples[: ctx.eval.max_batches * ctx.eval.batch_size]
        return examples

    def collate(self, ctx: DataContext) -> Callable[[list[Any]], Batch]:
        return self.prompts["train"].collate

    def forward(self, ctx: StepContext, model: torch.nn.Module, batch: Batch) -> ModelOutputs:
        with ctx.autocast():
            return ctx.forward_outputs(model, batch)  # the reference's log-probs came with the rollout

    def sampling(self, greedy: bool = False, logprobs: bool = False) -> SamplingParams:
        t = self.train
        if greedy:
            return SamplingParams(max_new_tokens=t.max_completion_length, temperature=0.0)
        return SamplingParams(max_new_tokens=t.max_completion_length, temperature=t.temperature, top_p=t.top_p,
                              top_k=t.top_k, n=t.num_generations, logprobs=logprobs)

    def scored(self, ctx: StepContext, rollouts: Sequence[Rollout]) -> Any:
        return ctx.score([r.example.plain for r in rollouts], [r.completion.text for r in rollouts],
                         [r.example.reference for r in rollouts])

    def answer_held_out(self, ctx: StepContext, held_out: Sequence[Any]) -> tuple[list[Rollout], Any]:
        """Greedy answers to the held-out prompts, and their rewards being scored."""
        rollouts = [r for part in chunks(list(held_out), 64)
                    for r in generate(ctx.generator(), part, self.sampling(greedy=True))]
        return rollouts, self.scored(ctx, rollouts)

    @staticmethod
    def held_out_metrics(rollouts: Sequence[Rollout], scores: Scores) -> dict[str, float]:
        """``eval_rewards/<name>`` (each reward's mean) and ``eval_completions/mean_length``."""
        metrics = {f"eval_rewards/{name}": mean for name, mean in scores.means().items()}
        metrics["eval_completions/mean_length"] = sum(len(r.completion.token_ids) for r in rollouts) / len(rollouts)
        return metrics

    def weighted(self, scores: Scores) -> torch.Tensor:
        """``[N]`` float64 rewards, NaN where no reward has a value."""
        if not scores.columns:
            raise ConfigError("no reward plugin scored the completions: name registered rewards in [train] rewards "
                              "(accuracy, format, length, code) or add a [[plugins]] file implementing "
                              "swiftk_reward_compute")
        return torch.tensor(scores.total(self.train.reward_weights), dtype=torch.float64)

    def check_failures(self, scores: Scores) -> None:
        """Pause the run when rewards keep failing: the data a failing reward leaves is not worth learning from."""
        self.failure_rates.append(scores.failure_rate)
        rate = sum(self.failure_rates) / len(self.failure_rates)
        (pause,) = any_rank(len(self.failure_rates) == self.failure_rates.maxlen and
                            rate > self.train.reward_failure_threshold)
        if not pause:
            return
        failing = "; ".join(f"{c.plugin} ({c.name}): {c.outcome.value}, {c.failed}/{scores.count} failed"
                            + (f" ({c.error})" if c.error else "") for c in scores.columns if c.failed)
        raise PauseRun(f"{rate:.0%} of reward values failed over the last {len(self.failure_rates)} rollouts "
                       f"([train] reward_failure_threshold = {self.train.reward_failure_threshold}): {failing}. Fix "
                       f"the reward plugin (metrics.jsonl has a reward_failed record per failure), raise its "
                       f"deadline_s, or raise the threshold")


@register_stage("grpo")
class GRPO(OnlineStage):
    """GRPO with the ``grpo`` loss; ``beta`` > 0 brings a frozen reference (the policy without its LoRA
    adapters, or a copy)."""

    config = GRPOConfig
    phases = ("rollout", "score", LEARN)

    def __init__(self, train: Any) -> None:
        super().__init__(train)
        self.needs_reference = train.beta > 0  # type: ignore[misc]
        self.pending: list[tuple[list[Rollout], Any]] = []  # generated, being scored
        self.ready: deque[list[Batch]] = deque()  # learn batches of the coming steps (steps_per_generation)
        self.ahead: Future[list[tuple[list[Rollout], Any]]] | None = None  # the next step's rollouts (generate_ahead)
        self.background = ThreadPoolExecutor(1, thread_name_prefix="swiftk-rollout") if train.generate_ahead else None
        self.shares_weights = True  # whether the engine samples from the live model (then no importance weights)
        self.timing: dict[str, float] = {}

    def loss(self) -> LossChoice:
        t = self.train
        arguments = {"beta": t.beta, "epsilon_low": t.epsilon, "epsilon_high": t.epsilon_high or t.epsilon,
                     "loss_type": t.loss_type, "max_completion_length": t.max_completion_length,
                     "temperature": t.temperature}
        return LossChoice("grpo", {**arguments, **t.loss_config}, "[train] stage", "[train] loss_config")

    def problems(self, config: Any) -> list[str]:
        problems = super().problems(config)
        if getattr(self.train, "generate_ahead", False):
            if config.generation.engine == "hf":
                problems.append("[train] generate_ahead: the 'hf' engine samples from the very weights this step "
                                "updates; use an engine in its own process ([generation] engine = 'vllm')")
            if self.train.steps_per_generation > 1:
                problems.append("[train] generate_ahead: not with steps_per_generation > 1 (both reuse rollouts "
                                "across steps); choose one")
        return problems

    def draw(self, step: int, grad_accum: int) -> int:
        if self.train.generate_ahead:  # the first step (or the first after a resume) also draws the next one's
            return grad_accum * (2 if self.ahead is None else 1)
        return 0 if self.ready else grad_accum * self.train.steps_per_generation

    # --- the phases

    def rollout(self, ctx: StepContext, micro: list[Batch]) -> list[Batch]:
        """Generate for every prompt of the step, sending each micro-batch to the rewards as it is done. With
        ``generate_ahead``, this step's rollouts were generated during the last one, and the next step's start
        now, in the background, from this step's weights."""
        if not micro:
            return micro  # this step learns from an earlier generation round
        started = time.perf_counter()
        if self.train.generate_ahead:
            now, later = (micro[: self.train.grad_accum], micro[self.train.grad_accum :]) if self.ahead is None \
                else ([], micro)
            if self.ahead is not None:
                self.pending = self.ahead.result()  # sampled by the last step's weights
        else:
            now, later = micro, []
        generator = ctx.generator()  # pushes this step's weights: nothing is generating
        self.shares_weights = getattr(generator, "shares_weights", False)
        # the engine's own log-probs, for the importance weight, only from an engine that has weights of its own
        sampling = self.sampling(logprobs=not self.shares_weights and self.train.importance_sampling_cap > 0)
        self.pending += self.generated(ctx, generator, now, sampling)
        self.timing["timing/rollout_s"] = time.perf_counter() - started
        state = ctx.state()
        if later and self.background is not None and state.step + 1 < state.max_steps:
            self.ahead = self.background.submit(self.generated, ctx, generator, later, sampling)
        return micro

    def generated(self, ctx: StepContext, generator: Any, micro: list[Batch], sampling: SamplingParams
                  ) -> list[tuple[list[Rollout], Any]]:
        """Each micro-batch's rollouts, handed to the rewards as soon as they exist."""
        out = []
        for batch in micro:
            rollouts = generate(generator, self.prompts["train"].of(batch), sampling)
            out.append((rollouts, self.scored(ctx, rollouts)))
        return out

    def score(self, ctx: StepContext, micro: list[Batch]) -> list[Batch]:
        """Advantages from the rewards, then the learn batches of this step (and of the next
        ``steps_per_generation`` - 1)."""
        if self.pending:
            started = time.perf_counter()
            parts = [(rollouts, pending.result()) for rollouts, pending in self.pending]
            self.pending = []
            self.timing["timing/score_wait_s"] = time.perf_counter() - started
            rollouts = [r for part, _ in parts for r in part]
            scores = Scores.merge([s for _, s in parts])
            rewards = self.weighted(scores)
            self.check_failures(scores)
            advantages = self.advantages(rewards)
            ctx.log({**self.rollout_metrics(rollouts, rewards, scores), **self.timing,
                     "rollout/staleness": float(ctx.state().step - min(r.version for r in rollouts))})
            started = time.perf_counter()
            self.ready.extend(self.learn_batches(ctx, rollouts, rewards, advantages))
            self.timing = {"timing/logps_s": time.perf_counter() - started}
        return self.ready.popleft()

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """r - group mean, scaled per ``scale_rewards``; 0 where the reward is NaN."""
        grouped = rewards.view(-1, self.train.num_generations)  # [P, G]
        mean = grouped.nanmean(1, keepdim=True)
        advantages = grouped - mean
        if self.train.scale_rewards == "group":
            advantages = advantages / (nanstd(grouped, 1) + 1e-4)
        elif self.train.scale_rewards == "batch":
            advantages = advantages / (nanstd(rewards.view(1, -1), 1) + 1e-4)
        return advantages.reshape(-1).nan_to_num(0.0)

    def learn_batches(self, ctx: StepContext, rollouts: list[Rollout], rewards: torch.Tensor,
                      advantages: torch.Tensor) -> list[list[Batch]]:
        """The rollouts cut into ``steps_per_generation`` steps of ``grad_accum`` micro-batches, each with what
        the loss needs beside the logits."""
        steps, accum = self.train.steps_per_generation, self.train.grad_accum
        per_batch = max(1, math.ceil(len(rollouts) / (steps * accum)))
        pad = ctx.tokenizer.pad_token_id
        model, off_policy = ctx.unwrapped(), steps > 1
        correct = self.train.importance_sampling_cap > 0 and not self.shares_weights
        batches, corrections = [], []
        for start in range(0, len(rollouts), per_batch):
            part, rows = rollouts[start : start + per_batch], slice(start, start + per_batch)
            batch = sequences(part, pad).to(ctx.device)
            dropped = rewards[rows].isnan().tolist()
            if self.train.mask_truncated_completions:
                dropped = [d or r.completion.finish_reason == "length" for d, r in zip(dropped, part, strict=True)]
            batch.labels[torch.tensor(dropped, device=ctx.device)] = -100  # learnt from: nothing
            batch.extras["advantages"] = advantages[rows].float().to(ctx.device)
            if off_policy or correct:
                with ctx.autocast():
                    sampled, raw = token_logps(ctx.forward_outputs, model, batch, (self.train.temperature, 1.0))
                if off_policy:
                    batch.extras["old_logps"] = sampled
                if correct and (engine := engine_logps(part, raw)) is not None:
                    mask = batch.labels[:, 1:] != -100
                    weights = (raw - engine).exp().clamp(max=self.train.importance_sampling_cap) * mask
                    batch.extras["is_weights"] = weights
                    corrections.append(float(weights.sum() / mask.sum().clamp(min=1)))
            if ctx.reference is not None:
                batch.extras["ref_logps"] = ctx.reference.token_logps(batch, self.train.temperature)
            batches.append(batch)
        if corrections:  # how far the engine's log-probs are from the trainer's (1: the same)
            ctx.log({"rollout/is_weight_mean": sum(corrections) / len(corrections)})
        steps_of = [batches[i : i + accum] for i in range(0, len(batches), accum)]
        for step in steps_of:
            sequences_in_step = ctx.data_sum(sum(len(b.input_ids) for b in step))
            for batch in step:
                batch.extras["num_sequences"] = torch.tensor(float(sequences_in_step), device=ctx.device)
        return steps_of

    def rollout_metrics(self, rollouts: list[Rollout], rewards: torch.Tensor, scores: Scores) -> dict[str, float]:
        lengths = [len(r.completion.token_ids) for r in rollouts]
        grouped = rewards.view(-1, self.train.num_generations)
        finite = rewards[~rewards.isnan()]
        metrics = {k: v for k, v in scores.metrics().items() if not math.isnan(v)}
        metrics |= {
            "reward": float(finite.mean()) if len(finite) else 0.0,
            "reward_std": float(finite.std()) if len(finite) > 1 else 0.0,
            "frac_reward_zero_std": float((nanstd(grouped, 1).nan_to_num(0.0) < 1e-8).float().mean()),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/min_length": float(min(lengths)),
            "completions/max_length": float(max(lengths)),
            "completions/clipped_ratio": sum(r.completion.finish_reason == "length" for r in rollouts) / len(rollouts),
        }
        return metrics

    # --- held out

    def evaluate(self, ctx: StepContext, held_out: Sequence[Any]) -> dict[str, float]:
        """Greedy answers to the held-out prompts, scored by the rewards: ``eval_reward`` and each reward's mean."""
        if self.ahead is not None:
            self.ahead.result()  # one request at a time on the engine: let the next step's rollouts finish first
        rollouts, pending = self.answer_held_out(ctx, held_out)
        scores = pending.result()
        rewards = self.weighted(scores)
        finite = rewards[~rewards.isnan()]
        return {"eval_reward": float(finite.mean()) if len(finite) else math.nan,
                **self.held_out_metrics(rollouts, scores)}


def nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased std over ``dim`` ignoring NaN (keepdim), NaN where fewer than two values."""
    count = (~values.isnan()).sum(dim, keepdim=True)
    mean = values.nanmean(dim, keepdim=True)
    squares = ((values - mean) ** 2).nansum(dim, keepdim=True)
    return (squares / (count - 1)).sqrt().where(count > 1, torch.full_like(mean, math.nan))
