"""What ``swiftk infer`` and ``swiftk serve`` answer with: a finished run or a model, resolved before anything
heavy is loaded, then loaded.

A **run** is a run directory (its ``config.toml`` and ``final/``): a PEFT adapter is put back on the base it was
trained on (``export.load_trained``), a full model is read from ``final/``; its ``[data] system_prompt``, its
tokenizer's chat template and its ``[generation]`` defaults apply. A **model** is a local HF folder, a hub id
already in the local cache (the machine may be offline), or ``package:NAME`` with ``--gguf-file``.

A vision-language target (a ``vlm`` run; a model folder whose config has a vision part: LLaVA, Idefics3...) loads
with its processor (``kernel.vlm``) and generates with ``VisionGenerator``: its chats may hold images.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swiftk.kernel.config import GenerationConfig, ModelConfig, RunConfig, stage_class
from swiftk.kernel.errors import SwiftkError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class TargetError(SwiftkError):
    """``RUN|MODEL`` names nothing that can be served; raised before any weights are read."""

    exit_code = 2


class UsageError(SwiftkError):
    """The command line asks for something that cannot work; raised before anything is loaded."""

    exit_code = 2


@dataclass(frozen=True)
class Target:
    """What was asked for, checked but not loaded."""

    spec: str  # as given on the command line
    name: str  # the name it answers to (a run's folder name, a model's folder, file or hub id)
    model_cfg: ModelConfig  # where the (base) weights come from
    run_dir: Path | None = None
    cfg: RunConfig | None = None  # the run's saved config
    adapter_dir: Path | None = None  # a LoRA run's final/ (a PEFT adapter folder)
    vision: bool = False  # a vision-language model: it reads images (through its processor) beside text

    @property
    def generation(self) -> GenerationConfig:
        import swiftk.plugins  # noqa: F401  (the built-in generators, which [generation] engine is checked against)

        return self.cfg.generation if self.cfg is not None else GenerationConfig()

    def generation_with(self, engine: str | None) -> GenerationConfig:
        """The [generation] table with ``--engine`` (checked: a known generator) in place of its own."""
        from pydantic import ValidationError

        table = self.generation
        try:
            generation = GenerationConfig.model_validate({**table.model_dump(), "engine": engine or table.engine})
        except ValidationError as exc:
            raise UsageError(f"--engine {engine}: {exc.errors()[0]['msg']}") from None
        if self.vision and generation.engine != "hf":
            raise UsageError(f"--engine {generation.engine}: {self.spec} is a vision-language model; swiftk "
                             f"generates with those in its own process only: use --engine hf")
        return generation

    @property
    def system_prompt(self) -> str | None:
        return self.cfg.data.system_prompt if self.cfg is not None else None

    @property
    def lora_rank(self) -> int:
        if self.adapter_dir is None:
            return 0
        return int(json.loads((self.adapter_dir / "adapter_config.json").read_text()).get("r", 8))

    def describe(self) -> str:
        base = self.model_cfg.model_id + (f" ({self.model_cfg.gguf_file})" if self.model_cfg.gguf_file else "")
        if self.model_cfg.init == "random":
            base = f"a random-init {(self.model_cfg.architecture or {}).get('model_type', 'model')} (the run's seed)"
        if self.cfg is None:
            what = f"model {base}"
        elif self.adapter_dir is not None:
            what = f"run {self.run_dir}: {self.cfg.train.tuner_strategy} adapter on {base}"
        else:
            what = f"run {self.run_dir}: {self.cfg.train.tuner_strategy}-trained model (final/)"
        return what + (" · vision-language: reads images" if self.vision else "")


def add_target_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """What ``infer``, ``serve`` and ``eval`` share: what to load and with which engine."""
    parser.add_argument("target", metavar="RUN|MODEL", nargs=None if required else "?", default=None,
                        help="a run directory, a model folder, a cached hub id or package:NAME (with --gguf-file)")
    parser.add_argument("--gguf-file", default=None, metavar="FILE", help="MODEL: the GGUF file inside its folder")
    parser.add_argument("--engine", default=None, help="hf (in-process) or vllm (its managed environment); default: "
                        "the run's [generation] engine, else hf")
    parser.add_argument("--merged", action="store_true", help="fold a LoRA adapter into the base before generating "
                        "(faster hf generation; serves no separate base model)")


def resolve(spec: str, gguf_file: str | None = None) -> Target:
    """``spec`` as a run directory, a model folder, ``package:NAME`` or a cached hub id; a clear ``TargetError``
    (exit 2) for anything else."""
    path = Path(spec).expanduser()
    if path.is_dir() and path.name == "final" and (path.parent / "config.toml").is_file():
        path = path.parent  # a run's final/ stands for its run
    if path.is_dir() and (path / "config.toml").is_file():
        if gguf_file:
            raise TargetError(f"--gguf-file is for a model, not a run: {spec} is a run directory (its config.toml "
                              f"says where its weights come from). Drop --gguf-file.")
        return run_target(spec, path)
    if spec.startswith("package:"):
        return model_target(spec, package_folder(spec), gguf_file)
    if path.is_dir():
        if not (path / "config.json").is_file() and not gguf_file:
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (f" It holds {', '.join(ggufs[:3])}: pass --gguf-file {ggufs[0]}." if ggufs else
                    " Give a run directory (with config.toml and final/) or a Hugging Face model folder.")
            raise TargetError(f"{spec} is neither a swiftk run (no config.toml) nor a model folder (no config.json)."
                              + hint)
        return model_target(spec, path, gguf_file)
    if path.exists():
        raise TargetError(f"{spec} is a file; give a run directory, a model folder or a hub id (a GGUF file: its "
                          f"folder plus --gguf-file {path.name})")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not HUB_ID.match(spec):
        raise TargetError(f"{spec}: no such run directory or model folder. Give a run directory (with config.toml "
                          f"and final/), a model folder, package:NAME or a hub id.")
    if not hub_cached(spec, gguf_file or "config.json"):
        raise TargetError(f"{spec}: no such folder here, and not in the Hugging Face cache (this machine may be "
                          f"offline). Download it where the hub is reachable (`hf download {spec}`) or give a local "
                          f"folder.")
    cached = None if gguf_file else try_to_load_from_cache(spec, "config.json")
    return Target(spec, spec.rsplit("/", 1)[-1], ModelConfig(model_id=spec, gguf_file=gguf_file),
                  vision=isinstance(cached, str) and has_vision_part(Path(cached)))


def run_target(spec: str, run_dir: Path) -> Target:
    from swiftk.kernel.checkpoint import latest_checkpoint
    from swiftk.kernel.config import load_config

    final = run_dir / "final"
    if not final.is_dir():
        latest = latest_checkpoint(run_dir)
        where = (f"Its latest checkpoint is {latest}: resume the run to the end (`swiftk run {run_dir / 'config.toml'}"
                 f" --resume`), then serve it." if latest is not None else
                 "It has no checkpoint either: train it (`swiftk run CONFIG`).")
        raise TargetError(f"{spec} has no final/ model: the run is still training, stopped before its end, or ran "
                          f"with [output] save_final = false. {where}")
    cfg = load_config(run_dir / "config.toml", saved=True)
    name = run_dir.resolve().name
    vision = stage_class(cfg.train).vision
    if vision == "dual":
        raise TargetError(f"{spec} trained an image and a text encoder ([train] stage = '{cfg.train.stage}'): they "
                          f"embed, they do not generate, so there is nothing to chat with or serve")
    if (final / "adapter_config.json").is_file():
        return Target(spec, name, cfg.model, run_dir, cfg, adapter_dir=final, vision=bool(vision))
    return Target(spec, name, ModelConfig(model_id=str(final), dtype=cfg.model.dtype), run_dir, cfg,
                  vision=bool(vision))


def model_target(spec: str, folder: Path, gguf_file: str | None) -> Target:
    if gguf_file and not (folder / gguf_file).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise TargetError(f"--gguf-file {gguf_file}: {folder / gguf_file} does not exist"
                          + (f"; the folder holds {', '.join(found)}" if found else ""))
    name = Path(gguf_file).stem if gguf_file else folder.resolve().name
    return Target(spec, name, ModelConfig(model_id=spec, gguf_file=gguf_file),
                  vision=not gguf_file and has_vision_part(folder / "config.json"))


def package_folder(spec: str) -> Path:
    from swiftk.kernel.model import resolve_source

    try:
        return Path(resolve_source(spec))
    except SwiftkError as exc:
        raise TargetError(str(exc)) from None


def hub_cached(repo_id: str, filename: str) -> bool:
    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def try_to_load_from_cache(repo_id: str, filename: str) -> Any:
    from huggingface_hub import try_to_load_from_cache as cached

    return cached(repo_id, filename)


def has_vision_part(config_json: Path) -> bool:
    """Whether a model folder's ``config.json`` describes a vision-language model (a ``vision_config`` beside the
    text model's: LLaVA, Idefics3, Qwen2-VL, Gemma 3...), read before any weights."""
    try:
        return "vision_config" in json.loads(config_json.read_text())
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------- loading

