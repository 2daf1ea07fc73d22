"""Prompt rendering shared by the before/after samples and the commands that chat with a model."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from swiftk.plugins.generators.hf import render_prompt, stop_ids

__all__ = ["chat_prompt", "render_prompt", "stop_ids"]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, system_prompt: str | None = None) -> str:
    """A user message rendered with the chat template (ready for the assistant's turn), or the raw text."""
    if tokenizer.chat_template is None:
        return user_text
    return render_prompt(tokenizer, [{"role": "user", "content": user_text}], system_prompt)
