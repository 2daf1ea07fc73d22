"""Write data/easy_vqa/ from the `easy-vqa` package (4,000 train / 1,000 test 64x64 shape images, 13 answers):
rows in swiftk's multimodal format, images named inside the installed package (``package:easy_vqa/...``), so
the files are small and work wherever the package is installed (`pip install easy-vqa`).

    .venv/bin/python scripts/easy_vqa_data.py

train.parquet: per image, one question about the shape or its colour ("what ...") and one yes/no question
(8,000 rows). test.jsonl: per image of the test split, one question drawn at random (1,000 rows), in the same
mix of question kinds as the package's test questions. Deterministic (seed 0).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import easy_vqa
import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent.parent / "data" / "easy_vqa"


def row(split: str, question: str, answer: str, image: int) -> dict[str, object]:
    """ms-swift's layout: the image as an ``<image>`` placeholder in the text, the files in ``images``."""
    return {"messages": [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}],
            "images": [f"package:easy_vqa/data/{split}/images/{image}.png"]}


def by_image(questions: tuple[list[str], list[str], list[int]]) -> dict[int, list[tuple[str, str]]]:
    grouped: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image in zip(*questions, strict=True):
        grouped[image].append((question, answer))
    return grouped


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    train = []
    for image, pairs in sorted(by_image(easy_vqa.get_train_questions()).items()):
        open_ = [p for p in pairs if p[1] not in ("yes", "no")]
        yes_no = [p for p in pairs if p[1] in ("yes", "no")]
        for pool in (open_, yes_no):
            if pool:
                train.append(row("train", *rng.choice(pool), image))
    pq.write_table(pa.Table.from_pylist(train), OUT / "train.parquet", compression="zstd")
    with (OUT / "test.jsonl").open("w") as handle:
        for image, pairs in sorted(by_image(easy_vqa.get_test_questions()).items()):
            handle.write(json.dumps(row("test", *rng.choice(pairs), image)) + "\n")
    print(f"{len(train)} train rows, 1000 test rows in {OUT}")


if __name__ == "__main__":
    main()
