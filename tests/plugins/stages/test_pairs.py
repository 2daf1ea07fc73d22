"""Preference data: every accepted row shape, bad rows named by file:line, batches, and sequence log-probs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from swiftk.contracts import IGNORE_INDEX, sequence_logps
from swiftk.kernel.config import DataConfig, ModelConfig
from swiftk.kernel.errors import DataError
from swiftk.kernel.model import load_tokenizer
from swiftk.plugins.stages.pairs import build_pairs, build_unpaired, collate_pairs, pair_fields

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(model_id=str(REPO / "data" / "tiny_tokenizer")))


def write(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(path: str, **kw) -> DataConfig:
    return DataConfig(train_file=path, max_length=64, **kw)


def test_plain_pairs_mask_the_prompt_and_differ_only_in_the_completion(tmp_path: Path, tok) -> None:
    path = write(tmp_path, [{"prompt": "12+34=", "chosen": "46", "rejected": "56"}])
    [pair] = build_pairs(path, tok, cfg(path))
    for side, text in ((pair.chosen, "46"), (pair.rejected, "56")):
        scored = [t for t in side.labels if t != IGNORE_INDEX]
        assert tok.decode(scored).startswith(text)  # the completion (and EOS) only
    n_prompt = pair.chosen.labels.index(next(t for t in pair.chosen.labels if t != IGNORE_INDEX))
    assert pair.chosen.input_ids[:n_prompt] == pair.rejected.input_ids[:n_prompt]


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"
    prompt, c, r = pair_fields("f.jsonl:1", {"chosen": chosen, "rejected": rejected})
    assert prompt.endswith("2+2?\n\nAssistant:") and (c, r) == (" 4", " 5")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": "b"}, "no 'rejected' field"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical"),
    ({"prompt": "a", "chosen": "  ", "rejected": "b"}, "chosen completion is empty"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: X\n\nAssistant: c"}, "same prompt"),
    ({"chosen": "just text", "rejected": "other text"}, "no 'Assistant:' turn"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path: Path, tok, row: dict, message: str) -> None:
    path = write(tmp_path, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, row])
    with pytest.raises(DataError, match=message) as caught:
        build_pairs(path, tok, cfg(path))
    assert f"{path}:2" in str(caught.value)


def test_unpaired_rows_keep_their_label_and_check_it(tmp_path: Path, tok) -> None:
    path = write(tmp_path, [{"prompt": "1+1=", "completion": "2", "label": True},
                            {"prompt": "1+1=", "completion": "3", "label": False}])
    assert [e.desirable for e in build_unpaired(path, tok, cfg(path))] == [True, False]
    bad = write(tmp_path, [{"prompt": "1+1=", "completion": "2", "label": "yes"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: 'label' must be true or false"):
        build_unpaired(bad, tok, cfg(bad))


def test_a_pair_batch_is_chosen_then_rejected(tmp_path: Path, tok) -> None:
    path = str(REPO / "data" / "synthetic" / "addition_pref_eval.jsonl")
    pairs = build_pairs(path, tok, cfg(path))[:3]
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch.input_ids.shape[0] == 6 and int(batch.extras["num_pairs"]) == 3
    assert batch.input_ids[1, : len(pairs[1].chosen.input_ids)].tolist() == pairs[1].chosen.input_ids
    assert batch.input_ids[4, : len(pairs[1].rejected.input_ids)].tolist() == pairs[1].rejected.input_ids


def test_sequence_logps_by_hand() -> None:
    """Row 0 scores tokens 1 and 0 at positions 1 and 2: log(e^2/(e^2+1)) + log(1/2); row 1 scores nothing."""
    logits = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [5.0, 5.0]],
                           [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # [B=2, T=3, V=2]
    labels = torch.tensor([[IGNORE_INDEX, 1, 0], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    logps, counts = sequence_logps(logits, labels)
    expected = math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(0.5)
    torch.testing.assert_close(logps, torch.tensor([expected, 0.0]))
    assert counts.tolist() == [2, 0]


def test_reversal_pairs_are_held_out_near_misses() -> None:
    """The learning tests' pairs (tests/kernel/test_preference_learning.py): no eval word is trained on, chosen is the
    reversal, rejected the reversal with half its letters (at least one) wrong."""
    rows = {split: [json.loads(line) for line in (REPO / "data" / "synthetic" / f"reversal_pref_{split}.jsonl").open()]
            for split in ("train", "eval")}
    assert len(rows["train"]) == 2000 and len(rows["eval"]) == 100
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["eval"]}
    for row in rows["train"] + rows["eval"]:
        word = row["prompt"].removeprefix("reverse ").removesuffix("=")
        wrong = sum(a != b for a, b in zip(row["chosen"], row["rejected"], strict=True))
        assert row["chosen"] == word[::-1] and wrong == max(1, len(word) // 2)
