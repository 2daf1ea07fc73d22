"""Named datasets: ``data.dataset_name = "hh-rlhf"`` (ms-swift style) becomes a JSONL file the kernel reads.

The API the kernel calls (import ``swiftk.plugins.datasets``; importing it registers the built-ins):

``find_dataset(name, task_type=None) -> DatasetSpec``
    While validating the config, before anything loads: the dataset registered as ``name`` (its name, an alias
    or its hub id, any case), checked to serve ``task_type`` if given. Touches no data and no network.
    Raises ``UnknownDataset`` (with the closest names) or ``UnsupportedTask`` (naming the task types it serves).

``resolve_dataset(name, *, task_type=None, dataset_path=None, split="train", cache_dir=None) -> Path``
    The converted JSONL file, to use as ``data.train_file`` (``split="test"`` for ``data.eval_file``):
    ``{"messages": [...]}`` rows for ``sft`` (read by ``kernel.data.build_dataset``; the vision datasets' hold
    image or video parts, read by the ``vlm`` stage), ``{"prompt", "chosen", "rejected"}`` rows for
    ``preference`` and ``kto`` (read by ``stages.pairs.build_pairs`` / ``build_unpaired``), ``{"image",
    "caption"}`` rows for ``image_text`` (a CLIP-style stage). ``task_type``: ``sft``, ``preference``, ``kto``,
    ``image_text``, a stage name (``dpo``, ``simpo``, ``orpo``, ``cpo``, ``rm`` mean ``preference``; ``clip``
    means ``image_text``), or None/"auto" for the dataset's first task.
    Raw rows come from ``dataset_path`` (a file, or a folder in the hub's layout), else the HF hub cache, else
    the ``datasets`` cache (read offline); the result is cached under ``cache_dir`` (default
    ``$SWIFTK_CACHE/datasets`` or ``~/.cache/swiftk/datasets``; a run may pass ``<output_dir>/datasets``) and
    reused while the source and converter are unchanged. Raises ``DatasetNotFound`` (where it looked, the
    ``huggingface-cli download ...`` command, and ``data.dataset_path`` to set), ``ConversionError`` (a row
    not in the upstream layout, with its file:line), ``UnknownDataset`` / ``UnsupportedTask`` as above.
    Every error is a ``DatasetError``: the kernel can re-raise it as its ``DataError`` (or ``ConfigError``).

``summary(path) -> str``
    One line on a converted file (source, rows kept and skipped, by reason), for the kernel's "data: ..." line.

``listing() -> str``: a table of the registered datasets, for a ``swiftk datasets`` command.
``forget_source(file)``: drop what a plugin file registered, before a new run imports it afresh.

For plugins: ``register_dataset(name, *, hub_id, converters={"sft" | "preference" | "kto" | "image_text": fn},
aliases=(), splits=None, files=None, description="", reader=None, fetch="") -> DatasetSpec``, called from a file
in the config's ``plugins = [...]`` or from a module behind an entry point of the ``swiftk.datasets`` group. A
converter maps one raw row to one record of ours, or raises ``SkipRow("why")``; it may give an image as bytes,
stored beside the converted file. A ``reader`` turns a folder whose layout is not rows (COCO, image shards) into
raw rows (``registry.Reader``); ``fetch`` says how to get that folder. ``SAMPLES`` is the folder of the small
sample files, one per upstream layout (``SAMPLES / "hh-rlhf" / "train.jsonl"``: 10 hh-rlhf pairs; ``SAMPLES /
"coco"``: three images in COCO's layout, written by ``scripts/vision_samples.py``).
"""

from pathlib import Path

from swiftk.plugins.datasets import alpaca, coco, hh_rlhf, laion, sharegpt, ultrafeedback, webvid
from swiftk.plugins.datasets.registry import (
    ENTRY_POINT_GROUP,
    TASK_TYPES,
    DatasetError,
    DatasetSpec,
    SkipRow,
    UnknownDataset,
    UnsupportedTask,
    find_dataset,
    forget_source,
    listing,
    register_dataset,
    registered_datasets,
)
from swiftk.plugins.datasets.resolve import ConversionError, DatasetNotFound, resolve_dataset, summary

SAMPLES = Path(__file__).resolve().parent / "samples"

__all__ = ["ENTRY_POINT_GROUP", "SAMPLES", "TASK_TYPES", "ConversionError", "DatasetError", "DatasetNotFound",
           "DatasetSpec", "SkipRow", "UnknownDataset", "UnsupportedTask", "alpaca", "coco", "find_dataset",
           "forget_source", "hh_rlhf", "laion", "listing", "register_dataset", "registered_datasets",
           "resolve_dataset", "sharegpt", "summary", "ultrafeedback", "webvid"]
