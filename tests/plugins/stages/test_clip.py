"""The clip stage (plugins/stages/clip.py) and its losses (plugins/losses/contrastive.py): the losses worked by hand,
the temperature's gradient, every row shape, bad images, config problems, and a tiny random CLIP learning to match
shapes to their captions on held-out images."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from swiftk.contracts import Batch, ModelOutputs, lookup
from swiftk.kernel.cli import main
from swiftk.kernel.config import DataConfig, EvalConfig, ModelConfig
from swiftk.kernel.errors import DataError
from swiftk.kernel.synthetic import shape_rows, write_jsonl
from swiftk.kernel.tiny import save_tiny_clip
from swiftk.kernel.vlm import load_processor, load_vision_model
from swiftk.plugins.stages.clip import Clip

RUN = """
[model]
model_id = "{root}/model"
[data]
train_file = "{root}/data/train.jsonl"
eval_file = "{root}/data/eval.jsonl"
max_length = 32
[train]
stage = "clip"
tuner_strategy = "full"
lr = 3e-3
batch_size = 32
max_steps = 300
warmup_steps = 10
[eval]
every = 300
on_start = true
batch_size = 32
[output]
dir = "{out}"
save_every = 1000
"""
# Similarities [[ln 3, 0], [ln 3, 0]]: image 0 and image 1 both look most like caption 0.
SIMILAR = torch.log(torch.tensor([[3.0, 1.0], [3.0, 1.0]]))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP and shape images with captions: 512 pairs to train on, 96 held out (12 captions)."""
    root = tmp_path_factory.mktemp("clip")
    save_tiny_clip(root / "model")
    write_jsonl(shape_rows(root / "data", 512, seed=0, task="pairs"), root / "data" / "train.jsonl")
    write_jsonl(shape_rows(root / "data", 96, seed=1, task="pairs"), root / "data" / "eval.jsonl")
    return root


@pytest.fixture(scope="module")
def processor(clip: Path) -> Any:
    return load_processor(ModelConfig(model_id=str(clip / "model")))


def stage(**keys: Any) -> Clip:
    return Clip(SimpleNamespace(**{"loss_type": "cross_entropy", "loss_config": {}, "batch_size": 4,
                                   "tuner_strategy": "full", "freeze_vision_tower": False, "freeze_text_tower": False,
                                   "text_padding": "auto", **keys}))


def context(processor: Any, **data: Any) -> SimpleNamespace:
    return SimpleNamespace(processor=processor, tokenizer=processor.tokenizer, eval=EvalConfig(),
                           data=DataConfig(train_file="x", **data), transform=lambda split: None)


def pair_batch(similar: torch.Tensor, pairs_in_step: int, **extras: torch.Tensor) -> tuple[Batch, ModelOutputs]:
    ids = torch.zeros((similar.shape[0], 3), dtype=torch.long)
    batch = Batch(ids, ids - 100, torch.ones_like(ids), pairs_in_step)
    return batch, ModelOutputs(similar, extras)


def test_clip_loss_is_the_symmetric_cross_entropy_worked_by_hand() -> None:
    """Temperature exp(ln 2) = 2 times similarities SIMILAR / 2. Image->text: row 0's softmax is [3/4, 1/4], caption 0
    is right: ln 4/3; row 1, caption 1 (1/4): ln 4. Text->image: column 0 is [ln 3, ln 3]: ln 2; column 1 [0, 0]: ln 2.
    Pairs (ln 4/3 + ln 2) / 2 + (ln 4 + ln 2) / 2 = ln(64/3) / 2, over the step's 4 pairs (2 in another micro-batch)."""
    scale = torch.tensor(math.log(2.0), requires_grad=True)
    batch, outputs = pair_batch(SIMILAR / 2, 4, logit_scale=scale)
    result = lookup("loss", "clip_contrastive").build().swiftk_loss_compute(batch=batch, outputs=outputs)
    torch.testing.assert_close(result.loss, torch.tensor(math.log(64 / 3) / 8))
    assert result.metrics["contrastive/scale"] == pytest.approx(2.0)
    result.loss.backward()
    assert scale.grad is not None and scale.grad != 0  # the temperature learns


