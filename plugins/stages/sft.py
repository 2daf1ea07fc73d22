"""Supervised fine-tuning: learn the completions (or every token) of instruction, chat or text rows.

One phase, ``learn``: the loss plugin named by ``[train] loss_type`` (cross-entropy by default) over the
labelled tokens. Held out: the kernel's token-weighted ``eval_loss`` plus the ``[eval] metrics`` plugins, and
greedy answers for exact match when ``[eval] generate`` or ``exact_match`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from swiftk.contracts import Batch
from swiftk.contracts.stages import DataContext, Stage, StepContext, register_stage
from swiftk.kernel.data import Sample, collate, detect_format, load_rows, samples_from_rows
from swiftk.kernel.evaluate import ExpectedAnswer, evaluate, references


@register_stage("sft")
class SFT(Stage):
    """Instruction, chat or plain-text rows; the loss plugin of ``[train] loss_type``."""

    task_types = ("sft",)
    unit = "samples"

    def __init__(self, train: Any) -> None:
        super().__init__(train)
        self.refs: list[ExpectedAnswer] = []  # what exact-match evaluation asks the model to reproduce
        self.eval_config: Any = None
        self.batches: Callable[[list[Any]], Batch] | None = None

    def metrics(self, eval_config: Any) -> list[str]:
        return list(eval_config.metric_names())

    def load(self, path: str, split: str, ctx: DataContext) -> Sequence[Any]:
        rows = load_rows(path, ctx.transform(split))  # read and transformed once
        samples = samples_from_rows(path, rows, ctx.tokenizer, ctx.data)
        if split == "eval":
            self.eval_config = ctx.eval
            if ctx.eval.generates:
                self.refs = references(rows, detect_format(rows, ctx.data.format), ctx.tokenizer,
                                       ctx.data.system_prompt)
        return samples

    def collate(self, ctx: DataContext) -> Callable[[list[Any]], Batch]:
        """The kernel's right-padding collator, unless a ``swiftk_data_collate`` plugin builds the batches."""
        pad_id = ctx.tokenizer.pad_token_id

        def plugin_collate(samples: list[Sample]) -> Batch:
            batch = ctx.call("swiftk_data_collate", samples=[s.as_dict() for s in samples], pad_id=pad_id)
            return batch if batch is not None else collate(samples, pad_id)

        self.batches = plugin_collate if ctx.implemented("swiftk_data_collate") else \
            (lambda samples: collate(samples, pad_id))
        return self.batches

    def evaluate(self, ctx: StepContext, held_out: Sequence[Any]) -> dict[str, float]:
        assert self.batches is not None and self.eval_config is not None
        return evaluate(ctx.unwrapped(), ctx.tokenizer, list(held_out), self.refs, self.eval_config, self.batches,
                        ctx.autocast, ctx.call, ctx.state(), ctx.generator)
