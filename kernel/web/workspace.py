"""The folders ``swiftk web`` may touch, and the runs in them.

A path typed into the page (a data file, a model folder, a run) is resolved, symlinks included, and must land
inside the workspace (the folder ``swiftk web`` was started in, or ``--workspace``) or the runs folder: ``..``,
an absolute path elsewhere or a link leading out is refused with a ``PathRefused`` that says which folders are
allowed. The runs folder holds one folder per run; what the page itself writes (the configs of the runs it
launched, their console logs) goes to its ``_web/`` subfolder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from swiftk.kernel.errors import SwiftkError

WEB_DIR = "_web"  # RUNS/_web: configs and logs of the runs the page launched
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PathRefused(SwiftkError):
    """A path given to the page that is outside the folders it may touch, or not what the field needs."""

    exit_code = 2


@dataclass(frozen=True)
class Workspace:
    root: Path  # path fields resolve against it and must stay inside it (or inside runs)
    runs: Path  # one folder per run

    @classmethod
    def at(cls, root: str | Path, runs: str | Path | None = None) -> Workspace:
        root = Path(root).expanduser().resolve()
        runs_dir = (root / Path(runs if runs is not None else "runs").expanduser()).resolve()
        if not root.is_dir():
            raise PathRefused(f"workspace {root} is not a folder")
        return cls(root, runs_dir)

    @property
    def web_dir(self) -> Path:
        return self.runs / WEB_DIR

    def inside(self, text: str, what: str = "path", must_exist: bool = True) -> Path:
        """``text`` as a path inside the workspace or the runs folder; ``PathRefused`` naming the field otherwise."""
        text = (text or "").strip()
        if not text:
            raise PathRefused(f"{what}: empty; give a path inside {self.root}")
        if "\x00" in text:
            raise PathRefused(f"{what}: {text!r} is not a path")
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = candidate.resolve()
        if not any(resolved == base or resolved.is_relative_to(base) for base in (self.root, self.runs)):
            raise PathRefused(f"{what}: {text!r} leads outside the workspace; this page reads and writes only "
                              f"inside {self.root}" + (f" and {self.runs}" if not self.runs.is_relative_to(self.root)
                                                        else ""))
        if must_exist and not resolved.exists():
            raise PathRefused(f"{what}: {text!r} does not exist (looked for {resolved})")
        return resolved

    def relative(self, path: Path) -> str:
        """How the page shows ``path``: relative to the workspace where it can be."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def run_dirs(self) -> list[Path]:
        """The runs folder's runs (a folder with a config.toml or a metrics.jsonl), newest activity first."""
        if not self.runs.is_dir():
            return []
        found = [p for p in self.runs.iterdir() if p.is_dir() and p.name != WEB_DIR and not p.name.startswith(".")
                 and ((p / "metrics.jsonl").is_file() or (p / "config.toml").is_file())]
        return sorted(found, key=activity, reverse=True)

    def run_dir(self, name: str) -> Path:
        """The run called ``name`` in the runs folder (a name, never a path)."""
        if not NAME.match(name or ""):
            raise PathRefused(f"run name {name!r}: use letters, digits, '.', '_' and '-' (at most 64), not a path")
        return self.runs / name

    def data_files(self, limit: int = 200) -> list[str]:
        """Training-data files under the workspace (what the data field offers), workspace-relative."""
        found: list[str] = []
        for folder, subdirs, files in os.walk(self.root):
            here = Path(folder)
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in SKIP_DIRS
                                and here / d != self.runs)
            if "config.json" in files or "tokenizer_config.json" in files:
                continue  # a model or tokenizer folder: its JSON files are not training data
            for name in sorted(files):
                if name.endswith((".jsonl", ".json", ".parquet", ".csv")) and not name.startswith("."):
                    found.append(self.relative(Path(folder) / name))
                    if len(found) >= limit:
                        return found
        return found


SKIP_DIRS = {"runs", "node_modules", "__pycache__", "build", "dist", "site-packages", WEB_DIR}  # and the runs folder


def activity(run_dir: Path) -> float:
    """When a run last wrote its metrics (or was created)."""
    metrics = run_dir / "metrics.jsonl"
    return (metrics if metrics.exists() else run_dir).stat().st_mtime
