"""Early stopping: end the run when an eval metric has stopped improving.

Only steps that carry the watched metric count (the kernel merges the eval record into the step's metrics
at every ``[eval] every`` steps). With ``mode = "min"`` an evaluation improves when

    value < best - min_delta            (mode "max": value > best + min_delta)

and after ``patience`` evaluations in a row without improvement the callback returns
``{"stop_training": 1.0}``; the kernel ends the run after that step. ``best`` and the count of bad
evaluations are saved with every checkpoint, so a resumed run stops exactly where the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from swiftk.contracts import StepState, hookimpl, register_callback


@register_callback("early_stopping")
class EarlyStopping:
    """Stop after ``patience`` evaluations of ``metric`` without an improvement of more than ``min_delta``."""

    def __init__(self, metric: str = "eval_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"early_stopping: mode must be 'min' or 'max', got {mode!r}")
        if patience < 1 or min_delta < 0:
            raise ValueError(f"early_stopping: needs patience >= 1 and min_delta >= 0, got {patience}, {min_delta}")
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, min_delta, mode
        self.best: float | None = None
        self.bad = 0  # evaluations in a row without improvement

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    @hookimpl
    def swiftk_step_end(self, state: StepState, metrics: Mapping[str, float]) -> dict[str, float] | None:
        if self.metric not in metrics:
            return None
        value = float(metrics[self.metric])
        if self.improved(value):
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return {"stop_training": 1.0} if self.bad >= self.patience else None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.bad = state["best"], int(state["bad"])
