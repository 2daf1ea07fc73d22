"""Preference data for the alignment stages: chosen/rejected pairs and unpaired (KTO) examples.

Accepted rows (JSONL, JSON, parquet, or a saved datasets folder, as for SFT):

* pairs, plain: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``;
* pairs, conversational: ``prompt`` a string or a message list, ``chosen``/``rejected`` strings or lists of
  assistant messages (rendered with the chat template, like SFT ``prompt``/``completion`` rows);
* pairs, Anthropic hh-rlhf transcripts: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``,
  the prompt being everything up to the last ``\\n\\nAssistant:`` (which both must share);
* unpaired (KTO): ``{"prompt": ..., "completion": ..., "label": true | false}``.

Each side is tokenized as an SFT prompt/completion sample (so the prompt is masked, templates apply and
label boundaries are exact). A bad row is reported with its file:line: a missing field, an empty completion,
identical chosen and rejected, a transcript whose two sides do not share their prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from swiftk.contracts import IGNORE_INDEX, Batch
from swiftk.kernel.data import Sample, Tokenize, collate, load_rows, truncate
from swiftk.kernel.errors import DataError

HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class Pair:
    chosen: Sample  # prompt + chosen completion, prompt masked
    rejected: Sample
    ref: tuple[float, float] | None = None  # the reference's summed log-probs, when precomputed


@dataclass
class Unpaired:
    sample: Sample
    desirable: bool


def pair_fields(where: str, row: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of one pair row, in any accepted shape; ``DataError`` naming ``where``."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a preference row must be an object, got {type(row).__name__}")
    missing = [f for f in ("chosen", "rejected") if f not in row]
    if missing:
        raise DataError(f"{where}: preference row has no {' or '.join(map(repr, missing))} field; expected "
                        f"'prompt', 'chosen' and 'rejected' (or hh-rlhf 'chosen'/'rejected' transcripts)")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:
        prompt, chosen, rejected = split_transcripts(where, chosen, rejected)
    if is_empty(chosen) or is_empty(rejected):
        side = "chosen" if is_empty(chosen) else "rejected"
        raise DataError(f"{where}: the {side} completion is empty")
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical; such a pair teaches nothing (drop it)")
    return prompt, chosen, rejected


def split_transcripts(where: str, chosen: Any, rejected: Any) -> tuple[str, str, str]:
    """An hh-rlhf pair: the shared prompt up to the last assistant turn, and the two final answers."""
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise DataError(f"{where}: preference row has no 'prompt'; without one, 'chosen' and 'rejected' must be "
                        f"hh-rlhf transcripts (strings)")
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise DataError(f"{where}: preference row has no 'prompt', and its transcripts have no "
                        f"'{HH_ASSISTANT.strip()}' turn to split at")
    end_c, end_r = cut_c + len(HH_ASSISTANT), cut_r + len(HH_ASSISTANT)
    if chosen[:end_c] != rejected[:end_r]:
        raise DataError(f"{where}: the chosen and rejected transcripts differ before their last assistant turn, so "
                        f"they do not answer the same prompt")
    return chosen[:end_c], chosen[end_c:], rejected[end_r:]


def is_empty(completion: Any) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    if isinstance(completion, list):
        return not completion or all(not str(m.get("content", "")).strip() for m in completion
                                     if isinstance(m, dict))
    return completion is None


def build_pairs(path: str, tokenizer: PreTrainedTokenizerBase, cfg: Any, transform: Any = None
                ) -> list[Pair]:
    """Every pair of ``path``, tokenized and truncated per ``[data]``; a pair whose side is dropped is dropped."""
    return pairs_from_rows(path, load_rows(path, transform), tokenizer, cfg)


def pairs_from_rows(path: str, rows: list[tuple[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: Any
                    ) -> list[Pair]:
    tokenize = Tokenize(tokenizer, cfg, "prompt_completion")
    pairs = []
    for where, row in rows:
        prompt, chosen, rejected = pair_fields(where, row)
        sides = [truncate(tokenize(where, {"prompt": prompt, "completion": completion}), cfg.max_length,
                          cfg.truncation) for completion in (chosen, rejected)]
        if sides[0] is not None and sides[1] is not None:
            pairs.append(Pair(sides[0], sides[1]))
    if not pairs:
        raise DataError(f"{path}: no preference pair left to train on (all rows too long for "
                        f"[data] max_length = {cfg.max_length} with truncation = '{cfg.truncation}'?)")
    return pairs


def build_unpaired(path: str, tokenizer: PreTrainedTokenizerBase, cfg: Any, transform: Any = None
                   ) -> list[Unpaired]:
    """KTO rows: one completion each, labelled desirable (true) or not (false); or pairs, split into a desirable
    and an undesirable example each."""
    rows = load_rows(path, transform)
    if rows and isinstance(rows[0][1], dict) and "label" not in rows[0][1] and "chosen" in rows[0][1]:
        return unpaired_from(pairs_from_rows(path, rows, tokenizer, cfg))
    tokenize = Tokenize(tokenizer, cfg, "prompt_completion")
    examples = []
    for where, row in rows:
        if not isinstance(row, dict) or not all(f in row for f in ("prompt", "completion", "label")):
            raise DataError(f"{where}: an unpaired (KTO) row needs 'prompt', 'completion' and 'label' (true/false)")
        if not isinstance(row["label"], bool):
            raise DataError(f"{where}: 'label' must be true or false, got {row['label']!r}")
        if is_empty(row["completion"]):
            raise DataError(f"{where}: the completion is empty")
        sample = truncate(tokenize(where, row), cfg.max_length, cfg.truncation)
        if sample is not None:
            examples.append(Unpaired(sample, row["label"]))
    if not examples:
        raise DataError(f"{path}: no example left to train on")
    return examples


def collate_pairs(pairs: list[Pair], pad_id: int) -> Batch:
    """One batch for one forward: the B chosen sequences, then the B rejected ones (``[2B, T]``)."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch.extras["num_pairs"] = torch.tensor(len(pairs))
    if all(p.ref is not None for p in pairs):
        batch.extras["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs])  # type: ignore[index]
    return batch


def unpaired_from(pairs: list[Pair]) -> list[Unpaired]:
    """KTO on pair data: each chosen completion is a desirable example, each rejected one an undesirable one."""
    return [example for p in pairs for example in (Unpaired(p.chosen, True), Unpaired(p.rejected, False))]


def collate_unpaired(examples: list[Unpaired], pad_id: int) -> Batch:
    """N examples, then N mismatched rows (example i's prompt with the completion of example i + N/2, half a
    batch away, so that the two sides of a split pair never meet), which KTO's KL estimate scores
    (``[2N, T]``); ``extras["desirable"]`` ``[N]``."""
    split = [prompt_length(e.sample) for e in examples]
    shift = max(1, len(examples) // 2)
    mismatched = []
    for i, example in enumerate(examples):
        j = (i + shift) % len(examples)
        other = examples[j].sample
        cut, other_cut = split[i], split[j]
        mismatched.append(Sample(example.sample.input_ids[:cut] + other.input_ids[other_cut:],
                                 example.sample.labels[:cut] + other.labels[other_cut:]))
    batch = collate([e.sample for e in examples] + mismatched, pad_id)
    batch.extras["num_pairs"] = torch.tensor(len(examples))
    batch.extras["desirable"] = torch.tensor([e.desirable for e in examples])
    return batch


def prompt_length(sample: Sample) -> int:
    """Where the completion starts: the first labelled position."""
    return next((i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))
