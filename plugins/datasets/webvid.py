"""WebVid (Bain et al. 2021, Frozen in Time): stock-footage clips with their alt-text captions.

Upstream layout: the metadata CSVs (``results_2M_train.csv``, ``results_2M_val.csv``, ``results_10M_train.csv``),
one clip per row::

    videoid,contentUrl,duration,page_dir,name
    1066692451,https://.../1066692451.mp4,PT00H00M14S,1066692451/,Aerial view of a lake at dawn.

Offline, frames extracted beforehand beside them: ``videos/<videoid>/frame_0001.jpg`` ... (``ffmpeg -i
<videoid>.mp4 -vf fps=1 videos/<videoid>/frame_%04d.jpg``). ``data.dataset_path`` is that folder (its CSV of the
split: ``*train*.csv``, test reads ``*val*.csv``) or the CSV. A row whose frames are missing (a clip not
downloaded: most of WebVid's are gone from the web) is skipped and counted.

Ours (``sft``): the frames as a video part, "Describe the video." -> the caption. A clip with more than
``MAX_FRAMES`` frames gives that many, evenly spaced, first and last included: each frame costs a model as many
tokens as an image. Frames are named by absolute path.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from swiftk.plugins.datasets.registry import Record, SkipRow, register_dataset
from swiftk.plugins.datasets.resolve import ConversionError
from swiftk.plugins.datasets.vision import DESCRIBE_VIDEO, IMAGE_SUFFIXES, caption_of, natural, one_of, question

MAX_FRAMES = 8
COLUMNS = ("videoid", "name")


def read_webvid(path: Path, split: str) -> tuple[list[Path], Iterator[tuple[str, Record]]]:
    """The split's metadata CSV in ``path`` (or ``path`` itself) and the ``videos/`` folder of frames beside it."""
    if path.is_file():
        table = path
    else:
        found = sorted(path.glob(f"*{split}*.csv"))
        if not found:
            raise FileNotFoundError(f"no *{split}*.csv (WebVid's metadata: results_2M_train.csv, results_2M_val.csv); "
                                    f"CSV files there: {', '.join(p.name for p in path.glob('*.csv')) or 'none'}")
        table = one_of(found, f"metadata files of split '{split}'", path)
    frames = table.parent / "videos"
    if not frames.is_dir():
        raise FileNotFoundError(f"no videos/ folder beside {table.name} (offline, WebVid's clips are read as "
                                f"frames extracted into videos/<videoid>/frame_*.jpg)")
    return [table, frames], webvid_rows(table, frames)


def webvid_rows(table: Path, frames: Path) -> Iterator[tuple[str, Record]]:
    with table.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConversionError(f"{table}: no {' or '.join(missing)} column; WebVid's CSV has videoid, contentUrl, "
                                  f"duration, page_dir, name (the caption); its columns: "
                                  f"{', '.join(reader.fieldnames or [])}")
        for row in reader:
            videoid = str(row["videoid"] or "").strip()
            yield f"{table}:{reader.line_num}", {"videoid": videoid, "caption": row["name"],
                                                 "frames": [str(p) for p in frames_of(frames, videoid)]}


def frames_of(frames: Path, videoid: str) -> list[Path]:
    """The clip's frames in order (absolute paths), at most ``MAX_FRAMES``; none for a clip not extracted."""
    if Path(videoid).name != videoid or videoid in ("", ".", ".."):
        return []
    found = [p for p in (frames / videoid).glob("frame_*") if p.suffix.lower() in IMAGE_SUFFIXES]
    return spaced(sorted(found, key=natural), MAX_FRAMES)


def spaced(frames: list[Path], most: int) -> list[Path]:
    """At most ``most`` of ``frames``, evenly spaced, the first and the last included."""
    if len(frames) <= most:
        return frames
    return [frames[round(i * (len(frames) - 1) / (most - 1))] for i in range(most)]


def describe_video(row: Record) -> Record:
    """{"videoid": str, "caption": str, "frames": [absolute path, ...]}"""
    if not row["frames"]:
        raise SkipRow("no frames (videos/<videoid>/frame_*.jpg)")
    return question({"type": "video", "video": list(row["frames"])}, DESCRIBE_VIDEO, caption_of(row["caption"]))


register_dataset("webvid", hub_id="m-bain/webvid", aliases=("webvid-10m",), reader=read_webvid,
                 converters={"sft": describe_video}, splits={"sft": {"test": "val"}},
                 fetch=("the metadata CSVs and clips: see https://github.com/m-bain/webvid; then per clip\n"
                        "ffmpeg -i <videoid>.mp4 -vf fps=1 {local}/videos/<videoid>/frame_%04d.jpg"),
                 description="stock-footage clips as frames, with their captions")
