"""Tests for datasets: label masks per format, reading files, truncation, packing, and the resumable loader."""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from swiftk.contracts import IGNORE_INDEX, Batch
from swiftk.kernel.config import DataConfig
from swiftk.kernel.data import Loader, Sample, Tokenize, build_dataset, collate, pack, read_rows
from swiftk.kernel.errors import DataError
from swiftk.kernel.tiny import build_char_tokenizer


def pad0(samples: list[Sample]) -> Batch:  # the kernel collator, padding with id 0
    return collate(samples, 0)

ROWS = [{"prompt": "12+34=", "completion": "46"}, {"prompt": "7+8=", "completion": "15"}]
CHAT = [
    {"role": "user", "content": "question1"},
    {"role": "assistant", "content": "answer1"},
    {"role": "user", "content": "question2"},
    {"role": "assistant", "content": "answer2"},
]


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    return build_char_tokenizer()


def tokenize(tok: Any, fmt: str, row: dict[str, Any], **cfg: Any) -> Sample:
    return Tokenize(tok, DataConfig(train_file="unused", **cfg), fmt)("row", row)


def labelled(tok: Any, sample: Sample) -> str:
    return tok.decode([t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX])


def write_jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ------------------------------------------------------------------------------------------ label masks


def test_prompt_completion_labels_the_completion_and_eos_only(tok: Any) -> None:
    sample = tokenize(tok, "prompt_completion", {"prompt": "12+34=", "completion": "46"})
    assert tok.decode(sample.input_ids) == "<s>12+34=46</s>"
    prompt_len = len("12+34=") + 1  # + <s>
    assert sample.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert sample.labels[prompt_len:] == sample.input_ids[prompt_len:]
    assert labelled(tok, sample) == "46</s>"


def test_messages_label_assistant_turns_only(tok: Any) -> None:
    sample = tokenize(tok, "messages", {"messages": CHAT})
    assert tok.decode(sample.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert labelled(tok, sample) == "answer1<|im_end|>\nanswer2<|im_end|>\n"


def test_system_prompt_is_added_only_when_the_row_has_none(tok: Any) -> None:
    added = tokenize(tok, "messages", {"messages": CHAT[:2]}, system_prompt="Be brief.")
    assert tok.decode(added.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    own = [{"role": "system", "content": "Be kind."}, *CHAT[:2]]
    kept = tokenize(tok, "messages", {"messages": own}, system_prompt="Be brief.")
    assert tok.decode(kept.input_ids) == tok.apply_chat_template(own, tokenize=False)
    assert labelled(tok, added) == labelled(tok, kept) == "answer1<|im_end|>\n"


def test_text_labels_every_token(tok: Any) -> None:
    sample = tokenize(tok, "text", {"text": "hello"})
    assert tok.decode(sample.input_ids) == "<s>hello</s>"
    assert sample.labels == sample.input_ids


# ------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("lines, fragments", [
    ([json.dumps(ROWS[0]), json.dumps(ROWS[1]), '{"prompt": "1+1=",'], [":3: not valid JSON"]),
    ([json.dumps(ROWS[0]), "", '{"prompt": "1+1="}'], [":3: row has no 'completion' field"]),
    ([], ["holds no rows"]),
    ([json.dumps({"prompt": "1+1=", "completion": "2" * 20})] * 2, ["none of the 2 samples", "max_length = 8",
                                                                    "truncation = 'drop'"]),
])
def test_bad_data_is_reported_with_file_and_line(
    tok: Any, tmp_path: Path, lines: list[str], fragments: list[str]
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as caught:
        build_dataset(path, tok, DataConfig(train_file=path, max_length=8, truncation="drop"))
    assert str(caught.value).startswith(path)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize("policy, text, trained", [
    ("right", "<s>1+2=12345", "12345"),
    ("left", "123456789</s>", "123456789</s>"),
])
def test_truncation_cuts_the_chosen_end(tok: Any, tmp_path: Path, policy: str, text: str, trained: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps({"prompt": "1+2=", "completion": "123456789"})])
    [sample] = build_dataset(path, tok, DataConfig(train_file=path, max_length=10, truncation=policy))
    assert tok.decode(sample.input_ids) == text
    assert labelled(tok, sample) == trained


def save_jsonl(path: Path) -> Path:
    write_jsonl(path := path.with_suffix(".jsonl"), [json.dumps(row) for row in ROWS])
    return path


def save_json(path: Path) -> Path:
    (path := path.with_suffix(".json")).write_text(json.dumps(ROWS))
    return path


def save_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), path := path.with_suffix(".parquet"))
    return path


