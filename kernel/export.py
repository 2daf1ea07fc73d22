"""``swiftk export``: a finished run's model as a merged HF folder, a bitsandbytes-quantized HF folder, or a
GGUF file for llama.cpp-family runtimes.

What is exported is ``RUN_DIR/final``: a PEFT adapter (lora, qlora, dora) is put back on the base model that
``RUN_DIR/config.toml`` names, rebuilt exactly as in training (quantized, for QLoRA) and checked against the
base-weights fingerprint the run's checkpoints recorded; a full model (full, galore, freeze) is read as is.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from swiftk.kernel import checkpoint
from swiftk.kernel.config import RunConfig, load_config, stage_class
from swiftk.kernel.errors import SwiftkError

QUANTIZE = ("bnb-nf4", "bnb-int8", "gptq", "awq", "fp8")
GGUF_TYPES = ("f16", "q8_0")
NEEDS_LLM_COMPRESSOR = ("gptq", "awq", "fp8")


class ExportError(SwiftkError):
    """The run cannot be exported as asked."""


@dataclass
class Trained:
    """A run's trained model as it was at the end of training."""

    model: torch.nn.Module  # a PeftModel for adapter runs
    tokenizer: Any
    cfg: RunConfig
    adapter: bool


def export(run_dir: str | Path, out: str | Path, merge: bool = False, quantize: str | None = None,
           gguf: str | None = None, overwrite: bool = False) -> list[str]:
    """Write what was asked into ``out``; returns the lines that say what was written."""
    run_dir, out = Path(run_dir), Path(out)
    if quantize in NEEDS_LLM_COMPRESSOR:
        raise ExportError(
            f"--quantize {quantize}: swiftk writes GPTQ, AWQ and FP8 checkpoints through llm-compressor, which pins "
            f"an older transformers than this environment's and so is not installed with swiftk. Export the merged "
            f"model (`swiftk export {run_dir} --merge --out DIR`), then in a separate venv `pip install llmcompressor` "
            f"and run its `oneshot(model=DIR, recipe=...)` (a GPU is needed for GPTQ/AWQ calibration at any size). "
            f"On CPU here: --quantize bnb-nf4 | bnb-int8, or --gguf q8_0.")
    if quantize and gguf:
        raise ExportError("give --quantize or --gguf, not both")
    if not (merge or quantize or gguf):
        raise ExportError("nothing to export: add --merge (merged HF folder), --quantize bnb-nf4|bnb-int8 or "
                          "--gguf f16|q8_0")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    final = run_dir / "final"
    if merge and final.is_dir() and not (final / "adapter_config.json").is_file():
        raise ExportError(
            f"--merge: {run_dir} has no adapter to merge ({final} is a full HF model folder: the run trained the "
            f"model itself, with tuner_strategy full, galore or freeze). Use it as is, or export it with --quantize "
            f"or --gguf.")
    if gguf and final.is_dir():  # before the (slow) model load
        from transformers import AutoTokenizer

        check_bpe(AutoTokenizer.from_pretrained(final))
    trained = load_trained(run_dir)
    lines = []
    model = trained.model
    if trained.adapter:
        from swiftk.kernel.tuners import merged

        model = merged(model, trained.cfg.train)
        lines.append(f"merged the {trained.cfg.train.tuner_strategy} adapter into the base ({model.dtype})")
    out.mkdir(parents=True, exist_ok=True)
    if quantize:
        write_bnb(model, trained.tokenizer, out, quantize)
        lines.append(f"{out} ({quantize} HF folder; AutoModelForCausalLM.from_pretrained loads it)")
    elif gguf:
        source = gguf_source(trained.cfg)
        path = write_gguf(model, trained.tokenizer, out / f"{run_dir.resolve().name}-{gguf}.gguf", gguf, source)
        lines.append(f"{path} (GGUF {gguf}; llama.cpp, or transformers with gguf_file=)")
    else:
        from swiftk.kernel.tuners import save_final

        save_final(model, trained.tokenizer, out)
        lines.append(f"{out} (merged HF folder, safetensors)")
    return lines


