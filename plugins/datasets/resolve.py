"""Find a named dataset's raw rows on this machine and convert them into a JSONL file the kernel's loaders read.

Where the raw rows come from, in order (swiftk never downloads):
1. ``dataset_path``: a file (``.jsonl``, ``.json``, ``.parquet``, any of them ``.gz``) or a folder in the hub's
   layout (``train.jsonl.gz``, ``harmless-base/train.jsonl.gz``, ``data/train_prefs-00000-of-00001.parquet``,
   ``alpaca_data.json``...) or a ``datasets.save_to_disk`` folder. Given, it is the only place looked at.
2. the Hugging Face hub cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``): a snapshot ``hf download`` left there;
3. the ``datasets`` library's cache (``HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``), read with
   ``datasets.load_dataset(hub_id, split=...)`` in offline mode.
Nothing found: ``DatasetNotFound``, saying where it looked and the exact command that fetches the dataset.
A dataset with a folder-level ``reader`` (COCO, image shards, video frames) is read from ``dataset_path`` only.

The converted file is ``<cache>/<name>/<task>-<split>-<hash>.jsonl`` (cache: the ``cache_dir`` argument, else
``$SWIFTK_CACHE/datasets``, else ``~/.cache/swiftk/datasets``), the hash covering the source files (path, size,
mtime), the split, the task and the converter's code, so a changed source or converter is converted afresh and
an unchanged one is reused. Next to it, ``<...>.manifest.json`` says what was read and why rows were skipped, and
``<...>.files/`` holds the images a converter gave as bytes (from a tar or parquet shard), one file per distinct
image, named in the rows by their path relative to the converted file (where data files' images start from).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import inspect
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swiftk.plugins.datasets.registry import DatasetError, DatasetSpec, Record, SkipRow, find_dataset

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # each may also end in .gz (not parquet)
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # a datasets.save_to_disk folder


class DatasetNotFound(DatasetError):
    """No local copy of the dataset: the message lists the places looked at and how to fetch it."""


class ConversionError(DatasetError):
    """A raw row does not have the upstream layout the dataset's converter expects."""


@dataclass
class Raw:
    """Where a dataset's raw rows are, and a fingerprint that changes when they do."""

    where: str
    fingerprint: str
    rows: Callable[[], Iterator[tuple[str, Record]]]  # (origin "file:line" or "file[#i]", row)


def resolve_dataset(name: str, *, task_type: str | None = None, dataset_path: str | os.PathLike[str] | None = None,
                    split: str = "train", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The JSONL file of ``name``'s ``split``, converted for ``task_type``: ``{"messages": [...]}`` rows for sft,
    ``{"prompt", "chosen", "rejected"}`` rows for preference and kto, ``{"image", "caption"}`` rows for
    image_text. Converted once, then reused."""
    spec = find_dataset(name)
    task = spec.task(task_type)
    hub_split = spec.hub_split(task, split)
    raw = locate(spec, task, hub_split, dataset_path)
    convert = spec.converters[task]
    code = code_hash(convert) if spec.reader is None else code_hash(convert) + code_hash(spec.reader)
    key = json.dumps([spec.hub_id, task, hub_split, code, raw.fingerprint])
    out = cache_root(cache_dir) / slug(spec.name) / f"{task}-{slug(hub_split)}-{sha(key)[:16]}.jsonl"
    if not out.is_file():
        write_converted(spec, task, hub_split, raw, convert, out)
    return out


def summary(path: str | os.PathLike[str]) -> str:
    """One line on a converted file, from its manifest: for the kernel's "data: ..." message."""
    if not manifest_path(Path(path)).is_file():
        return str(path)
    m = json.loads(manifest_path(Path(path)).read_text(encoding="utf-8"))
    skipped = ", ".join(f"{reason}: {n}" for reason, n in m["skipped"].items())
    return (f"{m['dataset']} ({m['hub_id']}, split {m['split']}, task {m['task_type']}) from {m['source']}: "
            f"{m['kept']} of {m['rows']} rows" + (f" (skipped {skipped})" if skipped else ""))


# ------------------------------------------------------------------------------------------ locating


def locate(spec: DatasetSpec, task: str, hub_split: str, dataset_path: str | os.PathLike[str] | None) -> Raw:
    if spec.reader is not None:
        return from_reader(spec, task, hub_split, dataset_path)
    if dataset_path is not None:
        return from_path(spec, hub_split, Path(dataset_path).expanduser())
    tried = [("data.dataset_path", "not set")]
    hub_cache = hf_cache("HF_HUB_CACHE", "hub")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec.hub_id, repo_type="dataset", local_files_only=True,
                                        cache_dir=str(hub_cache)))
        files = split_files(folder, hub_split, spec.files.get(hub_split, ()))
        if files:
            return files_raw(f"hub cache {folder}", files, folder)
        tried.append((f"hub cache {hub_cache}", f"snapshot {folder} has no files of split '{hub_split}'"))
    except Exception as exc:  # LocalEntryNotFoundError and friends: nothing usable there
        tried.append((f"hub cache {hub_cache}", f"no snapshot of {spec.hub_id} ({type(exc).__name__})"))
    datasets_cache = hf_cache("HF_DATASETS_CACHE", "datasets")
    try:
        import datasets

        with offline():
            dataset = datasets.load_dataset(spec.hub_id, split=hub_split, cache_dir=str(datasets_cache))
        return dataset_raw(f"datasets cache {datasets_cache}", dataset)
    except Exception as exc:  # ConnectionError (offline, not cached), ValueError (no such split)...
        tried.append((f"datasets cache {datasets_cache}", f"load_dataset('{spec.hub_id}', split='{hub_split}') "
                      f"failed offline: {first_line(exc)}"))
    raise not_found(spec, task, hub_split, tried)


