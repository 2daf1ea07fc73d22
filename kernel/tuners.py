"""Tuners: which weights train, and how the frozen ones are stored.

  full     every weight trains (fp32 master weights, AdamW state for each)
  galore   every weight trains; the optimizer keeps low-rank state (see plugins/optimizers/galore.py)
  freeze   only the last ``freeze_trainable_layers`` decoder layers (and ``freeze_extra_modules``) train
  lora     a PEFT LoRA adapter on a frozen base (``use_rslora``, ``use_dora``, ``modules_to_save``)
  dora     LoRA with DoRA's magnitude vector (Liu et al. 2024)
  qlora    LoRA on a base loaded in 4 bits (NF4/FP4, bitsandbytes) or 8 bits (Dettmers et al. 2023)
"""

from __future__ import annotations

import copy
import importlib.util
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from swiftk.kernel.config import ADAPTER_TUNERS, TrainConfig
from swiftk.kernel.errors import ModelLoadError


def quantization_config(cfg: TrainConfig) -> Any:
    """The ``BitsAndBytesConfig`` the frozen base loads with, or None when it is not quantized."""
    if cfg.quantization_bit is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"[train] quantization_bit = {cfg.quantization_bit} needs bitsandbytes: "
                             f"pip install 'bitsandbytes>=0.50' (or swiftk[optim])")
    from transformers import BitsAndBytesConfig

    if cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.bnb_4bit_compute_dtype),
    )


def apply_tuner(model: PreTrainedModel, cfg: TrainConfig) -> torch.nn.Module:
    """Wrap or freeze ``model`` as ``[train] tuner_strategy`` says; returns the module to train."""
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.tuner_strategy in ("full", "galore"):
        model.requires_grad_(True)
        return model
    if cfg.tuner_strategy == "freeze":
        freeze(model, cfg)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # the first blocks are frozen: their output must still need grad
        return model
    assert cfg.tuner_strategy in ADAPTER_TUNERS
    if getattr(model, "is_quantized", False):
        # Casts the remaining (norm, embedding) weights to fp32 and readies the inputs for checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type="SEQ_CLS" if cfg.stage == "rm" else "CAUSAL_LM",  # SEQ_CLS also trains the new reward head
    )
    try:
        # Adapter weights stay float32 whatever the base dtype (peft's autocast_adapter_dtype): fp32 master weights.
        peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise ModelLoadError(f"[train] lora_target_modules = {cfg.lora_target_modules!r}: {str(exc).splitlines()[0]} "
                             f"(this model's linear layers: {', '.join(linear_names(model)) or 'none'})") from exc
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return peft_model


LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def freeze(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """LLaMA-Factory's freeze tuning: only the last (or, negative, the first) N decoder layers train, within
    them only ``freeze_trainable_modules``, plus ``freeze_extra_modules`` anywhere (a reward head always)."""
    indices = {int(m.group(1)) for name, _ in model.named_parameters() if (m := LAYER_INDEX.search(name))}
    if not indices:
        raise ModelLoadError("[train] tuner_strategy = 'freeze': found no numbered decoder layers "
                             "(model.layers.N...) to choose from; use 'lora' or 'full'")
    count = cfg.freeze_trainable_layers
    ordered = sorted(indices)
    chosen = set(ordered[-count:] if count > 0 else ordered[:-count])
    if count == 0 or abs(count) > len(ordered):
        raise ModelLoadError(f"[train] freeze_trainable_layers = {count}: the model has {len(ordered)} layers; "
                             f"pick 1..{len(ordered)} (the last N) or -1..-{len(ordered)} (the first N)")
    modules = cfg.freeze_trainable_modules
    extra = [*cfg.freeze_extra_modules, *(["score"] if cfg.stage == "rm" else [])]
    for name, param in model.named_parameters():
        match = LAYER_INDEX.search(name)
        in_layer = match is not None and int(match.group(1)) in chosen and (
            modules == "all" or any(has_part(name, m) for m in modules))
        param.requires_grad_(in_layer or any(has_part(name, m) for m in extra))
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelLoadError(f"[train] freeze_trainable_modules = {modules!r} matches no parameter of the chosen "
                             f"layers; module names there: {', '.join(layer_module_names(model, min(chosen)))}")


def has_part(name: str, part: str) -> bool:
    """``part`` is a run of whole dotted components of ``name`` ("mlp", "model.embed_tokens")."""
    return f".{part}." in f".{name}."


def layer_module_names(model: torch.nn.Module, index: int) -> list[str]:
    names = set()
    for name, _ in model.named_parameters():
        match = LAYER_INDEX.search(name)
        if match and int(match.group(1)) == index:
            names.add(name[match.end():].split(".")[0])
    return sorted(names)


def linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__})


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold to restore training: exactly the trainable parameters."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    expected = trainable_weights(model)
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint weights do not match this model's trainable parameters: {len(missing)} missing "
            f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]}); "
            f"was it written with another tuner_strategy or LoRA settings?"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            expected[name].copy_(tensor)


def base_fingerprint(model: torch.nn.Module) -> str:
    """A cheap checksum of the frozen weights, so a LoRA resume on a different base model is refused."""
    with torch.no_grad():
        total = sum(float(p.double().sum()) for p in model.parameters() if not p.requires_grad)
    return f"{total:.6e}"


def save_final(model: torch.nn.Module, tokenizer: object, out_dir: Path) -> Path:
    """The trained result in the format its ecosystem loads: a PEFT adapter folder, or an HF model folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # peft looks for the base model's config.json beside a GGUF file and warns that there is none.
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)  # type: ignore[attr-defined]
    finally:
        hf_logging.enable_progress_bar()
    return out_dir


def merged_model(model: PeftModel) -> PreTrainedModel:
    """The base with the adapter folded in, as a plain (unquantized) transformers model. Consumes ``model``.

    A quantized base (QLoRA) is dequantized first, to the compute dtype, and the adapter merged into that:
    the adapter was trained against the dequantized weights, so the merged model computes what the adapter
    model computed. (Merging into the 4-bit weights would round the update away; merging into the original
    16-bit weights would add the adapter to weights it never saw.)
    """
    base = model.get_base_model()
    quantization = getattr(base.config, "quantization_config", None)
    if getattr(base, "is_quantized", False) and quantization is not None:
        lora = copy.deepcopy(model.peft_config["default"])
        compute = getattr(quantization, "bnb_4bit_compute_dtype", None)
        if isinstance(quantization, dict):
            compute = quantization.get("bnb_4bit_compute_dtype")
        dtype = getattr(torch, compute) if isinstance(compute, str) else compute or torch.float32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft looks for a config.json beside the base; dequantize says its dtype
            adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            plain = model.unload().dequantize(dtype=dtype)
        model = get_peft_model(plain, lora)
        set_peft_model_state_dict(model, adapter)
        return model.merge_and_unload().to(dtype)  # prepare_model_for_kbit_training left norms in fp32
    return model.merge_and_unload()


def save_merged(model: torch.nn.Module, tokenizer: object, out_dir: Path) -> Path:
    """Fold the LoRA weights into the base and write a plain HF model folder (in the base weights' dtype)."""
    merged = merged_model(model) if isinstance(model, PeftModel) else model
    return save_final(merged, tokenizer, out_dir)