Autocast = Callable[[], AbstractContextManager[Any]]


@dataclass
class Loaded:
    """A target's model and tokenizer in this process."""

    model: Any  # a PeftModel for an adapter run (unless merged)
    tokenizer: Any  # a vision-language model's: its processor's
    autocast: Autocast | None  # a run generates under its training precision
    adapter: bool  # the adapter is live (not merged): its base can be served too, with the adapter off
    processor: Any = None  # a vision-language model's: images and text

    def base(self) -> AbstractContextManager[Any]:
        """A context in which the model is its base (the adapter off)."""
        return self.model.disable_adapter() if self.adapter else nullcontext()


def load(target: Target, merged: bool = False) -> Loaded:
    """The target's model (eval mode) and tokenizer; ``merged`` folds a LoRA adapter into the base first. A run
    loads as ``export.load_trained`` rebuilds it (a vision run with the processor it saved); a vision-language
    model folder with its own processor."""
    import torch

    from swiftk.kernel.model import load_model, load_tokenizer, pick_device

    with quiet():
        if target.cfg is not None and target.run_dir is not None:
            from swiftk.kernel.export import load_trained

            trained = load_trained(target.run_dir)
            model, adapter = trained.model, trained.adapter
            if adapter and merged:
                from swiftk.kernel.tuners import merged as merge

                model, adapter = merge(model, target.cfg.train), False
            return Loaded(model.eval(), trained.tokenizer, run_autocast(target, model), adapter, trained.processor)
        device = pick_device(target.model_cfg.device) if torch.cuda.is_available() else torch.device("cpu")
        if target.vision:
            from swiftk.kernel.vlm import load_processor, load_vision_model

            processor = load_processor(target.model_cfg)
            model = load_vision_model(target.model_cfg, processor, device)
            return Loaded(model.eval(), processor.tokenizer, None, False, processor)
        tokenizer = load_tokenizer(target.model_cfg)
        model = load_model(target.model_cfg, len(tokenizer), device)
        return Loaded(model.eval(), tokenizer, None, False)


