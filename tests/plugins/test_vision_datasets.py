"""The vision datasets (plugins/datasets/coco.py, laion.py, webvid.py): each sample folder, in its upstream layout,
converts into rows of our form whose images the vlm stage's loader finds; bad entries are named or counted."""

from __future__ import annotations

import json
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from swiftk.kernel.config import DataConfig, ModelConfig, load_config
from swiftk.kernel.data import load_rows
from swiftk.kernel.images import load_image
from swiftk.kernel.synthetic import shape_image, shape_rows
from swiftk.kernel.tiny import save_tiny_llava
from swiftk.kernel.vlm import load_processor, vision_samples
from swiftk.plugins.datasets import SAMPLES, ConversionError, DatasetNotFound, resolve_dataset, summary

COCO, WEBDATASET, PARQUET, WEBVID = (SAMPLES / "coco", SAMPLES / "laion" / "webdataset",
                                     SAMPLES / "laion" / "parquet", SAMPLES / "webvid")


def convert(name: str, path: Path, cache: Path, task: str | None = None) -> tuple[Path, list[dict[str, Any]]]:
    out = resolve_dataset(name, task_type=task, dataset_path=path, cache_dir=cache)
    return out, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def user(row: dict[str, Any]) -> tuple[Any, str]:
    """The media value and the question of a row's user turn."""
    media, text = row["messages"][0]["content"]
    return media.get("image", media.get("video")), text["text"]


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = save_tiny_llava(tmp_path_factory.mktemp("llava") / "model")
    return load_processor(ModelConfig(model_id=str(model)))


def test_coco_captions_give_a_row_per_caption_naming_the_image_by_absolute_path(tmp_path: Path) -> None:
    _, rows = convert("coco-captions", COCO, tmp_path)
    assert len(rows) == 6  # 3 images x 2 captions
    image, question = user(rows[1])
    assert image == str((COCO / "train2017" / "000000000001.jpg").resolve()) and question == "Describe the image."
    assert rows[1]["messages"][1] == {"role": "assistant", "content": "a yellow circle to the right"}  # "... \n"
    _, pairs = convert("coco-captions", COCO, tmp_path, task="clip")
    assert pairs[0] == {"image": image, "caption": "A yellow circle on a light background."}


def test_coco_grounding_boxes_are_per_cent_of_each_side(tmp_path: Path) -> None:
    """Image 1 is 48x32, its circle's bbox [x, y, w, h] = [24, 16, 8, 8]: x0 = 24*100//48 = 50, y0 = 16*100//32 =
    50, x1 = 32*100//48 = 66, y1 = 24*100//32 = 75. A second circle in image 1 makes "Where is the circle?"
    ambiguous there: both are skipped, and counted."""
    _, rows = convert("coco-grounding", COCO, tmp_path)
    assert user(rows[0])[1] == "Where is the circle? Answer [x0, y0, x1, y1]."
    assert rows[0]["messages"][1]["content"] == "[50, 50, 66, 75]"
    copy = shutil.copytree(COCO, tmp_path / "coco")
    data = json.loads((copy / "annotations/instances_train2017.json").read_text())
    data["annotations"].append({**data["annotations"][0], "id": 999, "bbox": [0, 0, 4, 4]})
    (copy / "annotations/instances_train2017.json").write_text(json.dumps(data))
    out, rows = convert("coco-grounding", copy, tmp_path)
    assert len(rows) == 2 and "category not unique in its image (the question would have several answers): 2" \
        in summary(out)


def test_coco_grounding_asks_as_shape_rows_does(tmp_path: Path) -> None:
    """A COCO file made from shape_rows' own image gives shape_rows' own row (the image named absolutely)."""
    expected, = shape_rows(tmp_path / "coco" / "train2017", 1, seed=3, task="grounding")
    _, colour, shape, (x0, y0, x1, y1) = shape_image(random.Random(3), 32)
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "3_0.png", "width": 32, "height": 32}],
        "categories": [{"id": 1, "name": shape}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0]}]}))
    _, (row,) = convert("coco-grounding", tmp_path / "coco", tmp_path / "cache")
    expected["messages"][0]["content"][0]["image"] = str(tmp_path / "coco" / "train2017" / "3_0.png")
    assert row == expected