def save_hf_dataset(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("save", [save_jsonl, save_json, save_parquet, save_hf_dataset])
def test_every_file_format_reads_the_same_rows(tmp_path: Path, save: Callable[[Path], Path]) -> None:
    path = save(tmp_path / "train")
    assert [row for _, row in read_rows(str(path))] == ROWS


# ------------------------------------------------------------------------------------------ packing


def documents(tok: Any) -> list[Sample]:
    pairs = [("12+34=", "46"), ("7+8=", "15"), ("99+1=", "100"), ("5+5=", "10"), ("123+4=", "127")]
    texts = [tokenize(tok, "text", {"text": "packed"})]  # its first token (<s>) is labelled before packing
    return texts + [tokenize(tok, "prompt_completion", {"prompt": p, "completion": c}) for p, c in pairs]


def split_documents(tok: Any, row: Sample) -> list[Sample]:
    """Each document starts with <s>; position ids are what is tested, so they do not find the boundaries."""
    starts = [i for i, t in enumerate(row.input_ids) if t == tok.bos_token_id] + [len(row.input_ids)]
    return [Sample(row.input_ids[a:b], row.labels[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


def test_pack_keeps_documents_whole_and_restarts_positions(tok: Any) -> None:
    docs = documents(tok)
    rows = pack(docs, 24)
    assert len(rows) < len(docs) and all(len(row.input_ids) <= 24 for row in rows)
    parts = [part for row in rows for part in split_documents(tok, row)]
    assert sorted(p.input_ids for p in parts) == sorted(d.input_ids for d in docs)
    for part in parts:
        doc = next(d for d in docs if d.input_ids == part.input_ids)
        assert part.labels == [IGNORE_INDEX, *doc.labels[1:]]  # not predicted from the previous document
    batch = collate(rows, tok.pad_token_id)
    assert batch.attention_mask is None
    for r, row in enumerate(rows):
        restarts = [p for part in split_documents(tok, row) for p in range(len(part.input_ids))]
        assert row.position_ids == batch.position_ids[r, : len(row.input_ids)].tolist() == restarts


def test_packed_documents_do_not_attend_to_each_other(tok: Any) -> None:
    """Each document's logits in a packed (and padded) batch equal its logits when run alone."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tok))
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    rows = pack(documents(tok), 24)
    batch = collate(rows, tok.pad_token_id)
    assert batch.num_tokens == sum(len(row.input_ids) for row in rows) < batch.input_ids.numel()  # no padding
    with torch.no_grad():
        # As the step loop calls it: with a KV cache, transformers ignores the packing in position_ids.
        packed = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits  # [B, T, V]
        for r, row in enumerate(rows):
            start = 0
            for doc in split_documents(tok, row):
                alone = model(input_ids=torch.tensor([doc.input_ids])).logits[0]  # [T, V]
                torch.testing.assert_close(packed[r, start : start + len(doc.input_ids)], alone, atol=1e-5, rtol=0)
                start += len(doc.input_ids)


# ------------------------------------------------------------------------------------------ loader


def numbered(n: int) -> list[Sample]:
    return [Sample([10 + i, 10 + i], [10 + i, 10 + i]) for i in range(n)]


def ids(batch: Batch) -> list[int]:
    return [i - 10 for i in batch.input_ids[:, 0].tolist()]


def test_loader_order_depends_only_on_the_seed() -> None:
    def take(seed: int) -> list[list[int]]:
        return [ids(b) for b in islice(Loader(numbered(10), 3, pad0, seed), 8)]

    assert take(1) == take(1)
    assert take(1) != take(2)
    assert sorted(i for batch in take(1)[:4] for i in batch) == list(range(10))  # one epoch, each sample once


def test_loader_resumes_exactly_from_its_state() -> None:
    first = Loader(numbered(10), 3, pad0, seed=5)
    batches = iter(first)
    for _ in range(5):  # into the second epoch (4 micro-batches each)
        next(batches)
    state = first.state_dict()
    expected = [ids(next(batches)) for _ in range(4)]
    resumed = Loader(numbered(10), 3, pad0, seed=5)
    resumed.load_state_dict(state)
    assert [ids(b) for b in islice(resumed, 4)] == expected


@pytest.mark.parametrize("seed, size", [(6, 10), (5, 11)])
def test_loader_refuses_a_state_from_other_data_or_seed(seed: int, size: int) -> None:
    state = Loader(numbered(10), 3, pad0, seed=5).state_dict()
    with pytest.raises(DataError, match="exact resume needs the same data and seed"):
        Loader(numbered(size), 3, pad0, seed=seed).load_state_dict(state)


def test_loader_rolls_over_into_a_reshuffled_epoch() -> None:
    loader = Loader(numbered(7), 3, pad0, seed=0)
    batches = [ids(b) for b in islice(loader, 6)]
    assert [len(b) for b in batches] == [3, 3, 1, 3, 3, 1]
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second
    assert loader.state_dict()["epoch"] == 1


def test_chat_style_prompt_completion_tokenizes_like_messages(tok: Any) -> None:
    """Rows rendered by the chat template get no extra BOS or EOS: the template writes its own tokens."""
    chat = tokenize(tok, "prompt_completion", {"prompt": [{"role": "user", "content": "12+34="}],
                                               "completion": [{"role": "assistant", "content": "46"}]})
    same = tokenize(tok, "messages", {"messages": [{"role": "user", "content": "12+34="},
                                                   {"role": "assistant", "content": "46"}]})
    assert (chat.input_ids, chat.labels) == (same.input_ids, same.labels)
    assert tok.decode(chat.input_ids).endswith("46<|im_end|>\n")


@pytest.mark.parametrize(("content", "message"), [
    ('{"messages": "hello"}\n', "test.jsonl:1: cannot render the row"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}\n',
     "test.jsonl:1: cannot render the row"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "test.jsonl:2: not UTF-8 text"),
])
def test_rows_that_cannot_be_rendered_or_decoded_are_data_errors(tmp_path: Path, tok: Any, content: str | bytes,
                                                                 message: str) -> None:
    path = tmp_path / "test.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        build_dataset(str(path), tok, DataConfig(train_file=str(path)))


def test_a_corrupt_parquet_file_is_a_data_error(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        build_dataset(str(path), tok, DataConfig(train_file=str(path)))
