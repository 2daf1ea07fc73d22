"""The kernel's error types. Each carries the exit code the CLI returns for it."""

from __future__ import annotations


class SwiftkError(Exception):
    """An error the user can fix; the CLI prints its message (no traceback) and exits with ``exit_code``."""

    exit_code = 1


class ConfigError(SwiftkError):
    """The configuration is invalid. Raised before anything is loaded or written."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}{where}:"
        super().__init__("\n".join([head, *(f"  {p}" for p in problems)]))


class DataError(SwiftkError):
    """A dataset cannot be read or yields nothing to train on."""


class ModelLoadError(SwiftkError):
    """A model or tokenizer cannot be found or read."""


class RunDirError(SwiftkError):
    """The output directory is in a state the requested run cannot use."""


class CheckpointError(SwiftkError):
    """A checkpoint cannot be written or read."""
