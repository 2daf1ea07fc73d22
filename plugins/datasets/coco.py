"""COCO (Lin et al. 2014, Microsoft Common Objects in Context): captions, and object boxes as grounding questions.

Upstream layout (cocodataset.org's zips, unpacked side by side)::

    annotations/captions_train2017.json    {"images": [{"id", "file_name", "width", "height"}, ...],
                                            "annotations": [{"id", "image_id", "caption"}, ...]}
    annotations/instances_train2017.json   {"images": [...], "categories": [{"id", "name"}, ...],
                                            "annotations": [{"id", "image_id", "category_id",
                                                             "bbox": [x, y, w, h] (pixels), "iscrowd"}, ...]}
    train2017/000000000009.jpg ...         (or images/train2017/)

``data.dataset_path`` is that folder (the split's file is ``annotations/<kind>_<split>*.json``; test reads val) or
one annotation file. The reader yields one raw row per annotation, joined with its image (absolute path, size) and
for instances its category's name and how many annotations of that category the image has.

``coco-captions``: one row per caption, not per image. COCO gives each image about five captions, all
equally right; a row each trains on all of them (the vision stage computes a frozen tower's features once per
image, so the repeats cost little), where one row per image would have to drop four or merge them into one
answer no annotator wrote. ``sft``: "Describe the image." -> the caption; ``image_text``: ``{"image", "caption"}``.

``coco-grounding``: ``"Where is the <category>? Answer [x0, y0, x1, y1]."`` -> the box's corners as integers
0-99, per cent of the image's width (x) and height (y), rounded down: the format of ``kernel/synthetic.py``'s
``shape_rows(task="grounding")``. Skipped: crowd regions, and every instance of a category the image has more
than once (the question would have several right answers).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from swiftk.plugins.datasets.registry import Record, SkipRow, register_dataset
from swiftk.plugins.datasets.resolve import ConversionError
from swiftk.plugins.datasets.vision import describe_image, image_of, image_text, one_of, question


def read_coco(kind: str, path: Path, split: str) -> tuple[list[Path], Iterator[tuple[str, Record]]]:
    """COCO's ``annotations/<kind>_<split>*.json`` (or ``path`` itself, a file) and the image folder it names."""
    if path.is_file():
        annotations = path
    else:
        pattern = f"{kind}_{split}*.json"
        found = sorted((path / "annotations").glob(pattern)) or sorted(path.glob(pattern))
        if not found:
            raise FileNotFoundError(f"no annotations/{pattern} (COCO's layout: annotations/{kind}_train2017.json "
                                    f"beside train2017/)")
        annotations = one_of(found, f"{kind} annotation files of split '{split}'", path)
    if not annotations.name.startswith(f"{kind}_"):
        raise FileNotFoundError(f"{annotations.name} is not COCO's {kind} file ({kind}_<split>.json)")
    tag = annotations.stem.removeprefix(f"{kind}_")  # train2017: the image folder's name
    root = annotations.parent.parent if annotations.parent.name == "annotations" else annotations.parent
    folders = [root / tag, root / "images" / tag]
    images = next((f for f in folders if f.is_dir()), None)
    if images is None:
        raise FileNotFoundError(f"{annotations.name} has no image folder: neither {' nor '.join(map(str, folders))}")
    return [annotations, images], coco_rows(kind, annotations, images)


def read_captions(path: Path, split: str) -> tuple[list[Path], Iterator[tuple[str, Record]]]:
    return read_coco("captions", path, split)


def read_instances(path: Path, split: str) -> tuple[list[Path], Iterator[tuple[str, Record]]]:
    return read_coco("instances", path, split)


def coco_rows(kind: str, annotations: Path, folder: Path) -> Iterator[tuple[str, Record]]:
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{annotations}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "annotations" not in data:
        raise ConversionError(f"{annotations}: not a COCO annotation file (it needs 'images' and 'annotations' lists)")
    images = {image.get("id"): image for image in data["images"]}
    categories = {c.get("id"): c.get("name") for c in data.get("categories", [])}
    # How many annotations each image has of each category, crowds included: "Where is the person?" has no one
    # answer in an image of two people, or of one person beside a crowd.
    instances = Counter((a.get("image_id"), a.get("category_id")) for a in data["annotations"])
    for index, annotation in enumerate(data["annotations"]):
        where = f"{annotations}[annotations #{index}]"
        image = images.get(annotation.get("image_id"))
        if image is None:
            raise ConversionError(f"{where} (id {annotation.get('id')}): image_id {annotation.get('image_id')!r} is "
                                  f"not among the file's {len(images)} images; the annotation file is damaged or "
                                  f"from another split")
        if not image.get("file_name"):
            raise ConversionError(f"{where}: its image {image.get('id')!r} has no file_name")
        row = {"image": str(folder / image["file_name"]), "width": image.get("width"), "height": image.get("height")}
        if kind == "captions":
            yield where, {**row, "caption": annotation.get("caption")}
            continue
        category = annotation.get("category_id")
        if category not in categories:
            raise ConversionError(f"{where} (id {annotation.get('id')}): category_id {category!r} is not among the "
                                  f"file's {len(categories)} categories")
        yield where, {**row, "category": categories[category], "bbox": annotation.get("bbox"),
                      "iscrowd": annotation.get("iscrowd", 0), "instances": instances[image["id"], category]}


def percent(value: float, side: float) -> int:
    """A pixel coordinate as an integer 0-99 of the side, rounded down (as ``shape_rows`` writes boxes)."""
    return max(0, min(99, int(value * 100 // side)))


def where_is(row: Record) -> Record:
    """{"image": path, "width": int, "height": int, "category": str, "bbox": [x, y, w, h], "iscrowd": 0 | 1,
    "instances": int}"""
    if row["iscrowd"]:
        raise SkipRow("crowd region (many objects, not one box)")
    if row["instances"] > 1:
        raise SkipRow("category not unique in its image (the question would have several answers)")
    x, y, w, h = (float(v) for v in row["bbox"])
    width, height = float(row["width"]), float(row["height"])
    if w <= 0 or h <= 0:
        raise SkipRow("empty box")
    box = [percent(x, width), percent(y, height), percent(x + w, width), percent(y + h, height)]
    return question({"type": "image", "image": image_of(row["image"])},
                    f"Where is the {row['category']}? Answer [x0, y0, x1, y1].", "[" + ", ".join(map(str, box)) + "]")


FETCH = ("wget http://images.cocodataset.org/annotations/annotations_trainval2017.zip "
         "http://images.cocodataset.org/zips/train2017.zip http://images.cocodataset.org/zips/val2017.zip\n"
         "unzip each into {local}/ (annotations/ beside train2017/ and val2017/)")
SPLITS = {"test": "val"}

register_dataset("coco-captions", hub_id="cocodataset.org/captions", reader=read_captions,
                 converters={"sft": describe_image, "image_text": image_text}, fetch=FETCH,
                 splits={"sft": SPLITS, "image_text": SPLITS},
                 description="COCO images, ~5 human captions each (a row per caption)")
register_dataset("coco-grounding", hub_id="cocodataset.org/instances", reader=read_instances,
                 converters={"sft": where_is}, fetch=FETCH, splits={"sft": SPLITS},
                 description="COCO object boxes as 'Where is the <category>?' -> [x0, y0, x1, y1] in 0-99")
