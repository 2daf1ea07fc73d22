"""KTO (Ethayarajh et al. 2024): unpaired examples labelled desirable or not, against a frozen reference; pairs
are split into one desirable and one undesirable example each. Each micro-batch also carries mismatched
prompt/completion rows, which the loss uses for its KL estimate (plugins/losses/kto.py)."""

from __future__ import annotations

from swiftk.contracts.stages import register_stage
from swiftk.plugins.stages.pairs import build_unpaired, collate_unpaired
from swiftk.plugins.stages.preference import PairStage


@register_stage("kto")
class KTO(PairStage):
    task_types = ("kto", "preference")
    unit = "examples"
    needs_reference = True
    read_examples = staticmethod(build_unpaired)
    batch_examples = staticmethod(collate_unpaired)  # N examples, then N mismatched rows for the KL estimate