def from_path(spec: DatasetSpec, hub_split: str, path: Path) -> Raw:
    where = f"data.dataset_path = {path}"
    if not path.exists():
        raise not_found(spec, "", hub_split, [(where, "does not exist")])
    if path.is_file():
        return files_raw(where, [path])
    if any((path / marker).is_file() for marker in SAVED_MARKERS):
        import datasets

        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if hub_split not in saved:
                raise not_found(spec, "", hub_split, [(where, f"saved splits are {', '.join(saved)}")])
            saved = saved[hub_split]
        return dataset_raw(where, saved)
    files = split_files(path, hub_split, spec.files.get(hub_split, ()))
    if not files:
        present = [str(p.relative_to(path)) for p in data_files(path)][:8]
        raise not_found(spec, "", hub_split, [(where, f"no files of split '{hub_split}' (looked for "
                                               f"{hub_split}.jsonl[.gz], {hub_split}-*.parquet, */{hub_split}.*, "
                                               f"{hub_split}/*; data files there: {', '.join(present) or 'none'})")])
    return files_raw(where, files, path)


def from_reader(spec: DatasetSpec, task: str, hub_split: str, dataset_path: str | os.PathLike[str] | None) -> Raw:
    """The raw rows of a dataset whose layout only its reader knows, from ``dataset_path`` (no cache has it)."""
    assert spec.reader is not None
    if dataset_path is None:
        raise not_found(spec, task, hub_split, [("data.dataset_path", f"not set; '{spec.name}' is read from a "
                                                 f"local copy in its upstream layout only")])
    path = Path(dataset_path).expanduser().absolute()  # the rows name its files by absolute path
    where = f"data.dataset_path = {path}"
    if not path.exists():
        raise not_found(spec, task, hub_split, [(where, "does not exist")])
    try:
        files, rows = spec.reader(path, hub_split)
    except FileNotFoundError as exc:
        raise not_found(spec, task, hub_split, [(where, str(exc))]) from None
    root = path if path.is_dir() else path.parent
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in files]
    label = f"{where}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return Raw(label, fingerprint(files), lambda: iter(rows))


def split_files(folder: Path, hub_split: str, patterns: tuple[str, ...] = ()) -> list[Path]:
    """The data files of ``hub_split`` in a folder laid out as on the hub: the spec's own patterns first, else
    every file named ``<split>.<ext>`` or ``<split>-<shard>.<ext>``, or inside a folder named ``<split>``."""
    for pattern in patterns:
        found = sorted(p for p in folder.glob(pattern) if p.is_file() and data_stem(p) is not None)
        if found:
            return found
    return [p for p in data_files(folder)
            if data_stem(p) == hub_split or str(data_stem(p)).startswith(hub_split + "-") or p.parent.name == hub_split]


def data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and data_stem(p) is not None
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def data_stem(path: Path) -> str | None:
    """``train`` for ``train.jsonl.gz``; None for a file that is not data."""
    name = path.name.removesuffix(".gz")
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix) and not (suffix == ".parquet" and path.name.endswith(".gz")):
            return name[: -len(suffix)]
    return None


def hf_cache(variable: str, sub: str) -> Path:
    """Where the HF libraries keep a cache, read from the environment now (not when they were imported)."""
    if os.environ.get(variable):
        return Path(os.environ[variable]).expanduser()
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser() / sub


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE for the call, whatever the environment said when the libraries were imported."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def not_found(spec: DatasetSpec, task: str, hub_split: str, tried: list[tuple[str, str]]) -> DatasetNotFound:
    local = f"data/{slug(spec.name)}"
    what = f"split '{hub_split}'" + (f" for task '{task}'" if task else "")
    fetch = [f"  {line}" for line in spec.fetch.replace("{local}", local).splitlines()] or [
        f"  huggingface-cli download {spec.hub_id} --repo-type dataset --local-dir {local}",
        "  (or `hf download ...`, same arguments)"]
    return DatasetNotFound("\n".join([
        f"dataset '{spec.name}' ({spec.hub_id}, {what}): no local copy found (swiftk does not download). Looked at:",
        *(f"  {place}: {why}" for place, why in tried),
        "Fetch it on a machine that reaches " + ("its source:" if spec.fetch else "the hub:"),
        *fetch,
        f"  then copy {local}/ here, and set data.dataset_path = \"{local}\" (the folder, or one of its data files).",
    ]))


