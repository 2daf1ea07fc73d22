"""What an engine in its own process loads: HF folders of the base model (converted once, cached) and adapters."""

from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from swiftk.contracts import Adapter
from swiftk.kernel import engine_files
from swiftk.kernel.config import ModelConfig
from swiftk.kernel.errors import ModelLoadError
from swiftk.kernel.model import load_tokenizer
from swiftk.plugins.generators.vllm import write_adapter

TOKENIZER = "data/tiny_tokenizer"


def tiny(vocab: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=vocab,
        tie_word_embeddings=True))


def test_an_hf_folder_is_used_as_is_and_another_source_is_converted_once(tmp_path: Path) -> None:
    tok = load_tokenizer(ModelConfig(model_id=TOKENIZER))
    complete = tmp_path / "complete"
    tiny(len(tok)).save_pretrained(complete)
    tok.save_pretrained(complete)
    assert engine_files.model_folder(ModelConfig(model_id=str(complete)), tok) == complete
    weights_only = tmp_path / "weights-only"  # no tokenizer files: the trainer's tokenizer is written beside them
    tiny(len(tok)).save_pretrained(weights_only)
    cfg = ModelConfig(model_id=str(weights_only), tokenizer=TOKENIZER)
    folder = engine_files.model_folder(cfg, tok, cache_dir=tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" and engine_files.is_hf_folder(folder)
    (folder / "model.safetensors").write_bytes(b"")  # a second call reuses the cache, it does not convert again
    assert engine_files.model_folder(cfg, tok, cache_dir=tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_size == 0


def test_a_peft_models_base_is_saved_under_hf_names_without_adapters_tied_once(tmp_path: Path) -> None:
    tok = load_tokenizer(ModelConfig(model_id=TOKENIZER))
    base = tiny(len(tok))
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    cfg = ModelConfig(model_id="unused", init="random", architecture={"model_type": "llama"})
    with pytest.raises(ModelLoadError, match="needs the live model"):
        engine_files.model_folder(cfg, tok, cache_dir=tmp_path)
    folder = engine_files.model_folder(cfg, tok, model=peft, cache_dir=tmp_path)
    saved = load_file(folder / "model.safetensors")
    assert not any("lora" in n or "base_layer" in n for n in saved) and "lm_head.weight" not in saved  # tied
    torch.testing.assert_close(saved["model.layers.0.self_attn.q_proj.weight"],
                               base.model.layers[0].self_attn.q_proj.base_layer.weight)
    loaded = transformers.LlamaForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(loaded.lm_head.weight, base.model.embed_tokens.weight)


def test_an_adapter_folder_holds_peft_names_and_a_json_config(tmp_path: Path) -> None:
    peft = get_peft_model(tiny(64), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    state = get_peft_model_state_dict(peft)
    folder = write_adapter(Adapter(state, peft.peft_config["default"].to_dict()), tmp_path / "a")
    from peft import PeftModel

    again = PeftModel.from_pretrained(tiny(64), folder)
    for name, tensor in get_peft_model_state_dict(again).items():
        torch.testing.assert_close(tensor, state[name])
