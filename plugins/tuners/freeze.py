"""Freeze tuning (as LLaMA-Factory has it): only the last (or, negative, the first) N decoder layers train,
within them only ``freeze_trainable_modules``, plus ``freeze_extra_modules`` anywhere (a reward head always)."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field

from swiftk.contracts.tuners import Tuner, TunerConfig, TunerError, register_tuner

LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


class FreezeConfig(TunerConfig):
    """[train] keys of freeze: which layers, which modules within them, and which modules outside them train."""

    freeze_trainable_layers: int = Field(
        2, validation_alias=AliasChoices("freeze_trainable_layers", "freeze_layers"),
        description="freeze: the last N decoder layers train (negative: the first N)")
    freeze_trainable_modules: list[str] | Literal["all"] = Field(
        "all", description="freeze: within those layers, only these modules train (e.g. ['mlp', 'self_attn'])")
    freeze_extra_modules: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("freeze_extra_modules", "trainable_parameters"),
        description="freeze: modules outside the decoder layers that train too (e.g. ['embed_tokens', 'norm'])")


@register_tuner("freeze")
class Freeze(Tuner):
    """The chosen layers' weights train in place (fp32 master weights); every other weight is frozen."""

    config = FreezeConfig
    full_weights_master = True

    def apply(self, model: torch.nn.Module, train: Any, *, reward_head: bool) -> torch.nn.Module:
        extra = [*train.freeze_extra_modules, *(["score"] if reward_head else [])]
        freeze(model, train.freeze_trainable_layers, train.freeze_trainable_modules, extra)
        return model


def freeze(model: torch.nn.Module, count: int, modules: list[str] | str, extra: list[str]) -> None:
    """Set ``requires_grad`` on the parameters of the chosen layers (and ``extra`` modules) only."""
    indices = {int(m.group(1)) for name, _ in model.named_parameters() if (m := LAYER_INDEX.search(name))}
    if not indices:
        raise TunerError("[train] tuner_strategy = 'freeze': found no numbered decoder layers "
                         "(model.layers.N...) to choose from; use 'lora' or 'full'")
    ordered = sorted(indices)
    if count == 0 or abs(count) > len(ordered):
        raise TunerError(f"[train] freeze_trainable_layers = {count}: the model has {len(ordered)} layers; "
                         f"pick 1..{len(ordered)} (the last N) or -1..-{len(ordered)} (the first N)")
    chosen = set(ordered[-count:] if count > 0 else ordered[:-count])
    for name, param in model.named_parameters():
        match = LAYER_INDEX.search(name)
        in_layer = match is not None and int(match.group(1)) in chosen and (
            modules == "all" or any(has_part(name, m) for m in modules))
        param.requires_grad_(in_layer or any(has_part(name, m) for m in extra))
    if not any(p.requires_grad for p in model.parameters()):
        raise TunerError(f"[train] freeze_trainable_modules = {modules!r} matches no parameter of the chosen "
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