def test_laion_shards_store_their_images_beside_the_converted_file(tmp_path: Path) -> None:
    out, rows = convert("laion", WEBDATASET, tmp_path)
    assert len(rows) == 3 and user(rows[0])[1] == "Describe the image."
    image = user(rows[0])[0]
    assert image.startswith(out.stem + ".files/") and load_image(image, out.parent).size == (32, 32)
    assert rows[0]["messages"][1]["content"] == "red triangle clipart"  # 00000.parquet beside is metadata: unread
    with tarfile.open(WEBDATASET / "00000.tar") as tar:  # img2dataset's "files" format: a folder per shard
        tar.extractall(tmp_path / "files" / "00000", filter="data")
    assert user(convert("laion", tmp_path / "files", tmp_path)[1][0])[0] == str(tmp_path / "files/00000/000000000.jpg")
    out, pairs = convert("laion", PARQUET, tmp_path, task="image_text")
    assert len(pairs) == 2 and set(pairs[0]) == {"image", "caption"}
    assert "2 of 3 rows (skipped no image bytes or local file" in summary(out)  # the failed download


def test_webvid_rows_hold_the_frames_as_a_video_and_skip_clips_without_frames(tmp_path: Path) -> None:
    out, rows = convert("webvid", WEBVID, tmp_path)
    frames, question = user(rows[0])
    assert question == "Describe the video." and [Path(f).name for f in frames] == [
        "frame_0001.jpg", "frame_0002.jpg", "frame_0003.jpg", "frame_0004.jpg"]
    assert rows[0]["messages"][1]["content"] == "A blue square moving to the right, seen from the front."
    assert "2 of 3 rows (skipped no frames (videos/<videoid>/frame_*.jpg): 1)" in summary(out)


def test_a_vlm_config_trains_on_the_converted_rows_and_their_images_load(tmp_path: Path, processor: Any) -> None:
    from swiftk.kernel.plugins import build_stage
    from swiftk.kernel.run import named_dataset

    config = tmp_path / "vlm.toml"
    config.write_text(f'[model]\nmodel_id = "{tmp_path}"\n[data]\ndataset_name = "coco-captions"\n'
                      f'dataset_path = "{COCO}"\n[train]\nstage = "vlm"\n[output]\ndir = "{tmp_path / "run"}"\n')
    cfg = load_config(config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SWIFTK_CACHE", str(tmp_path / "cache"))
        assert named_dataset(cfg, build_stage(cfg.train)) == []
    paths = [Path(cfg.data.train_path), convert("coco-grounding", COCO, tmp_path)[0],
             convert("laion", WEBDATASET, tmp_path)[0], convert("webvid", WEBVID, tmp_path)[0]]
    images = []
    for path in paths:
        rows = load_rows(str(path))
        samples = vision_samples(str(path), rows, processor, DataConfig(train_file="x"))
        assert len(samples) == len(rows)
        images.append(sum(s.images for s in samples))
    assert images == [6, 3, 3, 8]  # a caption each; a box each; an image each; two clips of 4 frames


def test_bad_entries_are_named_by_file_and_entry(tmp_path: Path) -> None:
    copy = shutil.copytree(COCO, tmp_path / "coco")
    data = json.loads((copy / "annotations/captions_train2017.json").read_text())
    data["annotations"][3]["image_id"] = 42
    (copy / "annotations/captions_train2017.json").write_text(json.dumps(data))
    with pytest.raises(ConversionError, match=r"captions_train2017\.json\[annotations #3\] \(id 21\): image_id 42 "
                                              r"is not among the file's 3 images"):
        convert("coco-captions", copy, tmp_path)
    (tmp_path / "shards").mkdir()
    with tarfile.open(WEBDATASET / "00000.tar") as source, tarfile.open(tmp_path / "shards/00007.tar", "w") as tar:
        for member in source:
            if member.name != "000000001.txt":
                tar.addfile(member, source.extractfile(member))
    with pytest.raises(ConversionError, match=r"00007\.tar\[000000001\]: sample '000000001' has no caption \(\.txt\); "
                                              r"its members: 000000001\.jpg, 000000001\.json"):
        convert("laion", tmp_path / "shards", tmp_path)
    with pytest.raises(DatasetNotFound, match=r"no annotations/captions_train\*\.json(.|\n)*wget http://images"):
        convert("coco-captions", WEBVID, tmp_path)
