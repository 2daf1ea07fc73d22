"""Write the vision datasets' sample folders (plugins/datasets/samples/{coco,laion,webvid}/), each in its upstream
layout, from ``kernel/synthetic.py``'s shape images (a coloured shape on a light background), so the converters
are tested on files laid out as the real ones are. Deterministic (seed 0); under 100 KB in all.

    .venv/bin/python scripts/vision_samples.py

coco/:   annotations/captions_train2017.json (two captions an image), annotations/instances_train2017.json (one box
         an image; categories are the shapes), train2017/000000000001.jpg ... (three 48x32 images: the shape's
         box is not square in per cent, so x and y scale differently)
laion/:  webdataset/00000.tar (three samples: .jpg, .txt, .json) beside its metadata 00000.parquet and
         00000_stats.json, as img2dataset --output_format webdataset leaves them; parquet/00000.parquet (the
         image bytes in a jpg column; the third download failed: no bytes)
webvid/: results_2M_train.csv (three clips) and videos/<videoid>/frame_0001.jpg ... (four frames of a shape moving
         right, for the first two clips; the third was not downloaded)
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from swiftk.kernel.synthetic import SHAPES, shape_image

OUT = Path(__file__).resolve().parent.parent / "plugins" / "datasets" / "samples"
BACKGROUND = (245, 245, 240)


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def shapes(rng: random.Random, n: int) -> list[tuple[Image.Image, str, str, tuple[int, int, int, int]]]:
    return [shape_image(rng) for _ in range(n)]


def coco(rng: random.Random) -> None:
    root = OUT / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images, captions, instances = [], [], []
    for number, (shape, colour, kind, (x0, y0, x1, y1)) in enumerate(shapes(rng, 3), start=1):
        canvas = Image.new("RGB", (48, 32), BACKGROUND)
        canvas.paste(shape, (16, 0))  # the 32x32 shape image on the right of a wider one
        name = f"{number:012d}.jpg"
        (root / "train2017" / name).write_bytes(jpeg(canvas))
        images.append({"id": number, "file_name": name, "width": 48, "height": 32, "license": 1,
                       "coco_url": f"http://images.cocodataset.org/train2017/{name}", "date_captured": ""})
        captions += [{"id": 10 * number, "image_id": number, "caption": f"A {colour} {kind} on a light background."},
                     {"id": 10 * number + 1, "image_id": number, "caption": f"a {colour} {kind} to the right \n"}]
        x, w, h = x0 + 16, x1 - x0, y1 - y0
        instances.append({"id": 100 + number, "image_id": number, "category_id": SHAPES.index(kind) + 1,
                          "bbox": [float(x), float(y0), float(w), float(h)], "area": float(w * h), "iscrowd": 0,
                          "segmentation": [[x, y0, x + w, y0, x + w, y0 + h, x, y0 + h]]})
    head = {"info": {"description": "swiftk's COCO-layout sample", "version": "1.0", "year": 2017},
            "licenses": [{"id": 1, "name": "CC0", "url": ""}], "images": images}
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)]
    write_json(root / "annotations" / "captions_train2017.json", {**head, "annotations": captions})
    write_json(root / "annotations" / "instances_train2017.json",
               {**head, "annotations": instances, "categories": categories})


def laion(rng: random.Random) -> None:
    made = shapes(rng, 6)
    meta = [{"url": f"https://example.com/shapes/{i}.jpg", "caption": f"{colour} {kind} clipart",
             "key": f"{i:09d}", "status": "success", "error_message": None, "width": 32, "height": 32,
             "original_width": 32, "original_height": 32} for i, (_, colour, kind, _) in enumerate(made)]
    shards = OUT / "laion" / "webdataset"
    shards.mkdir(parents=True)
    with tarfile.open(shards / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for (image, _, _, _), row in zip(made[:3], meta[:3], strict=True):
            for extension, data in (("jpg", jpeg(image)), ("txt", row["caption"].encode()),
                                    ("json", json.dumps(row, indent=4).encode())):
                member = tarfile.TarInfo(f"{row['key']}.{extension}")
                member.size, member.mode = len(data), 0o644
                tar.addfile(member, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(meta[:3]), shards / "00000.parquet")
    write_json(shards / "00000_stats.json", {"count": 3, "successes": 3, "failed_to_download": 0})
    shards = OUT / "laion" / "parquet"
    shards.mkdir()
    rows = [{"key": row["key"], "jpg": jpeg(image), "txt": row["caption"], **row}
            for (image, _, _, _), row in zip(made[3:], meta[3:], strict=True)]
    rows[-1].update(jpg=None, txt=None, status="failed_to_download", error_message="HTTP Error 404: Not Found")
    pq.write_table(pa.Table.from_pylist(rows), shards / "00000.parquet")
    write_json(shards / "00000_stats.json", {"count": 3, "successes": 2, "failed_to_download": 1})


def webvid(rng: random.Random) -> None:
    root = OUT / "webvid"
    rows = []
    for clip, (shape, colour, kind, _) in enumerate(shapes(rng, 3)):
        videoid = str(rng.randint(10**9, 2 * 10**9))
        rows.append([videoid, f"https://ak.picdn.net/shutterstock/videos/{videoid}/preview/stock-footage.mp4",
                     "PT00H00M04S", "006001_006050", f"A {colour} {kind} moving to the right, seen from the front."])
        if clip == 2:
            continue  # listed in the CSV, never downloaded
        (root / "videos" / videoid).mkdir(parents=True)
        for frame in range(4):
            canvas = Image.new("RGB", (48, 32), BACKGROUND)
            canvas.paste(shape, (4 * frame, 0))
            (root / "videos" / videoid / f"frame_{frame + 1:04d}.jpg").write_bytes(jpeg(canvas))
    with (root / "results_2M_train.csv").open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator="\n").writerows([["videoid", "contentUrl", "duration", "page_dir", "name"],
                                                           *rows])


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    for name in ("coco", "laion", "webvid"):
        shutil.rmtree(OUT / name, ignore_errors=True)
    coco(rng)
    laion(rng)
    webvid(rng)
    files = [p for name in ("coco", "laion", "webvid") for p in (OUT / name).rglob("*") if p.is_file()]
    print(f"{len(files)} files, {sum(p.stat().st_size for p in files) / 1024:.1f} KB in {OUT}")


if __name__ == "__main__":
    main()
