"""PPO for RLHF (Ouyang et al. 2022, "Training language models to follow instructions with human feedback"), with the
details of Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031): a frozen reward
model scores each sampled completion, a KL penalty to the frozen reference shapes the per-token reward, and a value
head on the policy estimates the returns for GAE.

One rollout, top to bottom:

    rollout   the step's prompts through ``ctx.generator()``: one completion each at ``temperature``; reward plugins
              (``[train] rewards``, or ``[[plugins]]`` implementing ``swiftk_reward_compute``), if any, score them in
              the background meanwhile.
    score     s = the reward model's score of prompt + completion (its head reads the last non-pad token), plus the
              weighted reward plugins, minus ``missing_eos_penalty`` for a completion that did not end. One no-grad
              forward of the policy gives the old log-probs (logits / temperature) and old values, the reference
              its log-probs; per-token rewards r_t = -kl_coef kl_t (+ s at the last token), GAE advantages and
              returns, the advantages whitened over the rollout.
    learn     ``ppo_epochs`` optimizer steps on the same rollout (``draw`` returns 0 while they last; the old
              log-probs and values stay fixed): the kernel's forward (logits and values from one model call), the
              ``ppo`` loss (plugins/losses/ppo.py: clipped surrogate + vf_coef x clipped value loss), backward, step.

The value head is ``model.v_head``, a Linear(hidden, 1) in fp32 added by ``adapt``: trained with the policy (full
fine-tuning or LoRA), saved in checkpoints, left out of a LoRA run's adapter. Held out: greedy answers to the eval
prompts scored by the reward model (``eval_score``) and the reward plugins (``eval_rewards/<name>``).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from swiftk.contracts import LEARN, Batch, ModelOutputs, SamplingParams, token_logps
from swiftk.contracts.rewards import Scores
from swiftk.contracts.stages import LossChoice, StepContext, register_stage
from swiftk.kernel.errors import ConfigError, ModelLoadError
from swiftk.plugins.losses.ppo import gae, kl_rewards, masked_whiten
from swiftk.plugins.stages.grpo import OnlineStage, RewardsConfig
from swiftk.plugins.stages.online import Rollout, chunks, completion_mask, generate, sequences


class PPOConfig(RewardsConfig):
    """[train] keys of the ppo stage (``batch_size`` counts prompts, one completion each)."""

    reward_model: str = Field(description="folder of a reward model (the rm stage's final/, or merged/ for LoRA): "
                              "loaded frozen as AutoModelForSequenceClassification; same tokenizer as the policy")
    rewards: list[str] = Field([], description="reward plugins added to the reward model's score (accuracy, format, "
                               "length, code, or your own); [[plugins]] implementing swiftk_reward_compute add too")
    kl_coef: float = Field(0.05, ge=0, description="weight of the per-token KL penalty to the reference")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="log(pi/pi_ref) (k1) or the non-negative k3")
    gamma: float = Field(1.0, ge=0, le=1, description="discount of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="lambda of GAE")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip: [1 - cliprange, 1 + cliprange]")
    cliprange_value: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    ppo_epochs: int = Field(4, ge=1, description="optimizer steps learnt from one rollout batch")
    temperature: float = Field(0.7, gt=0, description="sampling temperature (also divides the logits in the loss)")
    max_completion_length: int = Field(32, ge=1, description="tokens per completion at most")
    missing_eos_penalty: float | None = Field(None, description="subtracted from the score of a completion that did "
                                              "not end within max_completion_length")
    whiten_rewards: bool = Field(False, description="whiten the per-token rewards (mean kept) before GAE")


@register_stage("ppo")
class PPO(OnlineStage):
    """PPO with the ``ppo`` loss, a frozen reference (the policy without its LoRA adapters, or a copy) and a
    frozen reward model."""

    config = PPOConfig
    phases = ("rollout", "score", LEARN)
    needs_reference = True

    def __init__(self, train: Any) -> None:
        super().__init__(train)
        self.reward_model: torch.nn.Module | None = None
        self.pending: tuple[list[list[Rollout]], Any] | None = None  # generated, being scored by the plugins
        self.ready: deque[list[Batch]] = deque()  # the learn batches of the coming ppo_epochs steps
        self.ratios: tuple[int, list[torch.Tensor]] = (-1, [])  # (step, [mean ratio, ratio var] per micro-batch)
        self.timing: dict[str, float] = {}

    def loss(self) -> LossChoice:
        t = self.train
        arguments = {"cliprange": t.cliprange, "cliprange_value": t.cliprange_value, "vf_coef": t.vf_coef,
                     "temperature": t.temperature}
        return LossChoice("ppo", {**arguments, **t.loss_config}, "[train] stage", "[train] loss_config")

    def problems(self, config: Any) -> list[str]:
        return super().problems(config) + reward_model_problems(self.train.reward_model)

    def draw(self, step: int, grad_accum: int) -> int:
        return 0 if self.ready else grad_accum

    def sampling(self, greedy: bool = False) -> SamplingParams:
        if greedy:
            return SamplingParams(max_new_tokens=self.train.max_completion_length, temperature=0.0)
        return SamplingParams(max_new_tokens=self.train.max_completion_length, temperature=self.train.temperature)

    # --- once the model is loaded

    def adapt(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """The value head: zero-initialised, so every value starts at 0 and GAE starts from the rewards alone."""
        device = next(model.parameters()).device
        head = torch.nn.Linear(model.config.hidden_size, 1, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        model.v_head = head.requires_grad_(True)  # an attribute of the model (PEFT too): trained and checkpointed

    def prepare(self, ctx: StepContext, train: Sequence[Any], held_out: Sequence[Any]) -> None:
        self.reward_model = load_reward_model(self.train.reward_model, ctx.tokenizer, ctx.unwrapped(), ctx.device)

    def forward(self, ctx: StepContext, model: torch.nn.Module, batch: Batch) -> ModelOutputs:
        """Logits and values ``[B, T]`` from one model call; the value head reads the last hidden state in fp32."""
        with ctx.autocast():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False, output_hidden_states=True)
        head = ctx.unwrapped().v_head
        values = head(out.hidden_states[-1].to(head.weight.dtype)).squeeze(-1)  # [B, T]
        if "old_logps" in batch.extras and model.training:
            self.log_ratio(ctx, out.logits, batch)
        return ModelOutputs(out.logits, {"values": values})

    # --- the phases

    def rollout(self, ctx: StepContext, micro: list[Batch]) -> list[Batch]:
        """One completion per prompt, micro-batch by micro-batch; the reward plugins score them meanwhile."""
        if not micro:
            return micro  # this step learns from an earlier rollout
        started = time.perf_counter()
        generator, sampling = ctx.generator(), self.sampling()
        parts = [generate(generator, self.prompts["train"].of(batch), sampling) for batch in micro]
        self.pending = (parts, self.scored(ctx, [r for part in parts for r in part]))
        self.timing["timing/rollout_s"] = time.perf_counter() - started
        return micro

    def score(self, ctx: StepContext, micro: list[Batch]) -> list[Batch]:
        """Scores, old log-probs and values, rewards and advantages; then this step's learn batches (and the next
        ``ppo_epochs`` - 1 steps')."""
        if self.pending is not None:
            started = time.perf_counter()
            (parts, pending), self.pending = self.pending, None
            rollouts = [r for part in parts for r in part]
            plugin_scores = pending.result()
            if plugin_scores.columns:
                self.check_failures(plugin_scores)
            rm_scores = self.rm_scores(ctx, rollouts)  # [N]
            scores = self.total_scores(rm_scores, rollouts, plugin_scores)  # [N]
            batches = self.learn_batches(ctx, parts, scores)
            ctx.log({**self.rollout_metrics(rollouts, rm_scores, scores, batches, plugin_scores), **self.timing,
                     "timing/score_s": time.perf_counter() - started})
            self.ready.extend([batches] * self.train.ppo_epochs)
            self.timing = {}
        return self.ready.popleft()

    @torch.no_grad()
    def rm_scores(self, ctx: StepContext, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """``[N]`` float32: the reward model's score of each prompt + completion, right-padded."""
        assert self.reward_model is not None, "prepare() loads the reward model"
        out = []
        for part in chunks(rollouts, 64):
            batch = sequences(part, ctx.tokenizer.pad_token_id).to(ctx.device)
            with ctx.autocast():
                logits = self.reward_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                           use_cache=False).logits  # [n, 1]
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out)

    def total_scores(self, rm_scores: torch.Tensor, rollouts: Sequence[Rollout], plugins: Scores) -> torch.Tensor:
        """The reward model's score + the weighted reward plugins (none applying: + 0) - missing_eos_penalty."""
        scores = rm_scores.clone()
        if plugins.columns:
            scores += torch.tensor(plugins.total(self.train.reward_weights)).nan_to_num(0.0).float()
        if self.train.missing_eos_penalty is not None:
            unfinished = torch.tensor([r.completion.finish_reason == "length" for r in rollouts])
            scores -= self.train.missing_eos_penalty * unfinished.float()
        return scores

    def learn_batches(self, ctx: StepContext, parts: list[list[Rollout]], scores: torch.Tensor) -> list[Batch]:
        """One learn batch per micro-batch of prompts, with what the ``ppo`` loss needs in ``extras``."""
        t, model, pad = self.train, ctx.unwrapped(), ctx.tokenizer.pad_token_id
        batches, start = [], 0
        for part in parts:
            batch = sequences(part, pad).to(ctx.device)
            mask = completion_mask(batch)  # [B, T-1]
            logps, values = self.old_logps_and_values(ctx, model, batch)
            ref_logps = ctx.reference.token_logps(batch, t.temperature)  # type: ignore[union-attr]
            part_scores = scores[start : start + len(part)].to(ctx.device)
            start += len(part)
            batch.extras |= {"old_logps": logps, "old_values": values, "ref_logps": ref_logps,
                             "scores": part_scores}
            batch.extras["rewards"] = kl_rewards(part_scores, logps, ref_logps, mask.float(), kl_coef=t.kl_coef,
                                                 kl_estimator=t.kl_estimator)
            batches.append(batch)
        if t.whiten_rewards:
            whiten(batches, "rewards", shift_mean=False)
        for batch in batches:
            advantages, returns = gae(batch.extras["rewards"], batch.extras["old_values"], completion_mask(batch),
                                      t.gamma, t.lam)
            batch.extras |= {"advantages": advantages, "returns": returns}
        whiten(batches, "advantages", shift_mean=True)
        return batches

    @torch.no_grad()
    def old_logps_and_values(self, ctx: StepContext, model: torch.nn.Module, batch: Batch
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling policy's per-token log-probs (logits / temperature) and values, ``[B, T-1]``, from one
        forward without gradient or dropout."""
        training = model.training
        model.eval()
        try:
            outputs = self.forward(ctx, model, batch)
        finally:
            model.train(training)
        logps, mask = token_logps(outputs.logits, batch.labels, self.train.temperature)  # [B, T-1]
        return logps, outputs.extras["values"][:, :-1].float() * mask

    @torch.no_grad()
    def log_ratio(self, ctx: StepContext, logits: torch.Tensor, batch: Batch) -> None:
        """``val/ratio`` (and its variance): pi / pi_old over this step's completion tokens, averaged over its
        micro-batches."""
        logps, mask = token_logps(logits, batch.labels, self.train.temperature)
        ratio = (logps - batch.extras["old_logps"]).exp()[mask]
        step, seen = self.ratios
        if step != ctx.step:
            self.ratios = step, seen = ctx.step, []
        seen.append(torch.stack([ratio.mean(), ratio.var() if ratio.numel() > 1 else ratio.new_zeros(())]))
        mean = torch.stack(seen).mean(0).tolist()
        ctx.log({"val/ratio": mean[0], "val/ratio_var": mean[1]})

    def rollout_metrics(self, rollouts: list[Rollout], rm_scores: torch.Tensor, scores: torch.Tensor,
                        batches: list[Batch], plugins: Scores) -> dict[str, float]:
        """TRL's names: objective/kl is the mean over sequences of the summed per-token KL (k1)."""
        kl, non_score, entropy = [], [], []
        for batch in batches:
            mask = completion_mask(batch).float()
            x = batch.extras["old_logps"] - batch.extras["ref_logps"]  # [B, T-1]
            kl.append((x * mask).sum(1))
            non_score.append((-self.train.kl_coef * (x if self.train.kl_estimator == "k1" else x.neg().exp() - 1 + x)
                              * mask).sum(1))
            entropy.append((-batch.extras["old_logps"] * mask).sum(1))
        kl_t, non_score_t = torch.cat(kl).cpu(), torch.cat(non_score).cpu()
        lengths = [len(r.completion.token_ids) for r in rollouts]
        metrics = {k: v for k, v in plugins.metrics().items() if not math.isnan(v)} if plugins.columns else {}
        return metrics | {
            "objective/scores": float(scores.mean()),
            "objective/rm_scores": float(rm_scores.mean()),
            "objective/kl": float(kl_t.mean()),
            "objective/entropy": float(torch.cat(entropy).mean()),
            "objective/non_score_reward": float(non_score_t.mean()),
            "objective/rlhf_reward": float((scores + non_score_t).mean()),
            "val/num_eos_tokens": float(sum(r.completion.finish_reason != "length" for r in rollouts)),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/clipped_ratio": sum(r.completion.finish_reason == "length" for r in rollouts) / len(rollouts),
        }

    # --- held out

    def evaluate(self, ctx: StepContext, held_out: Sequence[Any]) -> dict[str, float]:
        """Greedy answers to the held-out prompts: the reward model's mean score (``eval_score``) and each reward
        plugin's mean."""
        rollouts, pending = self.answer_held_out(ctx, held_out)
        eval_score = float(self.rm_scores(ctx, rollouts).mean())  # while the reward plugins score
        return {"eval_score": eval_score, **self.held_out_metrics(rollouts, pending.result())}


def whiten(batches: list[Batch], key: str, shift_mean: bool) -> None:
    """Whiten ``extras[key]`` over every completion token of the rollout (all its batches), 0 elsewhere."""
    masks = [completion_mask(b) for b in batches]
    flat = torch.cat([b.extras[key][m] for b, m in zip(batches, masks, strict=True)])
    if flat.numel() < 2:
        return  # no variance to divide by
    flat = masked_whiten(flat, torch.ones_like(flat), shift_mean=shift_mean)
    start = 0
    for batch, mask in zip(batches, masks, strict=True):
        count = int(mask.sum())
        whitened = torch.zeros_like(batch.extras[key])
        whitened[mask] = flat[start : start + count]
        batch.extras[key], start = whitened, start + count


def reward_model_problems(folder: str) -> list[str]:
    """``[train] reward_model`` must be a folder holding a sequence classifier (not a LoRA adapter)."""
    key = "[train] reward_model"
    path = Path(folder)
    if (path / "adapter_config.json").is_file():
        return [f"{key}: {folder} is a LoRA adapter; the reward model must be a whole model folder: train it with "
                f"`swiftk run <rm config> --merge` and point reward_model at the run's merged/ folder"]
    if not (path / "config.json").is_file():
        return [f"{key}: {folder} is not a model folder (no config.json); point it at a reward model trained by the "
                f"rm stage (its run's final/ folder; merged/ for a LoRA run). Relative paths are read from the "
                f"current folder"]
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        return [f"{key}: {path / 'config.json'} cannot be read: {exc}"]
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        return [f"{key}: {folder} holds a {architectures[0]}, not a reward model (a ...ForSequenceClassification "
                f"with one score, as the rm stage writes)"]
    return []


def load_reward_model(folder: str, tokenizer: Any, policy: torch.nn.Module, device: torch.device
                      ) -> torch.nn.Module:
    """The reward model, frozen, in the policy's dtype, on ``device``; its vocabulary must be the policy's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dtype = getattr(policy, "dtype", torch.float32)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                   pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"[train] reward_model: cannot load a reward model from '{folder}': {exc}") from exc
    if (Path(folder) / "tokenizer_config.json").is_file():
        if AutoTokenizer.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
            raise ConfigError([f"[train] reward_model: {folder} was trained with another tokenizer than the "
                               f"policy's; PPO feeds it the policy's tokens, so both must share one"])
    return model.to(device).eval().requires_grad_(False)
