"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<run>/checkpoints/step-000120/``:
  model.safetensors   trainable weights (the adapter for LoRA, everything for full fine-tuning)
  trainer_state.pt    optimizer, scheduler, RNG states, data position, plugin states, counters
  plugins/            files plugins wrote through ``swiftk_checkpoint_save``
  meta.json           step, plugin code hashes, base-weights fingerprint; written last

It is written into a temporary sibling, every file fsynced, then renamed into place: a folder named
``step-*`` is always complete, whatever happened during the write (disk full, kill -9).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from swiftk.kernel.errors import CheckpointError

PREFIX = "step-"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_by_name(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """An optimizer state dict in either layout it is saved in: ``torch.optim``'s (parameters by index, each group
    naming its parameters in ``names``, as the kernel builds the groups) or DCP's full one (FSDP2, tp: by name).
    Returns (per-parameter state by name, each name's group hyperparameters)."""
    per_param, hyper = {}, {}
    for group in state["param_groups"]:
        names = group.get("names") or group["params"]
        settings = {k: v for k, v in group.items() if k != "params"}
        for index, name in zip(group["params"], names, strict=True):
            hyper[name] = settings
            if index in state["state"]:
                per_param[name] = state["state"][index]
    return per_param, hyper


def optimizer_like(optimizer: torch.optim.Optimizer, state: dict[str, Any], by_name: bool) -> dict[str, Any]:
    """``state`` (saved in either layout, by another engine or with other groups) laid out as ``optimizer`` holds
    its parameters: by index for ``load_state_dict``, or ``by_name`` for DCP's ``set_optimizer_state_dict``. Each
    group takes the saved hyperparameters of its first parameter's group."""
    per_param, hyper = optimizer_by_name(state)
    own = optimizer.state_dict()["param_groups"]
    groups, states = [], {}
    for group in own:
        names = group["names"]
        missing = [name for name in names if name not in hyper]
        if missing:
            raise ValueError(f"the checkpoint's optimizer state has no {missing[0]} (and {len(missing) - 1} more): "
                             f"it was written for another model or tuner")
        keys = names if by_name else group["params"]
        groups.append({**hyper[names[0]], "names": names, "params": list(keys)})
        states.update({key: per_param[name] for key, name in zip(keys, names, strict=True) if name in per_param})
    return {"state": states, "param_groups": groups}


def scheduler_like(state: dict[str, Any], groups: int) -> dict[str, Any]:
    """A scheduler's state saved for another number of parameter groups (tensor parallelism splits its groups by
    tensor kind): each per-group list (base and last learning rates, lambdas) is laid out for ``groups``, which
    holds as long as every group was scheduled alike."""
    lengths = {len(v) for v in state.values() if isinstance(v, list)}
    if len(lengths) != 1:
        return state
    resized = {}
    for key, value in state.items():
        if isinstance(value, list) and value:
            if any(item != value[0] for item in value):
                raise ValueError(f"the scheduler's {key} differs between parameter groups ({value}): this checkpoint "
                                 f"cannot continue with {groups} groups")
            value = [value[0]] * groups
        resized[key] = value
    return resized


def save(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
    write_extra: Callable[[Path], None] | None = None,
    rank_files: Path | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, then prune to the ``keep_last`` newest. Returns its path.

    On any failure the partial folder is removed and ``CheckpointError`` raised; earlier checkpoints are
    untouched. ``rank_files``: a folder the ranks of a multi-process run wrote their parts into (see
    ``rank_folder``); its files move into the checkpoint before meta.json is written.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        if write_extra is not None:
            (tmp / "plugins").mkdir()
            write_extra(tmp / "plugins")
        if rank_files is not None and rank_files.is_dir():
            for item in rank_files.iterdir():
                os.rename(item, tmp / item.name)
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2, default=str))
        fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (resume then immediate save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if rank_files is not None:
            shutil.rmtree(rank_files, ignore_errors=True)
        free_mib = shutil.disk_usage(root).free / 2**20  # torch.save hides ENOSPC behind a position mismatch
        raise CheckpointError(
            f"writing the checkpoint for step {step} into {root} failed: {type(exc).__name__}: {exc} "
            f"({free_mib:.0f} MiB free on that filesystem). Nothing partial was kept; the previous checkpoint "
            f"({latest_checkpoint(run_dir) or 'none'}) is intact. Free disk space or fix the cause, then "
            f"continue with --resume."
        ) from exc
    if rank_files is not None:
        shutil.rmtree(rank_files, ignore_errors=True)
    prune(run_dir, keep_last)
    return final


def rank_folder(run_dir: Path, step: int) -> Path:
    """Where each rank of a multi-process run writes its part of checkpoint ``step`` (a shared filesystem)."""
    return checkpoint_root(run_dir) / f".ranks-{PREFIX}{step:06d}"


def prune(run_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*checkpoint_root(run_dir).glob(".tmp-*"), *checkpoint_root(run_dir).glob(".ranks-*")]:  # killed
        shutil.rmtree(stale, ignore_errors=True)


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, trainer_state, meta) of a checkpoint folder."""
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete swiftk checkpoint (no meta.json).")
    try:
        weights = load_file(str(path / "model.safetensors"))
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    return weights, trainer_state, meta


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for path in sorted(p for p in folder.rglob("*") if p.is_dir()):
        fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
