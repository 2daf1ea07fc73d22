"""A dataset registered by a plugin file or an entry point resolves like a built-in; a clash names both files."""

import importlib.metadata
import json
from pathlib import Path

import pytest

from swiftk.contracts.registry import import_source
from swiftk.plugins.datasets import (
    DatasetError,
    UnknownDataset,
    find_dataset,
    forget_source,
    register_dataset,
    registry,
    resolve_dataset,
)

PLUGIN = '''
from swiftk.plugins.datasets import register_dataset

def to_completion(row):
    """{"q": str, "a": str}"""
    return {"prompt": row["q"], "completion": row["a"]}

register_dataset("toy-qa", hub_id="someone/toy-qa", converters={"sft": to_completion})
'''


def test_a_plugin_file_registers_a_dataset_that_resolves(tmp_path: Path) -> None:
    (tmp_path / "toy_qa.py").write_text(PLUGIN)
    (tmp_path / "qa.jsonl").write_text('{"q": "2+2=", "a": "4"}\n')
    import_source(str(tmp_path / "toy_qa.py"))  # as the kernel imports a config's `plugins = [...]` file
    try:
        path = resolve_dataset("someone/toy-qa", dataset_path=tmp_path / "qa.jsonl")
        assert json.loads(path.read_text()) == {"prompt": "2+2=", "completion": "4"}
    finally:
        forget_source(str((tmp_path / "toy_qa.py").resolve()))
    with pytest.raises(UnknownDataset):
        find_dataset("toy-qa")


def test_an_entry_point_registers_its_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toy_ep_datasets.py").write_text(
        "from swiftk.plugins.datasets import DatasetSpec\nfrom swiftk.plugins.datasets.alpaca import to_messages\n"
        "SPECS = [DatasetSpec('toy-alpaca', 'someone/toy-alpaca', {'sft': to_messages})]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint("toy", "toy_ep_datasets:SPECS", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert find_dataset("toy-alpaca", task_type="sft").hub_id == "someone/toy-alpaca"
    finally:
        registry.forget("toy-alpaca")


def test_a_name_taken_by_another_file_is_refused() -> None:
    with pytest.raises(DatasetError, match=r"'hh-rlhf' is registered twice: .*hh_rlhf\.py and .*test_registration"):
        register_dataset("hh-rlhf", hub_id="me/hh", converters={"sft": dict})
    with pytest.raises(DatasetError, match="converters must map task types"):
        register_dataset("mine", hub_id="me/mine", converters={"dpo": dict})
