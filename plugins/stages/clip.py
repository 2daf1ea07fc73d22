"""Contrastive image-text training: an image encoder and a text encoder learn to agree (CLIP, SigLIP dual encoders).

One phase, ``learn``: a micro-batch of B (image, caption) pairs goes through both encoders; the cosine
similarities of every image with every caption, ``[B, B]``, and the model's learnable temperature (SigLIP: and
bias) go to the loss plugin (``clip_contrastive`` by default: symmetric InfoNCE; ``loss_type = "siglip"``: the
sigmoid loss; plugins/losses/contrastive.py). The other captions of the micro-batch are each image's negatives, so
``[train] batch_size`` is the contrastive batch; grad_accum and more ranks add pairs to the step, not negatives.
The whole model trains (``tuner_strategy = "full"``), or one tower of it (``freeze_vision_tower``, LiT-style, or
``freeze_text_tower``), or LoRA/DoRA adapters in the towers that are not frozen (``lora_target_modules``:
CLIP and SigLIP name their attention ``q_proj``/``k_proj``/``v_proj``/``out_proj`` in both towers). Under an
adapter tuner the temperature (and SigLIP's bias) stays the base model's: it is no adapter weight, so the saved
adapter would not carry it.

Rows: ``{"image": ..., "caption": "a red circle"}`` (or ``"text"``), or webdataset-style ``{"jpg": bytes, "txt":
...}`` (also ``png``, ``jpeg``, ``webp``); an image is anything ``kernel.images.load_image`` reads, relative paths
from the data file's folder. Pixels are made once, when the data is read (as the vlm stage does).

Held out: ``eval_loss`` (the loss plugin over eval batches of ``[eval] batch_size``: its negatives are that batch's),
and retrieval recall@1 and @5 over the whole held-out set, image->text (``eval_i2t_r1``, ``eval_i2t_r5``) and
text->image (``eval_t2i_r1``, ``eval_t2i_r5``). Several held-out pairs may share a caption (12 captions for the
synthetic shapes): image->text ranks the *distinct* caption texts, text->image ranks every held-out image, and a
retrieval is right when the retrieved caption's text equals the query's caption text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from swiftk.contracts import IGNORE_INDEX, Batch, LossChoice, ModelOutputs
from swiftk.contracts.stages import DataContext, Stage, StageConfig, StepContext, register_stage
from swiftk.kernel.data import load_rows
from swiftk.kernel.errors import DataError
from swiftk.kernel.images import ImageError, load_image

IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp")  # the first a row has names its image
CAPTION_KEYS = ("caption", "text", "txt")
RECALL_AT = (1, 5)
VISION_PARTS = ("vision_model", "visual_projection")  # transformers' names in CLIPModel / SiglipModel
TEXT_PARTS = ("text_model", "text_projection")


class ClipConfig(StageConfig):
    """[train] keys of the clip stage: which tower learns, and how captions are padded."""

    freeze_vision_tower: bool = Field(False, description="keep the image encoder as it is (LiT, Zhai et al. 2022: "
                                      "a locked pretrained image tower, the text tower learns to match it)")
    freeze_text_tower: bool = Field(False, description="keep the text encoder as it is")
    text_padding: Literal["auto", "longest", "max_length"] = Field(
        "auto", description="captions padded to the batch's longest, or to [data] max_length (capped at the "
                            "tokenizer's model_max_length); auto: max_length for SigLIP, whose text tower pools the "
                            "last position as it was trained, else longest")


@dataclass
class Pair:
    """One image and its caption, as the encoders read them."""

    input_ids: list[int]  # the caption's tokens
    pixels: torch.Tensor  # [3, H, W]
    caption: str


@register_stage("clip")
class Clip(Stage):
    """Image-caption pairs; the loss plugin of ``[train] loss_type`` (default ``clip_contrastive``) over the
    in-batch similarities."""

    config = ClipConfig
    task_types = ("image_text",)
    unit = "pairs"
    vision = "dual"
    engines = ("ddp",)
    writes_text = False  # it embeds text, it does not write any

    def __init__(self, train: Any) -> None:
        super().__init__(train)
        self.pad_id = 0
        self.width: int | None = None  # the padded caption length with text_padding = "max_length"
        self.eval_config: Any = None

    def loss(self) -> LossChoice:
        name = self.train.loss_type
        if name == "cross_entropy":  # the generic default means "the stage's own loss"
            name = "clip_contrastive"
        return LossChoice(name, dict(self.train.loss_config))

    def problems(self, config: Any) -> list[str]:
        problems = []
        if self.train.batch_size < 2:
            problems.append(f"[train] batch_size: {self.train.batch_size}, but the clip stage contrasts each image "
                            f"with the other captions of its micro-batch (in-batch negatives): set at least 2")
        if config.data.packing:
            problems.append("[data] packing: the clip stage keeps one caption per row (its image belongs to it); "
                            "set packing = false")
        if config.model.vision is not None:
            problems.append("[model.vision]: composes a generative vision-language model ([train] stage = 'vlm'); "
                            "the clip stage trains a dual encoder (CLIP, SigLIP) named by [model] model_id alone")
        if getattr(self.train, "quantization_bit", None):  # qlora's, or lora's with quantization_bit
            problems.append(f"[train] quantization_bit / tuner_strategy = '{self.train.tuner_strategy}': the clip "
                            f"stage does not train a quantized dual encoder (its towers are small); use 'lora' "
                            f"without quantization_bit, or 'full'")
        if self.train.freeze_vision_tower and self.train.freeze_text_tower:
            problems.append("[train] freeze_text_tower: both towers are frozen, so only the temperature would "
                            "learn; unfreeze one of them")
        return problems

    # --- data

    def load(self, path: str, split: str, ctx: DataContext) -> Sequence[Any]:
        if ctx.processor is None:
            raise DataError("the clip stage reads images through the model's processor, and this run has none")
        tokenizer = ctx.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        limit = min(ctx.data.max_length, tokenizer.model_max_length)  # CLIP's text encoder has 77 positions
        padding = self.train.text_padding
        if padding == "auto":
            padding = "max_length" if "siglip" in type(ctx.processor).__name__.lower() else "longest"
        self.width = limit if padding == "max_length" else None
        if split == "eval":
            self.eval_config = ctx.eval
        base = Path(path).parent
        pairs: list[Pair] = []
        bad: list[str] = []
        for where, row in load_rows(path, ctx.transform(split)):
            image, caption = fields(where, row)
            try:
                picture = load_image(image, base, where)
            except ImageError as exc:
                if ctx.data.bad_images == "error":
                    raise DataError(f"{exc} ([data] bad_images = 'skip' leaves such rows out and counts them)") \
                        from None
                bad.append(str(exc))
                continue
            pixels = ctx.processor.image_processor(images=[picture], return_tensors="pt")["pixel_values"][0]
            ids = tokenizer(caption, truncation=True, max_length=limit)["input_ids"]
            pairs.append(Pair(list(ids), pixels, caption))
        if bad:
            print(f"data: {path}: left out {len(bad)} row(s) with unreadable images ([data] bad_images = 'skip'); "
                  f"first: {bad[0]}")
        if not pairs:
            raise DataError(f"{path}: no usable pair among its rows ({len(bad)} with unreadable images)")
        return pairs

    def collate(self, ctx: DataContext) -> Callable[[list[Any]], Batch]:
        return self.batch

    def batch(self, pairs: list[Pair]) -> Batch:
        """Captions right-padded into ``input_ids`` (labels all ``IGNORE_INDEX``: no token is predicted), the
        images in ``extras["pixel_values"]`` ``[B, 3, H, W]``, and ``extras["num_pairs"]``: what the kernel
        normalises the step's loss over."""
        width = self.width or max(len(p.input_ids) for p in pairs)
        ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, pair in enumerate(pairs):
            ids[row, : len(pair.input_ids)] = torch.tensor(pair.input_ids)
            mask[row, : len(pair.input_ids)] = 1
        labels = torch.full_like(ids, IGNORE_INDEX)
        extras = {"pixel_values": torch.stack([p.pixels for p in pairs]), "num_pairs": torch.tensor(len(pairs))}
        return Batch(ids, labels, mask, 0, extras=extras)

    # --- model

    def adapt(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Freeze the towers the config keeps."""
        frozen = {VISION_PARTS: self.train.freeze_vision_tower, TEXT_PARTS: self.train.freeze_text_tower}
        for name, parameter in model.named_parameters():
            pieces = name.split(".")
            if any(keep and any(part in pieces for part in parts) for parts, keep in frozen.items()):
                parameter.requires_grad_(False)

    def forward(self, ctx: StepContext, model: torch.nn.Module, batch: Batch) -> ModelOutputs:
        """``logits`` ``[B, B]``: the cosine similarity of image i and caption j; ``extras``: the model's
        ``logit_scale`` (0-dim, the log of the temperature) and, for SigLIP, ``logit_bias``."""
        with ctx.autocast():
            images, texts = embed(model, batch)  # [B, D] each, unit length
        return outputs_of(images, texts, encoder(ctx.unwrapped()))

    # --- held out

    @torch.no_grad()
    def evaluate(self, ctx: StepContext, held_out: Sequence[Any]) -> dict[str, float]:
        assert self.eval_config is not None
        model = ctx.unwrapped()
        pairs: list[Pair] = list(held_out)
        size = self.eval_config.batch_size
        if self.eval_config.max_batches:
            pairs = pairs[: self.eval_config.max_batches * size]
        state = ctx.state()
        training = model.training
        model.eval()
        images, texts, loss = [], [], 0.0
        try:
            for start in range(0, len(pairs), size):
                chunk = pairs[start : start + size]
                batch = self.batch(chunk).to(ctx.device)
                batch.num_items_in_batch = len(chunk)
                with ctx.autocast():
                    image, text = embed(model, batch)
                result = ctx.call("swiftk_loss_compute", batch=batch, outputs=outputs_of(image, text, encoder(model)),
                                  step=state.step, state=state)
                loss += float(result.loss) * len(chunk)
                images.append(image.float())
                texts.append(text.float())
        finally:
            model.train(training)
        metrics = {"eval_loss": loss / len(pairs)}
        metrics.update(recall(torch.cat(images), torch.cat(texts), [p.caption for p in pairs]))
        return metrics


def fields(where: str, row: Any) -> tuple[Any, str]:
    """A row's image value and caption, by the first key of each kind it has."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a clip row is an object with an image and a caption, not {type(row).__name__}")
    image_key = next((k for k in IMAGE_KEYS if row.get(k) is not None), None)
    caption_key = next((k for k in CAPTION_KEYS if k in row), None)
    if image_key is None or caption_key is None:
        raise DataError(f"{where}: a clip row needs an image ({' / '.join(IMAGE_KEYS)}) and a caption "
                        f"({' / '.join(CAPTION_KEYS)}); it has {sorted(row)}")
    caption = row[caption_key]
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: '{caption_key}' must be a non-empty string, got {caption!r}")
    return row[image_key], caption


def encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers dual encoder itself, inside a PEFT wrapper (where its ``logit_scale`` lives)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def embed(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised image and caption embeddings ``[B, D]`` of a batch, through the model's own forward (so a
    parallel wrapper sees the call)."""
    pixels = batch.extras["pixel_values"]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                pixel_values=pixels.to(next(model.parameters()).dtype))
    return F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)


def outputs_of(images: torch.Tensor, texts: torch.Tensor, model: torch.nn.Module) -> ModelOutputs:
    """What the contrastive losses read: similarities ``[B, B]`` (image rows, caption columns), the temperature's
    log and the bias as 0-dim tensors."""
    extras = {"logit_scale": model.logit_scale.reshape(())}
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, torch.Tensor):
        extras["logit_bias"] = bias.reshape(())
    return ModelOutputs(images.float() @ texts.float().T, extras)


def recall(images: torch.Tensor, texts: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Retrieval recall@k of held-out pairs, both ways, by caption text (see the module's docstring).

    images, texts ``[N, D]`` unit length; image->text ranks the distinct captions (the first embedding of each
    text), text->image ranks all N images with each pair's caption as a query."""
    distinct = list(dict.fromkeys(captions))
    first = [captions.index(c) for c in distinct]
    truth = torch.tensor([distinct.index(c) for c in captions])  # [N]: each pair's caption among the distinct
    image_to_text = images @ texts[first].T  # [N, U]
    text_to_image = texts @ images.T  # [N, N]
    metrics = {}
    for k in RECALL_AT:
        top = image_to_text.topk(min(k, len(distinct)), dim=1).indices.cpu()  # [N, k] distinct captions
        metrics[f"eval_i2t_r{k}"] = float((top == truth[:, None]).any(dim=1).float().mean())
        top = text_to_image.topk(min(k, len(captions)), dim=1).indices.cpu()  # [N, k] images
        metrics[f"eval_t2i_r{k}"] = float((truth[top] == truth[:, None]).any(dim=1).float().mean())
    return metrics
