"""Named datasets: ``hh-rlhf`` -> hub id, the task types it serves, its splits, and one row converter per task.

A converter turns one raw row of the upstream layout into one record of ours (what ``kernel/data.py`` and
``stages/pairs.py`` read), or raises ``SkipRow`` for a row that cannot be used (the reason is counted). A dataset
whose upstream layout is not rows (COCO's annotation file and image folders, tar shards, a CSV beside frame
folders) also has a ``reader``: it turns the folder into raw rows, which the converters then take one by one.
Built-in datasets register themselves in their converter's module; a plugin does the same with
``register_dataset(...)``, from a file named in the config's ``plugins = [...]`` or from an entry point of the
``swiftk.datasets`` group (a ``DatasetSpec``, a list of them, a zero-argument function returning either, or a
module whose import calls ``register_dataset``).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

Record = dict[str, Any]
Converter = Callable[[Record], Record]  # raw upstream row -> our record; raises SkipRow to leave a row out
# A folder-level reader: (data.dataset_path, hub split) -> the files it reads (their sizes and times fingerprint
# the conversion) and its raw rows as (origin, row) pairs, read lazily. It raises FileNotFoundError, saying what it
# looked for, when the layout is not there, and DatasetError for an entry that contradicts another.
Reader = Callable[[Path, str], tuple[list[Path], Iterable[tuple[str, Record]]]]

# "image_text": {"image", "caption"} pairs, what the clip stage (plugins/stages/clip.py) reads.
TASK_TYPES = ("sft", "preference", "kto", "image_text")
# Other names a config may use for a task type: swiftk's stage names, and "rlhf" as ms-swift writes it.
TASK_ALIASES = {"dpo": "preference", "simpo": "preference", "orpo": "preference", "cpo": "preference",
                "rm": "preference", "rlhf": "preference", "pairs": "preference",
                "clip": "image_text", "image-text": "image_text"}
ENTRY_POINT_GROUP = "swiftk.datasets"


class DatasetError(Exception):
    """A named dataset cannot be found, resolved or converted; the message says what to do."""


class UnknownDataset(DatasetError):
    """No dataset is registered under the name (or alias) asked for."""


class UnsupportedTask(DatasetError):
    """The dataset is registered, but not for the task type asked for."""


class SkipRow(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a converter for a row it cannot use (empty answer, no shared prompt...); the reason is counted."""


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset. ``converters`` maps each task type it serves to a row converter (the first is the
    default task); ``splits`` maps, per task, our split name to the hub's (``"train"`` -> ``"train_prefs"``);
    ``files`` maps a hub split to glob patterns of its files in a downloaded folder, tried before the hub's
    usual names (``train.jsonl.gz``, ``train-00000-of-00001.parquet``, ``train/*.parquet``). With a ``reader``,
    ``data.dataset_path`` is read by it alone (neither ``files`` nor the HF caches are looked at), and ``fetch``
    says how to get a local copy (else: ``huggingface-cli download <hub_id>``)."""

    name: str
    hub_id: str
    converters: Mapping[str, Converter]
    aliases: tuple[str, ...] = ()
    splits: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""
    source: str = "?"  # the file that registered it
    reader: Reader | None = None
    fetch: str = ""

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.converters)

    def task(self, task_type: str | None = None) -> str:
        """The task type a config asks for, normalised ("dpo" -> "preference"; None/"auto" -> the default)."""
        if task_type in (None, "auto"):
            return self.tasks[0]
        task = TASK_ALIASES.get(str(task_type).lower(), str(task_type).lower())
        if task not in self.converters:
            served = ", ".join(f"'{t}'" for t in self.tasks)
            raise UnsupportedTask(
                f"dataset '{self.name}' ({self.hub_id}) does not serve task_type '{task_type}'; it serves {served}. "
                f"Set data.task_type to one of those, or pick a dataset made for '{task}'.")
        return task

    def hub_split(self, task: str, split: str) -> str:
        """The hub's name for ``split`` of ``task`` (a hub split name passes through)."""
        return self.splits.get(task, {}).get(split, split)


_DATASETS: dict[str, DatasetSpec] = {}  # casefolded name -> spec
_ALIASES: dict[str, str] = {}  # casefolded alias (or hub id) -> casefolded name
_entry_points_loaded = False
entry_point_problems: list[str] = []  # entry points that failed to load, named in UnknownDataset messages


def register_dataset(
    name: str, *, hub_id: str, converters: Mapping[str, Converter], aliases: tuple[str, ...] | list[str] = (),
    splits: Mapping[str, Mapping[str, str]] | None = None, files: Mapping[str, tuple[str, ...]] | None = None,
    description: str = "", source: str | None = None, reader: Reader | None = None, fetch: str = "",
) -> DatasetSpec:
    """Register ``name`` (and its aliases and hub id) as a dataset; returns its spec.

    Registering a name again from the same file replaces it (a re-import or a hot reload); from another file,
    or under a name another dataset already answers to, it is a ``DatasetError`` naming both files.
    """
    bad = [t for t in converters if t not in TASK_TYPES]
    if not converters or bad:
        raise DatasetError(f"dataset '{name}': converters must map task types ({', '.join(TASK_TYPES)}) to "
                           f"functions; got {', '.join(map(repr, bad)) or 'none'}")
    if source is None:
        source = sys._getframe(1).f_code.co_filename
    spec = DatasetSpec(name, hub_id, dict(converters), tuple(aliases), dict(splits or {}), dict(files or {}),
                       description, source, reader, fetch)
    key = name.casefold()
    for alias in {name, hub_id, *spec.aliases}:
        owner = _ALIASES.get(alias.casefold())
        if owner is not None and owner != key and _DATASETS[owner].source != source:
            raise DatasetError(f"dataset name '{alias}' is registered twice: for '{_DATASETS[owner].name}' by "
                               f"{_DATASETS[owner].source} and for '{name}' by {source}; rename one of them.")
    previous = _DATASETS.get(key)
    if previous is not None and previous.source != source:
        raise DatasetError(f"dataset '{name}' is registered twice: by {previous.source} and by {source}; "
                           f"rename one of them.")
    drop(key)
    _DATASETS[key] = spec
    for alias in {name, hub_id, *spec.aliases}:
        _ALIASES[alias.casefold()] = key
    return spec


def forget(name: str) -> None:
    """Drop a registered dataset and its aliases (a test, or a plugin file about to be imported afresh)."""
    drop(_ALIASES.get(name.casefold(), name.casefold()))


def forget_source(source: str) -> None:
    """Drop every dataset a file registered (as ``contracts.registry.forget`` does for plugins), so that a new run
    importing its config's plugin files afresh starts clean."""
    for spec in [s for s in _DATASETS.values() if s.source == source]:
        drop(spec.name.casefold())


def drop(key: str) -> None:
    _DATASETS.pop(key, None)
    for alias in [a for a, owner in _ALIASES.items() if owner == key]:
        del _ALIASES[alias]


def registered_datasets() -> list[DatasetSpec]:
    """Every registered dataset (entry points included), sorted by name."""
    load_entry_points()
    return sorted(_DATASETS.values(), key=lambda s: s.name)


def listing() -> str:
    """A table of the registered datasets (name, hub id, task types, aliases), for a ``swiftk datasets`` command."""
    rows = [(s.name, s.hub_id, ", ".join(s.tasks), ", ".join(s.aliases), s.description) for s in registered_datasets()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    return "\n".join(f"{n:<{widths[0]}}  {h:<{widths[1]}}  {t:<{widths[2]}}  {d}" + (f" (also: {a})" if a else "")
                     for n, h, t, a, d in rows)


def find_dataset(name: str, task_type: str | None = None) -> DatasetSpec:
    """The dataset registered as ``name`` (a name, an alias or its hub id; case does not matter), checked to
    serve ``task_type`` when one is given. Touches no data: the kernel can call it while validating a config.
    :raises UnknownDataset: with the closest registered names. :raises UnsupportedTask: naming what it serves."""
    load_entry_points()
    key = _ALIASES.get(name.casefold())
    if key is None:
        raise UnknownDataset(unknown_message(name))
    spec = _DATASETS[key]
    if task_type is not None:
        spec.task(task_type)
    return spec


def unknown_message(name: str) -> str:
    known = {alias: _DATASETS[key].name for alias, key in _ALIASES.items()}
    close = difflib.get_close_matches(name.casefold(), list(known), n=3, cutoff=0.5)
    names = list(dict.fromkeys(known[c] for c in close))
    hint = f"did you mean {' or '.join(repr(n) for n in names)}? " if names else ""
    failed = f" (entry points that failed to load: {'; '.join(entry_point_problems)})" if entry_point_problems else ""
    return (f"no dataset named '{name}'; {hint}known: {', '.join(s.name for s in registered_datasets())}{failed}. "
            f"A plugin registers one with swiftk.plugins.datasets.register_dataset('{name}', hub_id=..., "
            f"converters=...); a local file needs no name: set data.train_file instead.")


def load_entry_points() -> None:
    """Load every ``swiftk.datasets`` entry point once; a failure is remembered, not raised."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            add_loaded(ep.load(), ep.value)
        except Exception as exc:  # a broken third-party package must not break the built-ins
            entry_point_problems.append(f"'{ep.name}' ({ep.value}): {type(exc).__name__}: {exc}")


def add_loaded(target: Any, source: str) -> None:
    if isinstance(target, ModuleType):
        return  # its import registered what it has
    if callable(target) and not isinstance(target, DatasetSpec):
        target = target()
    for spec in target if isinstance(target, list | tuple) else [target]:
        if not isinstance(spec, DatasetSpec):
            raise DatasetError(f"entry point {source} gave a {type(spec).__name__}, not a DatasetSpec")
        register_dataset(spec.name, hub_id=spec.hub_id, converters=spec.converters, aliases=spec.aliases,
                         splits=spec.splits, files=spec.files, description=spec.description, source=source,
                         reader=spec.reader, fetch=spec.fetch)
