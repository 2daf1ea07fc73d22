"""The tuner contract: which weights of a model train, how the frozen rest is stored, how the result is saved.

A tuner is a class registered by name (``[train] tuner_strategy = "NAME"``)::

    @register_tuner("lora")
    class LoRA(Tuner):
        config = LoraConfig        # the [train] keys it owns (a pydantic model, fields with their aliases)
        adapter = True             # trains a PEFT adapter on a frozen base

        def apply(self, model, train, *, reward_head):
            ...                    # returns the module to train

The kernel assembles ``[train]`` from the generic training keys, the stage's keys and the chosen tuner's
``config``, so ``train`` is one object and a tuner reads its own keys as attributes (``train.lora_rank``).
A tuner never learns the stage's name: what it needs from the stage arrives as arguments (``reward_head``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from swiftk.contracts.registry import lookup, register, registered

KIND = "tuner"
T = TypeVar("T", bound="type[Tuner]")


class TunerError(ValueError):
    """A tuner cannot apply itself to this model with these settings; the message names the [train] key."""


class TunerConfig(BaseModel):
    """Base of a tuner's own ``[train]`` keys. The kernel merges it with the generic ``[train]`` table and the
    stage's keys, so a tuner's key is an unknown key under every other tuner."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class Tuner:
    """One way to decide what trains. Subclasses set the class attributes and implement ``apply``; the other
    methods have the defaults a tuner that trains the model's own weights wants."""

    name: ClassVar[str] = ""  # set by @register_tuner
    # The [train] keys this tuner owns (None: it has none). Its validators may read and set only its own
    # fields and the generic [train] ones (optimizer, optimizer_config, ...).
    config: ClassVar[type[BaseModel] | None] = None
    adapter: ClassVar[bool] = False  # trains a PEFT adapter on a frozen (possibly quantized) base
    # Updates the base weights themselves, so they must be stored in float32 (the optimizer's master copy):
    # a run refuses [model] dtype = bfloat16/float16 with such a tuner.
    full_weights_master: ClassVar[bool] = False

    def quantization(self, train: Any) -> Any | None:
        """The ``transformers.BitsAndBytesConfig`` the base is loaded with, or None (not quantized)."""
        return None

    def apply(self, model: nn.Module, train: Any, *, reward_head: bool) -> nn.Module:
        """Freeze or wrap ``model`` (already loaded, on its device) and return the module to train.

        :param train: the assembled [train] config; this tuner's keys are attributes of it.
        :param reward_head: ``model`` is a sequence classifier whose new ``score`` head must train too.
        """
        raise NotImplementedError(f"tuner '{self.name}' does not implement apply()")

    def save(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
        """Write the trained result in the format its ecosystem loads (an HF model or PEFT adapter folder)."""
        return save_pretrained(model, tokenizer, out_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        """The trained model as one plain transformers model (an adapter folded into its base). May consume
        ``model``."""
        return model


def register_tuner(name: str) -> Callable[[T], T]:
    """Register a ``Tuner`` subclass as ``[train] tuner_strategy = name``; sets its ``name``."""
    add = register(KIND, name)

    def decorate(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Tuner)):
            raise TypeError(f"@register_tuner('{name}') decorates a subclass of swiftk.contracts.Tuner, "
                            f"not {cls!r}")
        cls.name = name
        return add(cls)

    return decorate


def lookup_tuner(name: str) -> Tuner:
    """A new instance of the tuner registered as ``name``; PluginRegistryError (with the known names) if none."""
    target = lookup(KIND, name).target
    assert isinstance(target, type) and issubclass(target, Tuner)
    return target()


def tuner_names() -> list[str]:
    return [spec.name for spec in registered(KIND)]


def save_pretrained(model: nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """``model.save_pretrained`` and ``tokenizer.save_pretrained`` into ``out_dir``, without progress bars."""
    from transformers.utils import logging as hf_logging

    out_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            # peft looks for the base model's config.json beside a GGUF file and warns that there is none.
            warnings.filterwarnings("ignore", message="Could not find a config file")
            model.save_pretrained(out_dir)  # type: ignore[operator]
        tokenizer.save_pretrained(out_dir)
    finally:
        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    return out_dir
