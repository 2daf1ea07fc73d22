"""Tuners, as the kernel uses them: ``[train] tuner_strategy`` names a registered tuner (built-ins in
plugins/tuners/: full, galore, freeze, lora, dora, qlora), which decides which weights train; this module looks
it up, applies what is common to every tuner (gradient checkpointing), and holds the checkpoint helpers that
work on any tuner's trainable set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

import swiftk.plugins.tuners  # noqa: F401  (registers the built-in tuners)
from swiftk.contracts.tuners import Tuner, TunerError, lookup_tuner, save_pretrained
from swiftk.kernel.errors import ModelLoadError

__all__ = ["apply_tuner", "base_fingerprint", "load_trainable", "merged", "quantization_config",
           "save_final", "save_merged", "trainable_weights", "tuner_of"]


def tuner_of(train: Any) -> Tuner:
    """The tuner ``[train] tuner_strategy`` names."""
    return lookup_tuner(train.tuner_strategy)


def quantization_config(train: Any) -> Any:
    """The ``BitsAndBytesConfig`` the frozen base loads with, or None when it is not quantized."""
    try:
        return tuner_of(train).quantization(train)
    except TunerError as exc:
        raise ModelLoadError(str(exc)) from exc


def apply_tuner(model: PreTrainedModel, train: Any, *, reward_head: bool | None = None) -> torch.nn.Module:
    """Wrap or freeze ``model`` as ``[train] tuner_strategy`` says; returns the module to train.

    ``reward_head``: the model is a sequence classifier whose score head must train (None: read from the
    model's class).
    """
    if reward_head is None:
        reward_head = type(model).__name__.endswith("ForSequenceClassification")
    if train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    try:
        tuned = tuner_of(train).apply(model, train, reward_head=reward_head)
    except TunerError as exc:
        raise ModelLoadError(str(exc)) from exc
    if train.gradient_checkpointing and not all(p.requires_grad for p in tuned.parameters()):
        tuned.enable_input_require_grads()  # frozen first blocks: checkpointed blocks still need an input with grad
    return tuned


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
    """A cheap checksum of the frozen weights, so a LoRA resume on a different base model is refused. Adapter
    weights are the run's, not the base's: left out even where a stage freezes them (the vlm stage's frozen vision
    tower keeps its randomly initialised adapters)."""
    adapters = set(getattr(model, "peft_config", {}))  # PEFT names each adapter's tensors ...lora_A.<adapter>...
    with torch.no_grad():
        total = sum(float(p.double().sum()) for name, p in model.named_parameters()
                    if not p.requires_grad and adapters.isdisjoint(name.split(".")))
    return f"{total:.6e}"


def save_final(model: torch.nn.Module, tokenizer: object, out_dir: Path, train: Any = None) -> Path:
    """The trained result in the format its ecosystem loads, as the run's tuner writes it (a PEFT adapter folder,
    or an HF model folder); without ``train``, the plain ``save_pretrained``."""
    if train is None:
        return save_pretrained(model, tokenizer, out_dir)
    return tuner_of(train).save(model, tokenizer, out_dir)


def merged(model: torch.nn.Module, train: Any) -> torch.nn.Module:
    """The model with what the tuner trained folded in (LoRA: into the base, in the base weights' dtype)."""
    return tuner_of(train).merge(model)


def save_merged(model: torch.nn.Module, tokenizer: object, out_dir: Path, train: Any) -> Path:
    """A plain HF model folder of the merged model."""
    return save_final(merged(model, train), tokenizer, out_dir)