def run_autocast(target: Target, model: Any) -> Autocast | None:
    """A run generates under its training precision; a model as its weights are."""
    if target.cfg is None or target.cfg.train.precision == "fp32":
        return None
    from swiftk.kernel.run import make_autocast

    return make_autocast(target.cfg.train.precision, next(model.parameters()).device)  # type: ignore[no-any-return]


def make_generator(target: Target, loaded: Loaded, generation: GenerationConfig, system_prompt: str | None,
                   report: Callable[[str], None] | None = None, images_base: Path | None = None) -> Any:
    """The generator ``generation.engine`` names over the loaded model. An engine in its own process (vllm) starts
    from the base weights' folder: what the model here has on top (the adapter, merged weights) is pushed to it.
    A vision-language model's is ``VisionGenerator`` (hf only); ``images_base``: where its chats' relative image
    paths start (None: the current directory)."""
    from swiftk.kernel.generation import configured_generator, push_weights

    if loaded.processor is not None:
        from swiftk.plugins.generators.hf import VisionGenerator

        return VisionGenerator(loaded.model, loaded.processor, system_prompt=system_prompt,
                               batch_size=generation.batch_size, autocast=loaded.autocast, base=images_base,
                               **generation.engine_args)
    generator = configured_generator(generation, loaded.model, loaded.tokenizer, model_cfg=target.model_cfg,
                                     system_prompt=system_prompt, autocast=loaded.autocast, report=report)
    if generation.engine == "hf" or (target.cfg is None) or (target.adapter_dir is None):
        return generator  # in-process, a model or a full run's folder: the engine has every weight
    if loaded.adapter:  # the PEFT model holds the run's adapter: push it as training pushes one
        push_weights(generator, loaded.model, 1)
    else:  # merged here: the base folder lacks the adapter's share
        generator.load_weights(1, tensors=dict(loaded.model.state_dict()))
    return generator


def load_tokenizer_only(target: Target) -> Any:
    """The tokenizer alone (an engine in another process loads the weights)."""
    from swiftk.kernel.model import load_tokenizer

    if target.adapter_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(target.adapter_dir)
    return load_tokenizer(target.model_cfg)


@contextmanager
def quiet() -> Iterator[None]:
    """Loading chatter (GGUF dequantisation, PEFT warnings) is not the user's business here."""
    import warnings

    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