def test_the_temperature_is_capped_at_100_as_in_clip() -> None:
    scale = torch.tensor(math.log(1000.0), requires_grad=True)
    batch, outputs = pair_batch(SIMILAR / 100, 4, logit_scale=scale)
    result = lookup("loss", "clip_contrastive").build().swiftk_loss_compute(batch=batch, outputs=outputs)
    torch.testing.assert_close(result.loss, torch.tensor(math.log(64 / 3) / 8))  # 100 x SIMILAR / 100
    result.loss.backward()
    assert scale.grad == 0 and result.metrics["contrastive/scale"] == pytest.approx(100.0)


def test_siglip_loss_worked_by_hand_with_its_bias() -> None:
    """z = SIMILAR, made of similarities SIMILAR - ln 3 and the bias ln 3 (temperature 1). Row 0: -log s(ln 3) for
    its match, -log s(-0) for the other: ln 4/3 + ln 2; row 1: -log s(-ln 3) - log s(0) = ln 4 + ln 2. Sum ln(64/3),
    over 4 pairs."""
    batch, outputs = pair_batch(SIMILAR - math.log(3), 4, logit_scale=torch.tensor(0.0),
                                logit_bias=torch.tensor([math.log(3)]))
    result = lookup("loss", "siglip").build().swiftk_loss_compute(batch=batch, outputs=outputs)
    torch.testing.assert_close(result.loss, torch.tensor(math.log(64 / 3) / 4))


def test_the_stage_gives_the_models_similarities_and_its_temperature_learns(clip: Path, processor: Any) -> None:
    """Captions padded in input_ids with no label (the step counts pairs), pixels in extras; the similarities times
    exp(logit_scale) are CLIP's own logits_per_image, and the model's logit_scale gets a gradient."""
    clip_stage = stage()
    pairs = clip_stage.load(str(clip / "data" / "eval.jsonl"), "eval", context(processor))
    batch = clip_stage.batch(pairs[:4])
    assert batch.num_items == 4 and batch.num_label_tokens == 0 and batch.extras["pixel_values"].shape == (4, 3, 28, 28)
    batch.num_items_in_batch = 4
    model = load_vision_model(ModelConfig(model_id=str(clip / "model")), processor, torch.device("cpu"), "dual")
    outputs = clip_stage.forward(SimpleNamespace(autocast=nullcontext, unwrapped=lambda: model), model, batch)
    with torch.no_grad():
        own = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    pixel_values=batch.extras["pixel_values"]).logits_per_image
    torch.testing.assert_close(outputs.logits * model.logit_scale.exp(), own)
    lookup("loss", "clip_contrastive").build().swiftk_loss_compute(batch=batch, outputs=outputs).loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def test_every_row_shape_gives_the_same_pair(clip: Path, processor: Any, tmp_path: Path) -> None:
    """``image`` + ``caption``, ``image`` + ``text``, and webdataset-style ``png`` bytes + ``txt`` (a parquet file)."""
    row = json.loads((clip / "data" / "eval.jsonl").read_text().splitlines()[0])
    path = str(clip / "data" / row["image"])
    table = pa.table({"png": [Path(path).read_bytes()], "txt": [row["caption"]]})
    pq.write_table(table, tmp_path / "laion.parquet")
    write_jsonl([{"image": path, "caption": row["caption"]}, {"image": path, "text": row["caption"]}],
                tmp_path / "rows.jsonl")
    read = [*stage().load(str(tmp_path / "rows.jsonl"), "train", context(processor)),
            *stage().load(str(tmp_path / "laion.parquet"), "train", context(processor))]
    assert len({tuple(p.input_ids) for p in read}) == 1 and all(torch.equal(p.pixels, read[0].pixels) for p in read)
    assert processor.tokenizer.decode(read[0].input_ids, skip_special_tokens=True) == row["caption"]