def load_trained(run_dir: Path) -> Trained:
    """``run_dir/final`` as a model: the adapter back on its rebuilt base, or the full model folder."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    final = run_dir / "final"
    if not (run_dir / "config.toml").is_file():
        raise ExportError(f"{run_dir} is not a swiftk run directory (no config.toml)")
    if not final.is_dir():
        raise ExportError(f"{final} does not exist: the run did not finish, or ran with [output] save_final = "
                          f"false. Resume it to the end (`swiftk run CONFIG --resume`) first.")
    cfg = load_config(run_dir / "config.toml", saved=True)
    tokenizer = AutoTokenizer.from_pretrained(final)
    if not (final / "adapter_config.json").is_file():
        auto = AutoModelForSequenceClassification if stage_class(cfg.train).reward_head else AutoModelForCausalLM
        return Trained(auto.from_pretrained(final).eval(), tokenizer, cfg, adapter=False)
    return Trained(rebuild_adapter_model(run_dir, cfg, tokenizer).eval(), tokenizer, cfg, adapter=True)


def rebuild_adapter_model(run_dir: Path, cfg: RunConfig, tokenizer: Any) -> torch.nn.Module:
    """The base as training built it (same loader, seed, quantization and tuner), with the trained adapter."""
    from peft import set_peft_model_state_dict

    from swiftk.kernel.model import load_model, pick_device
    from swiftk.kernel.run import seed_everything
    from swiftk.kernel.tuners import apply_tuner, base_fingerprint, quantization_config

    seed_everything(cfg.train.seed)  # a random-init base is rebuilt from the run's seed
    pad_id = tokenizer.pad_token_id if stage_class(cfg.train).reward_head else None
    # The device training used where there is one: 4-bit codes are computed by the device's own kernels.
    device = pick_device(cfg.model.device) if torch.cuda.is_available() else torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_model(cfg.model, len(tokenizer), device, reward_head_pad_id=pad_id,
                          quantization=quantization_config(cfg.train))
        model = apply_tuner(base, cfg.train.model_copy(update={"gradient_checkpointing": False}))
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        recorded = json.loads((latest / "meta.json").read_text()).get("base_fingerprint")
        if recorded is not None and recorded != base_fingerprint(model):
            raise ExportError(
                f"the base model rebuilt from {run_dir / 'config.toml'} is not the one the run trained on (weights "
                f"fingerprint {base_fingerprint(model)} vs {recorded} in {latest}): [model] {cfg.model.model_id} "
                f"changed since, or its random init is not reproducible. Export from a saved base model.")
    adapter = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise ExportError(f"{run_dir / 'final'}: adapter weights {result.unexpected_keys[:3]} do not fit the model "
                          f"the run's config builds")
    return model


# ---------------------------------------------------------------------------------------------- bitsandbytes


def write_bnb(model: torch.nn.Module, tokenizer: Any, out: Path, kind: str) -> None:
    """Quantize on load from a plain copy, then save: transformers writes (and reloads) bnb-quantized folders."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from swiftk.kernel.tuners import save_final

    if kind == "bnb-int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="swiftk-export-") as folder:
        save_final(model, tokenizer, Path(folder))
        device = next(model.parameters()).device
        quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                         device_map={"": str(device)})
        save_final(quantized, tokenizer, out)


# ---------------------------------------------------------------------------------------------- GGUF

# transformers (Llama) name -> llama.cpp name, per decoder layer
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str | None:
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        role = LAYER_TENSORS.get(".".join(parts[3:-1]))
        return f"blk.{parts[2]}.{role}.weight" if role else None
    return None


def permute_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows with the rotary halves interleaved per head (Meta's layout); transformers
    keeps them split. This is llama.cpp's ``permute``; transformers' GGUF loader undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, kind: str, source_gguf: Path | None) -> Path:
    """A GGUF v3 file of a Llama-family model: f16 (norms f32) or q8_0 (matrices whose rows split into 32-value
    blocks; the rest f16), with the tokenizer and chat template in its metadata."""
    config = model.config
    if config.model_type != "llama":
        raise ExportError(f"--gguf writes Llama-family models; this one is '{config.model_type}'. Convert the "
                          f"merged folder with llama.cpp's convert_hf_to_gguf.py instead.")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"--gguf: rope scaling '{rope.get('rope_type')}' is not written; use llama.cpp's "
                          f"convert_hf_to_gguf.py on the merged folder")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    unknown = [k for k in state if gguf_name(k) is None]
    if unknown:
        raise ExportError(f"--gguf: tensors {unknown[:3]} have no llama.cpp name (biases or extra modules); "
                          f"convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    file_type = gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem.replace("mistral", "m-istral"))  # transformers reads a "mistral" name as Mistral
    writer.add_file_type(int(file_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(state["model.embed_tokens.weight"].shape[0])
    write_tokenizer(writer, tokenizer, state["model.embed_tokens.weight"].shape[0], source_gguf)
    for name, tensor in state.items():
        if name.endswith("q_proj.weight"):
            tensor = permute_heads(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_heads(tensor, kv_heads)
        add_tensor(writer, gguf_name(name), tensor.numpy(), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tensor(writer: Any, name: str | None, data: np.ndarray, kind: str) -> None:
    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == "q8_0" and data.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, source_gguf: Path | None) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" model: tokens by id, their types, the merges."""
    spec = check_bpe(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: token for i, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(source_gguf))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for token, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                       ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, token, None) is not None:
            add(getattr(tokenizer, token))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def check_bpe(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's JSON spec; refuses what llama.cpp's "gpt2" tokenizer model cannot express."""
    spec: dict[str, Any] = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError(f"--gguf writes byte-level BPE (GPT-2 style) tokenizers; this one is a "
                          f"{spec['model']['type']} tokenizer")
    return spec


def pre_tokenizer_name(source_gguf: Path | None) -> str:
    """llama.cpp picks its pre-tokenizer regex by name: keep the source GGUF's, else GPT-2's."""
    if source_gguf is not None:
        field = gguf.GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return "gpt-2"


def gguf_source(cfg: RunConfig) -> Path | None:
    if not cfg.model.gguf_file:
        return None
    from swiftk.kernel.model import resolve_source

    return Path(resolve_source(cfg.model.model_id), cfg.model.gguf_file)
