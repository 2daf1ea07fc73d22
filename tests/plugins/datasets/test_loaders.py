"""The converted files are what the kernel's loaders accept: pairs, KTO examples and SFT samples come out."""

from pathlib import Path

import pytest

from swiftk.contracts import IGNORE_INDEX
from swiftk.kernel.config import DataConfig, ModelConfig
from swiftk.kernel.data import build_dataset
from swiftk.kernel.model import load_tokenizer
from swiftk.plugins.datasets import SAMPLES, resolve_dataset

try:
    from swiftk.plugins.stages.pairs import build_pairs, build_unpaired
except ImportError:  # before the preference stages moved out of kernel/
    from swiftk.kernel.pairs import build_pairs, build_unpaired

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(model_id=str(REPO / "data" / "tiny_tokenizer")))


def test_preference_files_load_as_pairs_and_kto_examples(tok) -> None:
    for name, sample in (("hh-rlhf", "hh-rlhf/train.jsonl"), ("ultrafeedback", "ultrafeedback/train_prefs.jsonl")):
        path = str(resolve_dataset(name, task_type="dpo", dataset_path=SAMPLES / sample))
        pairs = build_pairs(path, tok, DataConfig(train_file=path, max_length=2048))
        assert len(pairs) == sum(1 for _ in open(path)) and pairs[0].chosen.input_ids != pairs[0].rejected.input_ids
        kto_path = str(resolve_dataset(name, task_type="kto", dataset_path=SAMPLES / sample))
        examples = build_unpaired(kto_path, tok, DataConfig(train_file=kto_path, max_length=2048))
        assert [e.desirable for e in examples[:2]] == [True, False] and len(examples) == 2 * len(pairs)


def test_sft_files_load_with_the_chat_template(tok) -> None:
    for name, sample in (("alpaca", "alpaca/alpaca_data.json"), ("sharegpt", "sharegpt/sharegpt.json")):
        path = str(resolve_dataset(name, dataset_path=SAMPLES / sample))
        samples = build_dataset(path, tok, DataConfig(train_file=path, max_length=2048))
        assert len(samples) == sum(1 for _ in open(path))
        assert all(IGNORE_INDEX in s.labels and any(t != IGNORE_INDEX for t in s.labels) for s in samples)
