"""KTO (Ethayarajh et al. 2024): unpaired examples labelled desirable or not, against a frozen reference; pairs
are split into one desirable and one undesirable example each. Each micro-batch also carries mismatched
prompt/completion rows, which the loss uses for its KL estimate (plugins/losses/kto.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from swiftk.contracts import Batch
from swiftk.contracts.stages import DataContext, register_stage
from swiftk.plugins.stages.pairs import build_unpaired, collate_unpaired
from swiftk.plugins.stages.preference import PairStage


@register_stage("kto")
class KTO(PairStage):
    task_types = ("kto", "preference")
    unit = "examples"
    needs_reference = True

    def load(self, path: str, split: str, ctx: DataContext) -> Sequence[Any]:
        self.eval_batch_size = ctx.eval.batch_size
        return build_unpaired(path, ctx.tokenizer, ctx.data, ctx.transform(split))

    def collate(self, ctx: DataContext) -> Callable[[list[Any]], Batch]:
        self.batches = functools.partial(collate_unpaired, pad_id=ctx.tokenizer.pad_token_id)
        return self.batches
