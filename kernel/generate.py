"""Greedy generation for the before/after samples and exact-match evaluation."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, system_prompt: str | None = None) -> str:
    """A user message rendered with the chat template (ready for the assistant's turn), or the raw text."""
    if tokenizer.chat_template is None:
        return user_text
    return render_prompt(tokenizer, [{"role": "user", "content": user_text}], system_prompt)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], system_prompt: str | None) -> str:
    """Messages up to the assistant's turn, as training renders them (``[data] system_prompt`` included)."""
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


@torch.no_grad()
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
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not templated).to(device)
            with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop_ids(tokenizer),
                )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End of sequence, and end of a chat turn where the template has one distinct from EOS."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id and end_of_turn not in ids:
        ids.append(end_of_turn)
    return ids
