"""Tuners: which weights train. Full fine-tuning, or LoRA adapters through PEFT."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from swiftk.kernel.config import TrainConfig


def apply_tuner(model: PreTrainedModel, cfg: TrainConfig) -> torch.nn.Module:
    """Wrap or freeze ``model`` as ``[train] tuner_strategy`` says; returns the module to train."""
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.tuner_strategy == "full":
        model.requires_grad_(True)
        return model
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="SEQ_CLS" if cfg.stage == "rm" else "CAUSAL_LM",  # SEQ_CLS also trains the new reward head
    )
    # Adapter weights stay float32 whatever the base dtype (peft's autocast_adapter_dtype): fp32 master weights.
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return peft_model


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


def save_merged(model: torch.nn.Module, tokenizer: object, out_dir: Path) -> Path:
    """Fold the LoRA weights into the base and write a plain HF model folder (in the base weights' dtype)."""
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    return save_final(merged, tokenizer, out_dir)
