"""What the online stages (GRPO, PPO, GKD) share: prompt data, rollouts on the run's generator, and the token
batches they learn from.

Prompt rows (JSONL, JSON, parquet or a saved datasets folder, as for SFT)::

    {"prompt": "12+34=", "answer": "46"}                       # a reference for the rewards: answer, reference,
    {"prompt": [{"role": "user", "content": "..."}], ...}      # solution, completion or tests (the first present)

A prompt is rendered exactly as the generator renders it (raw text with the tokenizer's special tokens, a chat
through its template with ``[data] system_prompt``), so the tokens learnt from are the tokens sampled from.
The kernel batches examples as their indices (``extras["example"]``); a stage looks the examples up.

A rollout is a prompt, one sampled completion and the weights version that sampled it. ``sequences`` turns
rollouts into a ``Batch``: prompt + completion tokens, the completion labelled (its ending token included), the
prompt masked. Per-token tensors of a batch (``token_logps``) are in the shifted ``[B, T-1]`` layout: position
t holds the log-prob of the token at t+1, as ``contracts.sequence_logps`` reads labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swiftk.contracts import IGNORE_INDEX, Batch, Completion, Message, ModelOutputs, SamplingParams
from swiftk.contracts import token_logps as labelled_logps
from swiftk.kernel.data import load_rows
from swiftk.kernel.errors import DataError
from swiftk.plugins.generators.hf import render_prompts

REFERENCE_FIELDS = ("answer", "reference", "solution", "completion", "tests")


@dataclass
class PromptExample:
    where: str  # file:line, for messages
    prompt: str | list[Message]  # as the row gave it
    text: str  # rendered: what the generator continues
    special: bool  # whether the tokenizer adds its special tokens to ``text`` (raw prompts)
    ids: list[int]  # ``text`` tokenized as the generator tokenizes it
    reference: str | None  # what the rewards compare with (the answer, or test code)
    plain: str  # the prompt as the rewards see it: the text, or the last user message of a chat


@dataclass
class Rollout:
    example: PromptExample
    completion: Completion
    version: int  # the weights version that sampled it


def load_prompts(path: str, tokenizer: Any, data: Any, transform: Any, max_prompt_length: int) -> list[PromptExample]:
    """Every prompt row of ``path``; rows longer than ``max_prompt_length`` tokens are dropped (DataError if none
    is left), a row without a prompt is a DataError naming file:line."""
    examples = []
    kinds = set()
    for where, row in load_rows(path, transform):
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"{where}: an online-RL row needs a 'prompt' (text or messages), and optionally one of "
                            f"{', '.join(map(repr, REFERENCE_FIELDS))} for the rewards")
        prompt = row["prompt"]
        if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
            raise DataError(f"{where}: 'prompt' must be non-empty text or a list of messages")
        texts, special = render_prompts(tokenizer, [prompt], False, data.system_prompt)
        kinds.add(special)
        if len(kinds) > 1:
            raise DataError(f"{where}: this file mixes raw-text and chat prompts; use one kind per file")
        ids = tokenizer(texts[0], add_special_tokens=special)["input_ids"]
        if len(ids) > max_prompt_length:
            continue
        reference = next((row[f] for f in REFERENCE_FIELDS if row.get(f) is not None), None)
        if isinstance(reference, list):  # a chat completion: its assistant text
            reference = "".join(str(m.get("content", "")) for m in reference if isinstance(m, dict))
        plain = prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
        examples.append(PromptExample(where, prompt, texts[0], special, ids,
                                      None if reference is None else str(reference), plain))
    if not examples:
        raise DataError(f"{path}: no prompt left (every prompt is longer than {max_prompt_length} tokens: [data] "
                        f"max_length minus the completion length)")
    return examples


class Prompts:
    """The examples of one split and the collate that batches them by index."""

    def __init__(self, examples: list[PromptExample], pad_id: int) -> None:
        self.examples, self.pad_id = examples, pad_id
        self.index = {id(e): i for i, e in enumerate(examples)}

    def collate(self, chunk: list[PromptExample]) -> Batch:
        """The prompts' tokens (right-padded) and their indices in ``extras["example"]``."""
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, example in enumerate(chunk):
            ids[row, : len(example.ids)] = torch.tensor(example.ids)
            mask[row, : len(example.ids)] = 1
        batch = Batch(ids, torch.full_like(ids, IGNORE_INDEX), mask, 0)
        batch.extras["example"] = torch.tensor([self.index[id(e)] for e in chunk])
        return batch

    def of(self, batch: Batch) -> list[PromptExample]:
        return [self.examples[i] for i in batch.extras["example"].tolist()]


def generate(generator: Any, examples: Sequence[PromptExample], sampling: SamplingParams) -> list[Rollout]:
    """``sampling.n`` rollouts per example, grouped by example, from the generator's current weights."""
    if not examples:
        return []
    special = examples[0].special
    completions = generator.generate([e.text for e in examples], sampling, templated=not special)
    version = generator.version
    return [Rollout(examples[c.prompt_index], c, version) for c in completions]


def sequences(rollouts: Sequence[Rollout], pad_id: int, completions: Sequence[list[int]] | None = None) -> Batch:
    """Prompt + completion token rows, right-padded; labels are the completion tokens (``completions`` replaces
    the rollouts' own, e.g. a dataset's answers)."""
    rows = [(r.example.ids, list(completions[i] if completions is not None else r.completion.token_ids))
            for i, r in enumerate(rollouts)]
    width = max(len(p) + max(len(c), 1) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        full = prompt + completion
        ids[row, : len(full)] = torch.tensor(full)
        labels[row, len(prompt) : len(full)] = torch.tensor(completion, dtype=torch.long)
        mask[row, : len(full)] = 1
    return Batch(ids, labels, mask, 0)


def completion_mask(batch: Batch) -> torch.Tensor:
    """``[B, T-1]``: the positions whose next token is a completion token."""
    return batch.labels[:, 1:] != IGNORE_INDEX


@torch.no_grad()
def token_logps(forward: Callable[[torch.nn.Module, Batch], torch.Tensor | ModelOutputs], model: torch.nn.Module,
                batch: Batch,
                temperatures: Sequence[float] = (1.0,)) -> list[torch.Tensor]:
    """Per-token log-probs ``[B, T-1]`` of the labelled tokens (0 elsewhere) under ``model``, one tensor per
    temperature, from one forward without gradient or dropout."""
    training = model.training
    model.eval()
    try:
        outputs = forward(model, batch)  # logits [B, T, V], or hidden states and the head
    finally:
        model.train(training)
    return [labelled_logps(outputs, batch.labels, t)[0] for t in temperatures]


def engine_logps(rollouts: Sequence[Rollout], like: torch.Tensor) -> torch.Tensor | None:
    """The generator's own per-token log-probs in the ``[B, T-1]`` layout of ``like``, or None if it gave none."""
    if any(r.completion.logprobs is None for r in rollouts):
        return None
    out = torch.zeros_like(like)
    for row, rollout in enumerate(rollouts):
        start = len(rollout.example.ids) - 1  # position t scores token t+1
        values = rollout.completion.logprobs or []
        out[row, start : start + len(values)] = torch.tensor(values, dtype=out.dtype)
    return out


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