def test_a_bad_image_names_its_row_or_is_skipped_and_counted(clip: Path, processor: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = {"image": str(clip / "data" / "1_0.png"), "caption": "a red circle"}
    write_jsonl([good, {"image": "missing.png", "caption": "a red circle"},
                 {"image": "broken.png", "caption": "a red circle"}], tmp_path / "rows.jsonl")
    path = str(tmp_path / "rows.jsonl")
    with pytest.raises(DataError, match=r"rows.jsonl:2: image file .*missing.png does not exist") as info:
        stage().load(path, "train", context(processor))
    assert "bad_images = 'skip'" in str(info.value)
    kept = stage().load(path, "train", context(processor, bad_images="skip"))
    assert len(kept) == 1 and "left out 2 row(s) with unreadable images" in capsys.readouterr().out


def test_config_problems_name_their_keys(clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(RUN.format(root=clip, out=tmp_path / "run").replace("batch_size = 32\nmax", "batch_size = 1\nmax")
                      .replace("max_length = 32", "max_length = 32\npacking = true").replace('"full"', '"qlora"'))
    assert main(["run", str(config)]) == 2
    text = capsys.readouterr().err
    assert "[train] batch_size: 1" in text and "in-batch negatives" in text and "[data] packing" in text
    assert "[train] quantization_bit / tuner_strategy = 'qlora'" in text


def test_lora_in_the_text_tower_learns_and_merges_into_a_clip_folder(clip: Path, tmp_path: Path) -> None:
    """LiT with adapters: the image tower frozen (its adapters too), LoRA in the text tower. Held-out recall rises
    from chance; the temperature stays the base's; ``swiftk export --merge`` writes a CLIP folder (and the
    processor) whose similarities are the adapter model's."""
    from transformers import AutoModel, AutoProcessor

    from swiftk.kernel.export import load_trained

    config = tmp_path / "run.toml"
    config.write_text(RUN.format(root=clip, out=tmp_path / "run")
                      .replace("max_steps = 300", "max_steps = 60").replace("every = 300", "every = 60")
                      .replace('tuner_strategy = "full"', 'tuner_strategy = "lora"\nlora_rank = 16\n'
                               'lora_target_modules = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]\n'
                               'freeze_vision_tower = true'))
    assert main(["run", str(config)]) == 0
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r.get("event") == "eval"]
    assert evals[0]["eval_i2t_r1"] < 0.2 and evals[-1]["eval_i2t_r1"] >= 0.3, evals  # 0.08 -> 0.55 measured
    trained = load_trained(tmp_path / "run")
    model = trained.model
    learned = {n for n, p in model.named_parameters() if "lora_" in n}
    assert [n for n in learned if "text_model" in n and p_changed(model, n)]
    assert not [n for n in learned if "vision_model" in n and p_changed(model, n)], "the frozen tower's adapters"
    base = AutoModel.from_pretrained(clip / "model")
    assert torch.equal(model.get_base_model().logit_scale, base.logit_scale)
    assert main(["export", str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModel.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "CLIPModel"
    assert AutoProcessor.from_pretrained(tmp_path / "merged").image_processor is not None
    reader = stage()
    batch = reader.batch(reader.load(str(clip / "data" / "eval.jsonl"), "eval", context(trained.processor))[:8])
    with torch.no_grad():
        ours = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     pixel_values=batch.extras["pixel_values"]).logits_per_image
        theirs = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        pixel_values=batch.extras["pixel_values"]).logits_per_image
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def p_changed(model: torch.nn.Module, name: str) -> bool:
    """Whether a LoRA B matrix moved from its zero start (an A matrix starts random: only B says it trained)."""
    return "lora_B" in name and bool(dict(model.named_parameters())[name].abs().sum() > 0)


@pytest.mark.slow
def test_a_tiny_clip_learns_to_match_held_out_shapes_to_their_captions(clip: Path, tmp_path: Path) -> None:
    """300 steps of 32 pairs (~25 s of CPU): held-out image->text recall@1, by caption text, goes from chance (1/12)
    to well above it (0.81 measured); the saved folder loads as a transformers CLIP."""
    from transformers import AutoModel, AutoProcessor

    config = tmp_path / "run.toml"
    config.write_text(RUN.format(root=clip, out=tmp_path / "run"))
    assert main(["run", str(config)]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and before["eval_i2t_r1"] < 0.2, before
    assert after["eval_i2t_r1"] >= 0.6 and after["eval_t2i_r1"] >= 0.6 and after["eval_i2t_r5"] >= 0.9, after
    assert after["eval_loss"] < before["eval_loss"] - 1.0, after
    assert type(AutoModel.from_pretrained(tmp_path / "run" / "final")).__name__ == "CLIPModel"
    assert AutoProcessor.from_pretrained(tmp_path / "run" / "final").image_processor is not None
