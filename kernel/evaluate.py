"""Held-out evaluation: token-level loss and perplexity, and exact match by greedy generation."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from swiftk.contracts import IGNORE_INDEX, Batch, Generator, ModelOutputs, SamplingParams, StepState, shifted_labels
from swiftk.kernel.config import EvalConfig
from swiftk.kernel.data import Sample, as_messages
from swiftk.kernel.model import forward_logits

# swiftk.plugins.generators.hf is imported where it is used: importing it imports every built-in plugin, and the
# built-in stages import this module.


@dataclass
class ExpectedAnswer:
    """A prompt rendered as in training, and the completion an exact answer must reproduce."""

    prompt: str
    expected: str
    templated: bool


def references(
    rows: list[tuple[str, dict[str, Any]]], fmt: str, tokenizer: PreTrainedTokenizerBase,
    system_prompt: str | None = None,
) -> list[ExpectedAnswer]:
    from swiftk.plugins.generators.hf import render_prompt

    refs = []
    for _, row in rows:
        if fmt == "prompt_completion" and isinstance(row["prompt"], str) and isinstance(row["completion"], str):
            refs.append(ExpectedAnswer(row["prompt"], row["completion"].strip(), templated=False))
        elif fmt in ("messages", "prompt_completion"):
            messages = row["messages"] if fmt == "messages" else \
                [*as_messages(row["prompt"], "user"), *as_messages(row["completion"], "assistant")]
            if messages and messages[-1].get("role") == "assistant":
                prompt = render_prompt(tokenizer, messages[:-1], system_prompt)
                refs.append(ExpectedAnswer(prompt, str(messages[-1]["content"]).strip(), templated=True))
    return refs


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    refs: list[ExpectedAnswer],
    cfg: EvalConfig,
    collate: Callable[[list[Sample]], Batch],
    autocast: Callable[[], AbstractContextManager[Any]],
    call: Callable[..., Any],
    state: StepState,
    generator: Callable[[], Generator] | None = None,
    answers: Callable[[], tuple[list[str], list[str], list[str]]] | None = None,
) -> dict[str, float]:
    """One eval pass: token-weighted mean cross-entropy (the kernel's own ``eval_loss``), then every metric
    plugin's results (``swiftk_eval_batch`` per batch, ``swiftk_eval_predictions`` on greedy generations).
    ``call`` is ``Plugins.call``: hooks by name, keywords only; ``generator`` gives the run's [generation] engine
    (serving the current weights), asked only when the eval generates. A stage whose model reads more than text
    (its batches' ``model_inputs``) gives its own ``answers`` (-> prompts, greedy answers, references)."""
    was_training = model.training
    model.eval()
    # a pipeline stage holds the other stages' tensors on the meta device
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    call("swiftk_eval_start", state=state)
    total, count = 0.0, 0
    starts = list(range(0, len(samples), cfg.batch_size))[: cfg.max_batches]
    for start in starts:
        batch = collate(samples[start : start + cfg.batch_size]).to(device)
        batch.num_items_in_batch = batch.num_label_tokens
        with autocast():
            logits = forward_logits(model, batch)  # [B, T, V]
        targets = shifted_labels(batch.labels)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
        call("swiftk_eval_batch", batch=batch, outputs=ModelOutputs(logits), state=state)
    if cfg.generates and answers is not None:
        prompts, predictions, expected = answers()
        call("swiftk_eval_predictions", prompts=prompts, predictions=predictions, references=expected, state=state)
    elif cfg.generates and refs:
        predictions = generate_answers(model, tokenizer, refs, cfg, autocast, generator() if generator else None)
        call("swiftk_eval_predictions", prompts=[r.prompt for r in refs], predictions=predictions,
                                     references=[r.expected for r in refs], state=state)
    model.train(was_training)
    metrics = {"eval_loss": total / max(count, 1), "eval_tokens": float(count)}
    for extra in call("swiftk_eval_end", state=state):
        metrics.update(extra)
    return metrics


def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    refs: list[ExpectedAnswer],
    cfg: EvalConfig,
    autocast: Callable[[], AbstractContextManager[Any]],
    generator: Generator | None = None,
) -> list[str]:
    """Greedy answers in the order of ``refs`` (raw and chat-templated prompts are batched apart), from
    ``generator`` (default: the in-process ``hf`` generator over ``model``)."""
    from swiftk.plugins.generators.hf import HFGenerator

    generator = generator or HFGenerator(model, tokenizer, batch_size=cfg.batch_size, autocast=autocast)
    sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    answers: dict[int, str] = {}
    for templated in (False, True):
        index = [i for i, r in enumerate(refs) if r.templated == templated]
        if index:
            out = generator.generate([refs[i].prompt for i in index], sampling, templated=templated)
            answers.update(zip(index, (c.text.strip() for c in out), strict=True))
    return [answers[i] for i in range(len(refs))]
