"""LAION image-text pairs (Schuhmann et al. 2022, LAION-5B; LAION-400M, 2021), as img2dataset downloads them.

LAION publishes only metadata (parquet: ``URL``, ``TEXT``, ``similarity``...); img2dataset fetches the images
into numbered shards, in one of three output formats, each shard beside a metadata parquet of the same name (every
row, the failed downloads too, without images) and ``<shard>_stats.json``::

    webdataset: 00000.tar     000000000.jpg, 000000000.txt (the caption), 000000000.json (url, status, size...)
    parquet:    00000.parquet columns key, jpg (the image's bytes; null where the download failed), txt, url...
    files:      00000/        000000000.jpg, 000000000.txt, 000000000.json

``data.dataset_path`` is that folder (test reads its ``test/`` subfolder) or one shard. Offline only images that
were downloaded can be used: a parquet row without image bytes (a failed download, or LAION's own metadata
file) is skipped and counted. A sample in a tar or a folder without its caption or its image is an error naming
the shard and the sample, as img2dataset never writes one.

Ours: ``sft``, "Describe the image." -> the caption; ``image_text``, ``{"image", "caption"}`` for a CLIP-style
stage. Images from a tar or parquet are stored once beside the converted file; files are named by absolute path.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from swiftk.plugins.datasets.registry import Record, register_dataset
from swiftk.plugins.datasets.resolve import ConversionError
from swiftk.plugins.datasets.vision import IMAGE_SUFFIXES, describe_image, image_text

IMAGE_EXTENSIONS = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)  # a webdataset member's extension: jpg, png...
CAPTION_COLUMNS = ("txt", "caption", "TEXT", "text")  # img2dataset's; its input's; LAION's metadata; HF's
IMAGE_COLUMNS = (*IMAGE_EXTENSIONS, "image")  # img2dataset's (jpg by default); a datasets.Image column


def read_laion(path: Path, split: str) -> tuple[list[Path], Iterator[tuple[str, Record]]]:
    """img2dataset's shards in ``path`` (or ``path/<split>``), or ``path`` itself, one shard."""
    if path.is_file():
        shards = [path]
    else:
        folder = path / split if (path / split).is_dir() else path if split == "train" else None
        if folder is None:
            raise FileNotFoundError(f"no {split}/ folder of shards (the folder itself holds split 'train')")
        tars = sorted(folder.glob("*.tar"))
        folders = sorted(d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.txt")))
        beside = {p.stem for p in (*tars, *folders)}  # their metadata parquets hold no images
        shards = [*tars, *folders, *(p for p in sorted(folder.glob("*.parquet")) if p.stem not in beside)]
        if not shards:
            raise FileNotFoundError("no img2dataset shards: *.tar (--output_format webdataset), *.parquet with "
                                    "image bytes (parquet) or folders of .jpg + .txt (files)")
    return shards, (row for shard in shards for row in shard_rows(shard))


def shard_rows(shard: Path) -> Iterator[tuple[str, Record]]:
    if shard.is_dir():
        members = ((p.name, p) for p in sorted(shard.iterdir()) if p.is_file())
        yield from samples(shard, members)
    elif shard.suffix == ".tar":
        with tarfile.open(shard) as tar:
            files = (m for m in tar if m.isfile())
            yield from samples(shard, ((m.name, tar.extractfile(m).read()) for m in files))  # type: ignore[union-attr]
    elif shard.suffix == ".parquet":
        yield from parquet_rows(shard)
    else:
        raise ConversionError(f"{shard}: not an img2dataset shard (a .tar, a .parquet or a folder of files)")


def samples(shard: Path, members: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Record]]:
    """WebDataset's grouping: consecutive members sharing a key (the name up to its first dot) are one sample;
    a member is bytes (from a tar) or a file's path."""
    key, parts = None, {}
    for name, value in members:
        folder, _, base = name.rpartition("/")
        stem, _, extension = base.partition(".")
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key and key is not None:
            yield sample(shard, key, parts)
            parts = {}
        key = member_key
        parts[extension.lower()] = value
    if key is not None:
        yield sample(shard, key, parts)


def sample(shard: Path, key: str, parts: dict[str, Any]) -> tuple[str, Record]:
    where = f"{shard}[{key}]"
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    if image is None or "txt" not in parts:
        missing = "caption (.txt)" if image is not None else f"image ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})"
        raise ConversionError(f"{where}: sample '{key}' has no {missing}; its members: "
                              f"{', '.join(f'{key}.{e}' for e in parts)}")
    caption = parts["txt"]
    caption = caption.read_text(encoding="utf-8") if isinstance(caption, Path) else caption.decode("utf-8")
    return where, {"key": key, "image": str(image) if isinstance(image, Path) else image, "caption": caption}


def parquet_rows(shard: Path) -> Iterator[tuple[str, Record]]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(shard)
    columns = table.schema_arrow.names
    caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption is None:
        raise ConversionError(f"{shard}: no caption column ({', '.join(CAPTION_COLUMNS)}); its columns: "
                              f"{', '.join(columns)}")
    image = next((c for c in IMAGE_COLUMNS if c in columns), None)
    index = 0
    for batch in table.iter_batches(batch_size=256, columns=[caption, *([image] if image else [])]):
        for row in batch.to_pylist():
            yield f"{shard}[#{index}]", {"image": cell_image(row.get(image or ""), shard.parent),
                                         "caption": row[caption]}
            index += 1


def cell_image(value: Any, folder: Path) -> Any:
    """A parquet cell's image: its bytes, or a ``{"bytes", "path"}`` record's (a path starts at the shard's
    folder); None where there is none."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        return str(folder / value["path"]) if value.get("path") else None
    return value


FETCH = ("the metadata: huggingface-cli download laion/laion400m --repo-type dataset --local-dir data/laion-meta\n"
         "the images: img2dataset --url_list data/laion-meta --input_format parquet --url_col URL "
         "--caption_col TEXT --output_format webdataset --output_folder {local}")

register_dataset("laion", hub_id="laion/laion400m", reader=read_laion, fetch=FETCH,
                 converters={"sft": describe_image, "image_text": image_text},
                 description="web image-alt-text pairs, as img2dataset shards (webdataset tar, parquet or files)")
