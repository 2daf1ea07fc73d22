"""Greedy generation for the before/after samples and exact-match evaluation, through the ``hf`` generator."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from swiftk.contracts import SamplingParams
from swiftk.plugins.generators.hf import HFGenerator, render_prompt, stop_ids

__all__ = ["chat_prompt", "complete", "render_prompt", "stop_ids"]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, system_prompt: str | None = None) -> str:
    """A user message rendered with the chat template (ready for the assistant's turn), or the raw text."""
    if tokenizer.chat_template is None:
        return user_text
    return render_prompt(tokenizer, [{"role": "user", "content": user_text}], system_prompt)


def complete(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    templated: bool,
    batch_size: int = 8,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> list[str]:
    """Greedy continuations of already-rendered ``prompts``, decoded without special tokens.

    ``templated``: the prompts went through the chat template (which carries its own special tokens), so the
    tokenizer must not add BOS again; raw prompts get the same special tokens as in training.
    """
    generator = HFGenerator(model, tokenizer, batch_size=batch_size, autocast=autocast)
    completions = generator.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens), templated=templated)
    return [c.text.strip() for c in completions]
