"""Vision-language fine-tuning: captioning, VQA, grounding and chat over images, by the rows' messages.

One phase, ``learn``: the loss plugin of ``[train] loss_type`` (cross-entropy) over the answer tokens, with the
images' pixels passed to the model beside the text. The model is a transformers vision-language model
(``[model] model_id``) or one composed from a vision encoder and a language model (``[model.vision]``).

Which parts learn is said per part: the vision tower is frozen by default (its features are then computed once
per image and kept, ``cache_vision_features``), the projector and the language model train (fully, or through
the tuner's adapters). Held out: ``eval_loss`` on the answers, the ``[eval] metrics`` plugins, and with
``[eval] generate`` or ``exact_match`` greedy answers to each eval row's question, with its images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from swiftk.contracts import Batch
from swiftk.contracts.stages import DataContext, Stage, StageConfig, StepContext, register_stage
from swiftk.kernel.data import detect_format, load_rows
from swiftk.kernel.errors import DataError
from swiftk.kernel.evaluate import evaluate
from swiftk.kernel.vlm import (
    FeatureCache,
    VisionSample,
    VisionTokenize,
    feature_layer,
    greedy_answers,
    text_of,
    vision_collate,
    vision_samples,
    vision_tower,
    with_parts,
)

# The parts of a vision-language model, by the module names transformers gives them.
PROJECTORS = ("multi_modal_projector", "connector", "merger")
TOWERS = ("vision_tower", "vision_model", "visual")


class VLMConfig(StageConfig):
    """[train] keys of the vlm stage: which parts of the model learn."""

    freeze_vision_tower: bool = Field(True, description="keep the vision encoder as it is (its adapters too)")
    freeze_projector: bool = Field(False, description="keep the projector (image features -> text embeddings)")
    freeze_language_model: bool = Field(False, description="keep the language model (its adapters too)")
    cache_vision_features: bool = Field(True, description="a frozen vision tower sees each image once; its output "
                                        "is kept in memory for the next epochs and evaluations (LLaVA-style models)")


def part_of(name: str) -> str:
    """'vision', 'projector' or 'language' for a parameter name (PEFT's prefixes included)."""
    pieces = name.split(".")
    if any(p in PROJECTORS for p in pieces):
        return "projector"
    if any(p in TOWERS for p in pieces):
        return "vision"
    return "language"


@register_stage("vlm")
class VLM(Stage):
    """Rows of messages whose content holds images; the loss plugin of ``[train] loss_type`` on the answers."""

    config = VLMConfig
    task_types = ("sft",)
    unit = "samples"
    vision = "generative"
    engines = ("ddp",)

    def __init__(self, train: Any) -> None:
        super().__init__(train)
        self.processor: Any = None
        self.eval_config: Any = None
        self.prompts: list[VisionSample] = []  # eval rows' questions, for greedy answers
        self.expected: list[str] = []
        self.questions: list[str] = []
        self.pad_id = 0
        self.cache: FeatureCache | None = None

    def metrics(self, eval_config: Any) -> list[str]:
        return list(eval_config.metric_names())

    def problems(self, config: Any) -> list[str]:
        problems = []
        if config.data.packing:
            problems.append("[data] packing: the vlm stage keeps one example per row (its images belong to it); "
                            "set packing = false")
        if getattr(self.train, "quantization_bit", None):
            problems.append("[train] quantization_bit: the vlm stage loads its model unquantized (QLoRA of a "
                            "vision-language model is not built yet); use tuner_strategy = 'lora'")
        if self.train.cache_vision_features and not self.train.freeze_vision_tower:
            problems.append("[train] cache_vision_features: the vision tower trains (freeze_vision_tower = false), "
                            "so its features change every step; set cache_vision_features = false")
        lora = getattr(self.train, "lora_rank", None) is not None
        saved = " ".join(getattr(self.train, "modules_to_save", []))
        if config.model.vision is not None and lora and not self.train.freeze_projector \
                and not any(p in saved for p in PROJECTORS):
            problems.append("[train] modules_to_save: a composed model's projector is new (random), so it must "
                            "train whole, not through adapters: add modules_to_save = ['multi_modal_projector']")
        return problems

    def load(self, path: str, split: str, ctx: DataContext) -> Sequence[Any]:
        if ctx.processor is None:
            raise DataError("the vlm stage reads images through the model's processor, and this run has none")
        self.processor = ctx.processor
        self.pad_id = ctx.tokenizer.pad_token_id
        rows = load_rows(path, ctx.transform(split))
        samples = vision_samples(path, rows, ctx.processor, ctx.data)
        if split == "eval":
            self.eval_config = ctx.eval
            if ctx.eval.generates:
                self.questions_of(path, rows, ctx)
        return samples

    def questions_of(self, path: str, rows: list[tuple[str, dict[str, Any]]], ctx: DataContext) -> None:
        """Each eval row's turns before its last answer, and that answer: what exact match compares."""
        tokenize = VisionTokenize(ctx.processor, ctx.data, detect_format(rows, ctx.data.format), Path(path).parent)
        limit = ctx.eval.max_batches * ctx.eval.batch_size if ctx.eval.max_batches else None
        for where, row in rows[:limit]:
            messages = with_parts(where, row).get("messages")
            if not messages or messages[-1].get("role") != "assistant":
                continue
            self.prompts.append(tokenize.prompt(where, messages[:-1]))
            self.expected.append(text_of(messages[-1].get("content")).strip())
            self.questions.append(text_of(messages[-2].get("content")) if len(messages) > 1 else "")

    def collate(self, ctx: DataContext) -> Callable[[list[Any]], Batch]:
        pad_id = ctx.tokenizer.pad_token_id
        return lambda samples: vision_collate(samples, pad_id)

    def adapt(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Freeze the parts the config keeps, then cache a frozen tower's features (a LLaVA-style model)."""
        frozen = {"vision": self.train.freeze_vision_tower, "projector": self.train.freeze_projector,
                  "language": self.train.freeze_language_model}
        for name, parameter in model.named_parameters():
            if frozen[part_of(name)]:
                parameter.requires_grad_(False)
        tower = vision_tower(model)
        layer = feature_layer(model)
        if self.train.cache_vision_features and tower is not None and layer is not None:
            self.cache = FeatureCache(tower, layer)

    def evaluate(self, ctx: StepContext, held_out: Sequence[Any]) -> dict[str, float]:
        assert self.eval_config is not None
        model = ctx.unwrapped()

        def answers() -> tuple[list[str], list[str], list[str]]:
            predicted = greedy_answers(model, self.processor, self.prompts, self.eval_config.max_new_tokens,
                                       self.eval_config.batch_size, ctx.autocast)
            return self.questions, predicted, self.expected

        metrics = evaluate(model, ctx.tokenizer, list(held_out), [], self.eval_config,
                           lambda samples: vision_collate(samples, self.pad_id), ctx.autocast, ctx.call, ctx.state(),
                           answers=answers if self.prompts else None)
        if self.cache is not None:
            metrics["eval_cached_images"] = float(len(self.cache.store))
        return metrics

