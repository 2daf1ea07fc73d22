"""The built-in tuners on a tiny Llama: each trains the parameter set it promises, a reward head stays trainable,
their config models assemble into a [train] table, and a tuner registered from a plugin file is found by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import swiftk.plugins.tuners  # noqa: F401  (registers the built-ins)
from swiftk.contracts.registry import forget, import_source
from swiftk.contracts.tuners import Tuner, lookup_tuner, tuner_names
from swiftk.plugins.tuners.lora import QLoRAConfig


class GenericTrain(BaseModel):
    """The [train] keys every run has (a stand-in for kernel/config.py's TrainConfig)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)
    tuner_strategy: str = "lora"
    optimizer: str = "adamw"
    optimizer_config: dict[str, Any] = Field(default_factory=dict)


def train_table(tuner: str, **keys: Any) -> Any:
    """[train] assembled as the kernel does: the tuner's config model first, then the generic keys."""
    config = lookup_tuner(tuner).config
    bases = (GenericTrain,) if config is None else (config, GenericTrain)
    return create_model("TrainConfig", __base__=bases).model_validate({"tuner_strategy": tuner, **keys})


def tiny(reward_head: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    return (LlamaForSequenceClassification if reward_head else LlamaForCausalLM)(config)


def trained(tuner: str, reward_head: bool = False, **keys: Any) -> list[str]:
    model = lookup_tuner(tuner).apply(tiny(reward_head), train_table(tuner, **keys), reward_head=reward_head)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_all_six_built_ins_are_registered() -> None:
    assert {"full", "galore", "freeze", "lora", "dora", "qlora"} <= set(tuner_names())
    assert all(lookup_tuner(n).adapter for n in ("lora", "dora", "qlora"))
    assert all(lookup_tuner(n).full_weights_master for n in ("full", "galore", "freeze"))


@pytest.mark.parametrize("tuner", ["full", "galore"])
def test_full_trains_every_weight(tuner: str) -> None:
    assert len(trained(tuner)) == len(list(tiny().parameters()))


def test_freeze_trains_only_the_last_layers() -> None:
    names = trained("freeze", freeze_layers=2, trainable_parameters=["norm"])
    assert {n.split(".")[2] for n in names if ".layers." in n} == {"1", "2"}
    assert "model.norm.weight" in names and "lm_head.weight" not in names
    assert {n.split(".")[2] for n in trained("freeze", freeze_trainable_layers=-1) if ".layers." in n} == {"0"}


@pytest.mark.parametrize("tuner", ["lora", "dora"])
def test_lora_trains_only_the_adapter(tuner: str) -> None:
    names = trained(tuner, lora_target="q_proj,v_proj")
    assert names and all("lora_" in n for n in names) and all("q_proj" in n or "v_proj" in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names) == (tuner == "dora")


@pytest.mark.parametrize("tuner", ["lora", "freeze"])
def test_a_reward_head_stays_trainable(tuner: str) -> None:
    assert any(".score." in f".{n}" for n in trained(tuner, reward_head=True))
    assert not any("score" in n for n in trained(tuner, reward_head=False))


def test_config_models_own_their_keys_and_defaults() -> None:
    assert QLoRAConfig().quantization_bit == 4 and QLoRAConfig(quantization_bit=8).quantization_bit == 8
    assert train_table("dora").use_dora and train_table("lora", lora_target="all").lora_target_modules == "all-linear"
    galore = train_table("galore", galore_rank=16)
    assert (galore.optimizer, galore.optimizer_config["rank"]) == ("galore_adamw", 16)
    with pytest.raises(ValidationError, match="trains with the galore_adamw optimizer"):
        train_table("galore", optimizer="sgd")
    with pytest.raises(ValidationError, match="quantization_bit"):
        train_table("full", quantization_bit=4)  # not a key of full: only adapters train on a quantized base


def test_a_tuner_registered_in_a_plugin_file_is_found_by_name(tmp_path: Path) -> None:
    (tmp_path / "head_only.py").write_text(
        "from swiftk.contracts.tuners import Tuner, register_tuner\n\n"
        "@register_tuner('head_only')\n"
        "class HeadOnly(Tuner):\n"
        "    def apply(self, model, train, *, reward_head):\n"
        "        model.requires_grad_(False)\n"
        "        model.lm_head.requires_grad_(True)\n"
        "        return model\n")
    module = import_source(str(tmp_path / "head_only.py"))
    try:
        tuner = lookup_tuner("head_only")
        assert isinstance(tuner, Tuner) and tuner.name == "head_only" and tuner.config is None
        assert trained("head_only") == ["lm_head.weight"]
    finally:
        forget(module.__file__)
