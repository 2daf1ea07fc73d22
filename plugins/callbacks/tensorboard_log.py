"""TensorBoard logging: every numeric metric the kernel reports for a step, as a scalar curve.

Writes event files under ``<run_dir>/tensorboard`` (``tensorboard --logdir <run_dir>/tensorboard``), one
point per metric per optimizer step at x = ``state.step``; eval metrics appear at the eval steps, since the
kernel merges them into those steps' metrics. It listens to ``swiftk_metrics_logged``, so it sees the final
record (including what other callbacks returned from ``swiftk_step_end``). Only the main process writes. On
resume, the writer purges the points a previous process logged past the checkpoint, so the curves show one
run, not two overlapping.
Needs the ``tensorboard`` package (``torch.utils.tensorboard``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from swiftk.contracts import StepState, hookimpl, register_callback


@register_callback("tensorboard")
class TensorBoard:
    """Writes each step's metrics as TensorBoard scalars under ``<run_dir>/tensorboard``."""

    def __init__(self, flush_secs: int = 30) -> None:
        self.flush_secs = flush_secs
        self.writer: Any = None  # a SummaryWriter, opened at the first step of the main process

    def open(self, state: StepState) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("callback 'tensorboard' needs the tensorboard package: pip install tensorboard") from exc
        log_dir = Path(state.run_dir) / "tensorboard"
        return SummaryWriter(str(log_dir), purge_step=state.step, flush_secs=self.flush_secs)

    @hookimpl
    def swiftk_metrics_logged(self, state: StepState, record: Mapping[str, Any]) -> None:
        if not state.is_main_process:
            return
        if self.writer is None:
            self.writer = self.open(state)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=state.step)

    @hookimpl
    def swiftk_run_end(self, state: StepState, status: str) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes
            self.writer = None
