"""Held-out evaluation: token-level loss and perplexity, and exact match by greedy generation."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from swiftk.contracts import IGNORE_INDEX
from swiftk.kernel.data import Sample, collate
from swiftk.kernel.generate import complete


@dataclass
class Reference:
    """A prompt rendered as in training, and the completion an exact answer must reproduce."""

    prompt: str
    expected: str
    templated: bool


def references(rows: list[tuple[str, dict[str, Any]]], fmt: str, tokenizer: PreTrainedTokenizerBase) -> list[Reference]:
    refs = []
    for _, row in rows:
        if fmt == "prompt_completion" and isinstance(row["prompt"], str) and isinstance(row["completion"], str):
            refs.append(Reference(row["prompt"], row["completion"].strip(), templated=False))
        elif fmt in ("messages", "prompt_completion"):
            messages = row["messages"] if fmt == "messages" else [*row["prompt"], *_as_list(row["completion"])]
            if messages and messages[-1].get("role") == "assistant":
                prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                refs.append(Reference(str(prompt), str(messages[-1]["content"]).strip(), templated=True))
    return refs


def _as_list(completion: Any) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    samples: list[Sample],
    batch_size: int,
    pad_id: int,
    autocast: Callable[[], AbstractContextManager[Any]],
    max_batches: int | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the eval set, and its perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    starts = list(range(0, len(samples), batch_size))[:max_batches]
    for start in starts:
        batch = collate(samples[start : start + batch_size], pad_id)
        with autocast():
            logits = model(
                input_ids=batch.input_ids.to(device),
                attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(device),
                position_ids=None if batch.position_ids is None else batch.position_ids.to(device),
            ).logits
        targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(device)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": float(count)}


def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    refs: list[Reference],
    max_new_tokens: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> dict[str, float]:
    """Share of references whose greedy completion equals the expected text (whitespace-stripped)."""
    hits = 0
    for templated in (False, True):
        group = [r for r in refs if r.templated == templated]
        if not group:
            continue
        answers = complete(model, tokenizer, [r.prompt for r in group], max_new_tokens, templated,
                           batch_size, autocast)
        hits += sum(a == r.expected for a, r in zip(answers, group, strict=True))
    return {"eval_exact_match": hits / max(len(refs), 1)}
