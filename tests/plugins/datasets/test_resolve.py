"""Resolution: a dataset_path file or hub-layout folder, the HF caches, reuse, and the errors that say what to do."""

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from swiftk.plugins.datasets import (
    SAMPLES,
    ConversionError,
    DatasetNotFound,
    UnknownDataset,
    UnsupportedTask,
    find_dataset,
    resolve_dataset,
    summary,
)

HH = SAMPLES / "hh-rlhf" / "train.jsonl"


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_folder_in_the_hub_layout_reads_every_file_of_the_split(tmp_path: Path) -> None:
    for subset in ("harmless-base", "helpful-base"):  # as `huggingface-cli download Anthropic/hh-rlhf` leaves it
        (tmp_path / "hh" / subset).mkdir(parents=True)
        (tmp_path / "hh" / subset / "train.jsonl.gz").write_bytes(gzip.compress(HH.read_bytes()))
    (tmp_path / "hh" / "helpful-base" / "test.jsonl.gz").write_bytes(gzip.compress(HH.read_bytes()[:700]))
    path = resolve_dataset("Anthropic/hh-rlhf", dataset_path=tmp_path / "hh")
    assert lines(path) == lines(resolve_dataset("hh-rlhf", dataset_path=HH)) * 2
    assert "harmless-base/train.jsonl.gz, helpful-base/train.jsonl.gz" in summary(path)


def test_parquet_shards_of_the_mapped_split(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (SAMPLES / "ultrafeedback" / "train_prefs.jsonl").read_text().splitlines()]
    (tmp_path / "uf" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf/data/train_prefs-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "uf/data/train_sft-00000-of-00001.parquet")
    assert len(lines(resolve_dataset("HuggingFaceH4/ultrafeedback_binarized", dataset_path=tmp_path / "uf"))) == 4
    assert len(lines(resolve_dataset("ultrafeedback", task_type="sft", dataset_path=tmp_path / "uf"))) == 1


def test_the_converted_file_is_reused_until_the_source_changes(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    shutil.copy(HH, source)
    first = resolve_dataset("hh-rlhf", dataset_path=source)
    assert resolve_dataset("hh-rlhf", dataset_path=source) == first
    source.write_text("".join(HH.read_text().splitlines(keepends=True)[:3]))
    again = resolve_dataset("hh-rlhf", dataset_path=source)
    assert again != first and len(lines(again)) == 3


def test_a_snapshot_in_the_hub_cache_is_found(offline_caches: Path) -> None:
    repo = offline_caches / "hub" / "datasets--Anthropic--hh-rlhf"
    (repo / "snapshots" / "abc123" / "helpful-base").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    shutil.copy(HH, repo / "snapshots/abc123/helpful-base/train.jsonl")
    assert "hub cache" in summary(path := resolve_dataset("hh-rlhf")) and len(lines(path)) == 10


def test_the_datasets_cache_is_read_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def load_dataset(hub_id: str, split: str, cache_dir: str) -> datasets.Dataset:
        calls.append((hub_id, split, datasets.config.HF_HUB_OFFLINE))
        return datasets.Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "Hi!"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert lines(resolve_dataset("tatsu-lab/alpaca")) == [{"messages": [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}]
    assert calls == [("tatsu-lab/alpaca", "train", True)]


def test_without_a_local_copy_the_error_says_what_to_fetch_and_where_to_put_it(offline_caches: Path) -> None:
    with pytest.raises(DatasetNotFound) as caught:
        resolve_dataset("hh-rlhf", task_type="preference")
    message = str(caught.value)
    assert "huggingface-cli download Anthropic/hh-rlhf --repo-type dataset --local-dir data/hh-rlhf" in message
    assert 'data.dataset_path = "data/hh-rlhf"' in message
    assert str(offline_caches / "hub") in message and str(offline_caches / "datasets") in message


def test_a_folder_without_the_split_names_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "hh").mkdir()
    shutil.copy(HH, tmp_path / "hh" / "test.jsonl")
    with pytest.raises(DatasetNotFound, match=r"no files of split 'train' .*data files there: test.jsonl"):
        resolve_dataset("hh-rlhf", dataset_path=tmp_path / "hh")
    with pytest.raises(DatasetNotFound, match="does not exist"):
        resolve_dataset("hh-rlhf", dataset_path=tmp_path / "missing.jsonl")


def test_names_and_task_types_are_checked_with_suggestions() -> None:
    with pytest.raises(UnknownDataset, match="did you mean 'hh-rlhf'"):
        find_dataset("hh_rlfh")
    with pytest.raises(UnsupportedTask, match="does not serve task_type 'preference'; it serves 'sft'"):
        resolve_dataset("alpaca", task_type="preference")
    assert find_dataset("ANTHROPIC/HH-RLHF", task_type="kto").name == "hh-rlhf"


def test_a_row_in_another_layout_is_named_by_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "12+34=", "completion": "46"}\n')
    with pytest.raises(ConversionError, match=rf"{bad}:1: not a 'hh-rlhf' row .*KeyError.*'chosen'"):
        resolve_dataset("hh-rlhf", dataset_path=bad)
