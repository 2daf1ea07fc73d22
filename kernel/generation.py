"""The configured generator: what ``[generation] engine`` names, built over a model and its tokenizer.

A run's [samples] and eval generation, ``swiftk infer`` and ``swiftk serve`` (hf) and online stages' rollouts get
their generator here. ``hf`` samples from the model in this process; ``vllm`` runs in its own managed environment
and process, started over a HF folder of the base weights (a GGUF source is converted once and cached) and
kept in step with training through ``load_weights``; any other name is a registered generator plugin, given
``engine_args``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict

from swiftk.contracts import Adapter, Generator, build_generator
from swiftk.kernel.config import GenerationConfig, ModelConfig

Autocast = Callable[[], AbstractContextManager[Any]]


def configured_generator(cfg: GenerationConfig, model: Any, tokenizer: Any, *, model_cfg: ModelConfig | None = None,
                         system_prompt: str | None = None, autocast: Autocast | None = None,
                         report: Callable[[str], None] | None = None) -> Generator:
    """The generator ``cfg.engine`` names, over ``model`` (the live model: a PEFT model keeps its adapters).

    ``model_cfg`` is where the weights came from; the out-of-process ``vllm`` engine loads them from there.
    ``report`` receives one line per event worth telling the user (an engine starting, restarted, synced)."""
    import swiftk.plugins  # noqa: F401  (registers the built-in generators)

    if cfg.engine == "hf":
        return build_generator("hf", model, tokenizer, system_prompt=system_prompt, batch_size=cfg.batch_size,
                               autocast=autocast, **cfg.engine_args)
    if cfg.engine == "vllm":
        from swiftk.kernel import engine_files, envs

        if model_cfg is None:
            raise ValueError("the vllm engine needs the model's [model] table (where its weights come from)")
        python = envs.ensure("vllm", env_dir=cfg.env_dir, progress=True)
        # A random init has no source to load again: the engine starts from the live model's base weights.
        model_dir = engine_files.model_folder(model_cfg, tokenizer, model=model if model_cfg.init == "random" else None)
        return build_generator(
            "vllm", model, tokenizer, python=str(python), model_dir=str(model_dir),
            system_prompt=system_prompt, max_concurrency=cfg.max_concurrency, max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization, kv_cache_gb=cfg.kv_cache_gb,
            start_timeout_s=cfg.start_timeout_s, request_timeout_s=cfg.request_timeout_s,
            sync_timeout_s=cfg.sync_timeout_s,
            engine_args=dict(cfg.engine_args), report=report)
    return build_generator(cfg.engine, model, tokenizer, **cfg.engine_args)


def push_weights(generator: Generator, model: torch.nn.Module, version: int,
                 skip: Collection[str] = frozenset()) -> int:
    """Make ``generator`` serve ``model``'s weights as ``version``; returns the version it serves.

    A generator over the live model (``shares_weights``, as ``hf``) is only told the version. Any other is sent
    what training changes: a PEFT model's adapter (its tensors and config), else the trainable tensors (all of a
    full fine-tune, the unfrozen ones of ``freeze``), detached, under the model's state-dict names; ``skip`` names
    parameters the served model does not have (a stage's value head)."""
    if getattr(generator, "shares_weights", False):
        return generator.load_weights(version)
    if isinstance(model, PeftModel):
        name = model.active_adapter if isinstance(model.active_adapter, str) else "default"
        config = model.peft_config[name].to_dict()
        tensors = get_peft_model_state_dict(model, adapter_name=name)
        return generator.load_weights(version, adapter=Adapter({k: v.detach() for k, v in tensors.items()},
                                                                config, name=name))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and name not in skip}
    tensors = {name: t.detach() for name, t in model.state_dict().items() if name in trainable}
    return generator.load_weights(version, tensors=tensors)

