"""Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes"): the student learns the teacher's next-token distributions, on completions that
are, with probability ``lmbda``, its own.

One optimizer step, top to bottom:

    rollout   one draw decides the step (``random() < lmbda``, from an RNG seeded by [train] seed and the step, so
              every rank and a resumed run draw the same): on-policy, the student samples a completion per prompt
              through ``ctx.generator()`` (this step's weights); off-policy, the row's own completion, tokenized
              exactly as SFT tokenizes it (EOS included), or with ``seq_kd`` the teacher's sampled completion.
              A row without a completion is answered by the teacher. Prompt + completion, the completion labelled.
    learn     the kernel's forward (the student's logits with gradient, the teacher's without), the ``gkd`` loss
              (plugins/losses/gkd.py: the beta-JSD per labelled token), backward and optimizer step.

Data: prompt/completion rows as for SFT (``{"prompt": "12+34=", "completion": "46"}``, the prompt as text or
messages), or ``messages`` rows (the last assistant turn is the completion). The teacher (``teacher_model_id``, a
model folder or hub id) must use the student's tokenizer; it is loaded once, frozen, in the student's [model]
dtype, and is never trained or saved. Held out: the forward KL(teacher || student) and the beta-JSD per token
of the held-out completions (the teacher's greedy answers where a row has none): ``eval_kl``, ``eval_jsd``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from transformers import AutoConfig

from swiftk.contracts import IGNORE_INDEX, LEARN, Batch, ModelOutputs, SamplingParams, shifted_labels
from swiftk.contracts.stages import DataContext, LossChoice, Stage, StageConfig, StepContext, register_stage
from swiftk.kernel.data import Sample, Tokenize, collate, load_rows, truncate
from swiftk.kernel.errors import ConfigError, ModelLoadError
from swiftk.kernel.model import first_line, load_model, resolve_source
from swiftk.plugins.generators.hf import HFGenerator
from swiftk.plugins.losses.gkd import token_jsd
from swiftk.plugins.stages.online import PromptExample, Prompts, chunks, generate, load_prompts, sequences


class GKDConfig(StageConfig):
    """[train] keys of the gkd stage."""

    teacher_model_id: str = Field(description="the teacher: a model folder or hub id with the student's tokenizer")
    lmbda: float = Field(0.5, ge=0, le=1, description="share of on-policy steps: the student's own completions")
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation: 0 forward KL(teacher||student), 1 reverse")
    temperature: float = Field(0.9, gt=0, description="sampling temperature of the generated completions")
    max_completion_length: int = Field(32, ge=1, description="tokens per generated completion at most")
    seq_kd: bool = Field(False, description="off-policy steps learn the teacher's sampled completions, not the data's")
    loss_temperature: float = Field(1.0, gt=0, description="divides both models' logits in the loss")


@register_stage("gkd")
class GKD(Stage):
    """GKD with the ``gkd`` loss: a frozen teacher, and the student's own samples on a ``lmbda`` share of steps."""

    config = GKDConfig
    task_types = ("sft", "prompt")
    unit = "prompts"
    phases = ("rollout", LEARN)

    def __init__(self, train: Any) -> None:
        super().__init__(train)
        self.prompts: dict[str, Prompts] = {}
        self.targets: dict[str, list[Sample | None]] = {}  # per example: its completion as SFT tokenizes it
        self.teacher: torch.nn.Module | None = None
        self.system_prompt: str | None = None
        self.eval_batch_size = 8

    def loss(self) -> LossChoice:
        arguments = {"beta": self.train.beta, "temperature": self.train.loss_temperature}
        return LossChoice("gkd", {**arguments, **self.train.loss_config}, "[train] stage", "[train] loss_config")

    def problems(self, config: Any) -> list[str]:
        problems = []
        teacher = self.train.teacher_model_id
        try:
            source = resolve_source(teacher)
        except ModelLoadError as exc:
            return [str(exc).replace("[model] model_id", "[train] teacher_model_id")]
        if missing_folder(source):
            problems.append(f"[train] teacher_model_id: folder {source} does not exist; train the teacher first "
                            f"(its run's final/ or merged/ folder) or name a hub id (org/name)")
        if config.data.max_length <= self.train.max_completion_length:
            problems.append(f"[train] max_completion_length: {self.train.max_completion_length} leaves no room for a "
                            f"prompt in [data] max_length = {config.data.max_length}")
        if config.data.packing:
            problems.append("[data] packing: gkd learns from one prompt + completion per row; set packing = false")
        return problems

    # --- data

    def load(self, path: str, split: str, ctx: DataContext) -> Sequence[Any]:
        """The prompts of ``path``, and each row's completion tokenized as SFT tokenizes it (None: it has none)."""
        transform = ctx.transform(split)

        def prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
            if transform is not None and (new := transform(row)) is not None:
                row = new
            return split_messages(row) if isinstance(row, dict) else row

        room = ctx.data.max_length - self.train.max_completion_length
        examples = load_prompts(path, ctx.tokenizer, ctx.data, prompt_completion, room)
        tokenize = Tokenize(ctx.tokenizer, ctx.data, "prompt_completion")
        rows = dict(load_rows(path, prompt_completion))
        self.targets[split] = [
            truncate(tokenize(e.where, rows[e.where]), ctx.data.max_length, ctx.data.truncation)
            if rows[e.where].get("completion") is not None else None for e in examples]
        self.prompts[split] = Prompts(examples, ctx.tokenizer.pad_token_id)
        self.system_prompt, self.eval_batch_size = ctx.data.system_prompt, ctx.eval.batch_size
        return examples

    def collate(self, ctx: DataContext) -> Callable[[list[Any]], Batch]:
        return self.prompts["train"].collate

    # --- the teacher

    def adapt(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Refuse a teacher with another vocabulary before anything is written: the loss compares the two
        distributions token id by token id."""
        teacher, source = self.train.teacher_model_id, resolve_source(self.train.teacher_model_id)
        try:
            teacher_vocab = AutoConfig.from_pretrained(source).vocab_size
        except (OSError, ValueError) as exc:
            raise ConfigError([f"[train] teacher_model_id: cannot read a model config from '{source}': "
                               f"{first_line(exc)}"]) from None
        student_vocab = model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]  # logits' width
        if teacher_vocab != student_vocab:
            raise ConfigError([f"[train] teacher_model_id: the teacher '{teacher}' has a vocabulary of {teacher_vocab} "
                               f"tokens and the student {student_vocab} (tokenizer of {len(tokenizer)}); GKD compares "
                               f"their next-token distributions, so the teacher must use the student's tokenizer"])

    def prepare(self, ctx: StepContext, train: Sequence[Any], held_out: Sequence[Any]) -> None:
        """Load the teacher (the student's [model] settings, pretrained from ``teacher_model_id``), frozen; answer
        the held-out rows without a completion with its greedy answers, once."""
        model_cfg = ctx.model_config  # the run's [model]
        cfg = model_cfg.model_copy(update={"model_id": self.train.teacher_model_id, "gguf_file": None,
                                           "init": "pretrained", "architecture": None, "tokenizer": None})
        teacher: torch.nn.Module = load_model(cfg, len(ctx.tokenizer), ctx.device)
        self.teacher = teacher.requires_grad_(False).eval()
        if "eval" in self.targets:
            targets, examples = self.targets["eval"], self.prompts["eval"].examples
            missing = [i for i, t in enumerate(targets) if t is None]
            greedy = SamplingParams(max_new_tokens=self.train.max_completion_length, temperature=0.0)
            for i, answer in zip(missing, self.teacher_answers(ctx, [examples[i] for i in missing], greedy),
                                 strict=True):
                targets[i] = answer

    @torch.no_grad()
    def teacher_logits(self, ctx: StepContext, batch: Batch) -> torch.Tensor:
        assert self.teacher is not None, "the teacher is loaded in prepare()"
        with ctx.autocast():
            return ctx.forward_logits(self.teacher, batch)  # [B, T, V]

    def teacher_answers(self, ctx: StepContext, examples: Sequence[PromptExample],
                        sampling: SamplingParams) -> list[Sample]:
        """The teacher's completions of ``examples``, as learn rows."""
        if not examples:
            return []
        teacher = HFGenerator(self.teacher, ctx.tokenizer, system_prompt=self.system_prompt, batch_size=64,
                              autocast=ctx.autocast)
        return [answered(r.example, r.completion.token_ids) for r in generate(teacher, examples, sampling)]

    # --- the phases

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.train.max_completion_length, temperature=self.train.temperature)

    def on_policy(self, step: int) -> bool:
        """This step's one draw; the same on every rank and after a resume."""
        return random.Random(f"gkd:{self.train.seed}:{step}").random() < float(self.train.lmbda)

    def rollout(self, ctx: StepContext, micro: list[Batch]) -> list[Batch]:
        """The step's learn batches: the student's completions, or the data's (the teacher's with seq_kd)."""
        on_policy, prompts, pad = self.on_policy(ctx.step), self.prompts["train"], ctx.tokenizer.pad_token_id
        batches, lengths = [], []
        for batch in micro:
            indices = batch.extras["example"].tolist()
            examples = [prompts.examples[i] for i in indices]
            if on_policy:
                rollouts = generate(ctx.generator(), examples, self.sampling())
                lengths += [len(r.completion.token_ids) for r in rollouts]
                batches.append(sequences(rollouts, pad).to(ctx.device))
                continue
            rows = [None if self.train.seq_kd else self.targets["train"][i] for i in indices]
            asked = iter(self.teacher_answers(ctx, [e for e, r in zip(examples, rows, strict=True) if r is None],
                                              self.sampling()))
            batches.append(collate([r if r is not None else next(asked) for r in rows], pad).to(ctx.device))
        ctx.log({"gkd/on_policy": float(on_policy)}
                | ({"completions/mean_length": sum(lengths) / len(lengths)} if lengths else {}))
        return batches

    def forward(self, ctx: StepContext, model: torch.nn.Module, batch: Batch) -> ModelOutputs:
        with ctx.autocast():
            logits = ctx.forward_logits(model, batch)  # [B, T, V], with gradient
        return ModelOutputs(logits, {"teacher_logits": self.teacher_logits(ctx, batch)})

    # --- held out

    def evaluate(self, ctx: StepContext, held_out: Sequence[Any]) -> dict[str, float]:
        """Per held-out completion token: KL(teacher || student) and the loss's beta-JSD."""
        prompts, targets = self.prompts["eval"], self.targets["eval"]
        rows = [targets[prompts.index[id(e)]] for e in held_out]
        model, pad = ctx.unwrapped(), ctx.tokenizer.pad_token_id
        beta, tau = self.train.beta, self.train.loss_temperature
        kl, jsd, tokens, training = 0.0, 0.0, 0, model.training
        model.eval()
        try:
            for part in chunks(rows, self.eval_batch_size):
                batch = collate(part, pad).to(ctx.device)
                with torch.no_grad(), ctx.autocast():
                    student = ctx.forward_logits(model, batch)  # [B, T, V]
                scored = shifted_labels(batch.labels) != IGNORE_INDEX  # [B, T]
                s, t = student[scored].float(), self.teacher_logits(ctx, batch)[scored].float()  # [N, V]
                kl += float(token_jsd(s, t, beta=0.0).sum())
                jsd += float(token_jsd(s, t, beta=beta, temperature=tau).sum())
                tokens += int(scored.sum())
        finally:
            model.train(training)
        return {"eval_kl": kl / max(tokens, 1), "eval_jsd": jsd / max(tokens, 1)}


def split_messages(row: dict[str, Any]) -> dict[str, Any]:
    """A ``messages`` row as prompt (the turns before the last) and completion (the last, an assistant turn)."""
    messages = row.get("messages")
    if "prompt" in row or not isinstance(messages, list) or len(messages) < 2 or \
            not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        return row
    return {**row, "prompt": messages[:-1], "completion": messages[-1:]}


def missing_folder(source: str) -> bool:
    """Whether ``source`` names a local folder that is not there (one ``org/name`` is a hub id)."""
    if Path(source).is_dir():
        return False
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or \
        (source.count("/") == 1 and Path(source.split("/")[0]).is_dir())


def answered(example: PromptExample, completion: list[int]) -> Sample:
    """A learn row: the prompt as the generator saw it, then ``completion``, labelled."""
    return Sample(example.ids + list(completion), [IGNORE_INDEX] * len(example.ids) + list(completion))