# ------------------------------------------------------------------------------------------ reading


def files_raw(where: str, files: list[Path], folder: Path | None = None) -> Raw:
    names = [str(p.relative_to(folder)) for p in files] if folder is not None else []
    label = f"{where}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    label = label if names else where
    return Raw(label, fingerprint(files), lambda: (row for p in files for row in read_file(p)))


def fingerprint(files: list[Path]) -> str:
    """What changes when a source file (or a folder's list of files) does: paths, sizes, times."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return sha(json.dumps(stats))


def dataset_raw(where: str, dataset: Any) -> Raw:
    fingerprint = str(getattr(dataset, "_fingerprint", "")) or sha(repr(dataset))
    return Raw(where, fingerprint, lambda: ((f"{where}[#{i}]", dict(row)) for i, row in enumerate(dataset)))


def read_file(path: Path) -> Iterator[tuple[str, Record]]:
    """Rows of one data file, each with its origin (``file:line`` for JSON lines, ``file[#i]`` otherwise)."""
    stem = data_stem(path)
    if stem is None:
        raise DatasetError(f"{path}: not a data file; expected .jsonl, .json or .parquet (the first two may be .gz)")
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}[#{index}]", row
                index += 1
        return
    opener: Callable[..., Any] = gzip.open if path.name.endswith(".gz") else open
    if path.name.removesuffix(".gz").endswith(".json"):
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines under a .json name, which the hub has plenty of
        if data is not None:
            rows = next(iter(data.values())) if isinstance(data, dict) and len(data) == 1 else data
            if not isinstance(rows, list):
                raise DatasetError(f"{path}: a .json dataset must be a list of objects (or JSON lines)")
            yield from ((f"{path}[#{i}]", row) for i, row in enumerate(rows))
            return
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


# ------------------------------------------------------------------------------------------ converting


def write_converted(spec: DatasetSpec, task: str, hub_split: str, raw: Raw, convert: Callable[[Record], Record],
                    out: Path) -> None:
    """Convert every raw row into ``out`` (written whole, then renamed: a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    skipped: Counter[str] = Counter()
    rows = kept = 0
    store = FileStore(files_path(out))
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for where, row in raw.rows():
                rows += 1
                try:
                    record = convert(row)
                except SkipRow as exc:
                    skipped[str(exc)] += 1
                    continue
                except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
                    expected = (inspect.getdoc(convert) or "").split("\n")[0]
                    raise ConversionError(f"{where}: not a '{spec.name}' row for task '{task}' "
                                          f"({type(exc).__name__}: {exc}); expected: {expected}") from None
                handle.write(json.dumps(record, ensure_ascii=False, default=store) + "\n")
                kept += 1
        if not kept:
            reasons = ", ".join(f"{r}: {n}" for r, n in skipped.items()) or "no rows"
            raise DatasetError(f"dataset '{spec.name}' from {raw.where}: none of its {rows} rows could be used "
                               f"for task '{task}' ({reasons})")
        manifest = {"dataset": spec.name, "hub_id": spec.hub_id, "task_type": task, "split": hub_split,
                    "source": raw.where, "rows": rows, "kept": kept, "skipped": dict(skipped)}
        if store.written:
            manifest["files"] = {"folder": files_path(out).name, "count": len(store.written)}
        # Both files are written whole and renamed into place: ranks that resolve at once never read half a file.
        staged = manifest_path(tmp)
        staged.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(staged, manifest_path(out))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        manifest_path(tmp).unlink(missing_ok=True)


def manifest_path(out: Path) -> Path:
    return out.with_suffix(".manifest.json")


def files_path(out: Path) -> Path:
    return out.with_suffix(".files")


class FileStore:
    """``json.dumps``'s ``default``: bytes in a record (an image from a shard) become a file in ``folder``, named by
    their hash (one file per distinct image, written whole then renamed), and the record names it relative to the
    converted file's folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: set[str] = set()

    def __call__(self, value: Any) -> str:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"a converted record holds a {type(value).__name__}, which JSON cannot; "
                            f"a converter returns JSON values (or bytes, stored as files)")
        data = bytes(value)
        name = sha(data)[:24] + image_suffix(data)
        target = self.folder / name
        if name not in self.written and not target.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(f"{name}.{os.getpid()}.tmp")
            staged.write_bytes(data)
            os.replace(staged, target)
        self.written.add(name)
        return f"{self.folder.name}/{name}"


def image_suffix(data: bytes) -> str:
    """The suffix of the image formats shards hold, from their first bytes (PIL reads by content anyway)."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:4] == b"\x89PNG":
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".gif" if data[:4] == b"GIF8" else ".img"


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SWIFTK_CACHE"):
        return Path(os.environ["SWIFTK_CACHE"]).expanduser() / "datasets"
    return Path.home() / ".cache" / "swiftk" / "datasets"


def code_hash(fn: Callable[..., Any]) -> str:
    """A converter's code: its source file's bytes, so an edited converter converts afresh."""
    try:
        return sha(Path(inspect.getsourcefile(fn) or "").read_bytes())
    except (TypeError, OSError):
        return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "dataset"


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
