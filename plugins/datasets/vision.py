"""What the vision datasets (``coco.py``, ``laion.py``, ``webvid.py``) share: the rows they make and where their
images are named.

Their upstream layouts are folders, not rows, so each registers a ``reader`` (``registry.Reader``) that walks the
folder and yields one raw row per example, and row converters that turn those into ours:

* ``sft`` (the ``vlm`` stage): a question with the image (or the video's frames) as a content part, the text as
  the answer::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "/data/coco/train2017/0001.jpg"},
                                               {"type": "text", "text": "Describe the image."}]},
                  {"role": "assistant", "content": "A man riding a horse."}]}

* ``image_text`` (a CLIP-style stage): ``{"image": "/data/coco/train2017/0001.jpg", "caption": "A man riding..."}``.

Where the images are: the converted file lives in swiftk's cache, away from the data, so a path relative to the
data folder would break. An image that is a file on disk (COCO's, WebVid's frames) is named by its absolute path:
copying would duplicate tens of gigabytes into the cache for every task and split, and the conversion's fingerprint
covers the source files' paths, so a moved folder is converted afresh. An image that exists only inside a shard (a
tar member, a parquet cell) has no path: the converter passes its bytes, and ``resolve.write_converted`` stores
each distinct one once in ``<converted>.files/``, named relative to the converted file (where a data file's
relative image paths start), so the cache folder stays whole if moved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from swiftk.plugins.datasets.registry import DatasetError, Record, SkipRow

DESCRIBE_IMAGE = "Describe the image."
DESCRIBE_VIDEO = "Describe the video."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def question(media: dict[str, Any], text: str, answer: str) -> Record:
    """One user turn holding ``media`` (an image or video part) and ``text``, answered by ``answer``."""
    return {"messages": [{"role": "user", "content": [media, {"type": "text", "text": text}]},
                         {"role": "assistant", "content": answer}]}


def image_of(value: Any) -> str | bytes:
    """An image a converted row can name: the bytes of a shard member, or the absolute path of a file that exists."""
    if isinstance(value, bytes | bytearray | memoryview):
        if not value:
            raise SkipRow("empty image bytes")
        return bytes(value)
    if not value:
        raise SkipRow("no image bytes or local file (offline, only downloaded images can be used)")
    if not Path(value).is_file():
        raise SkipRow("image file missing")
    return str(value)


def caption_of(value: Any) -> str:
    """A caption with its whitespace made plain (COCO's end in spaces and newlines); an empty one skips the row."""
    caption = " ".join(str(value or "").split())
    if not caption:
        raise SkipRow("empty caption")
    return caption


def describe_image(row: Record) -> Record:
    """{"image": absolute path | bytes, "caption": str}"""
    image, caption = image_of(row["image"]), caption_of(row["caption"])
    return question({"type": "image", "image": image}, DESCRIBE_IMAGE, caption)


def image_text(row: Record) -> Record:
    """{"image": absolute path | bytes, "caption": str}"""
    return {"image": image_of(row["image"]), "caption": caption_of(row["caption"])}


def natural(path: Path) -> list[Any]:
    """A sort key that puts ``frame_2`` before ``frame_10``."""
    return [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", path.name)]


def one_of(found: list[Path], what: str, where: Path) -> Path:
    """The one file a pattern found; several are ambiguous (COCO's 2014 and 2017 files side by side)."""
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(f"{where}: several {what} ({names}); set data.dataset_path to the one to read")
    return found[0]
