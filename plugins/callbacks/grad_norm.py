"""Gradient-norm monitor: a running average and maximum of ``grad_norm``, and a flag on spikes.

With g_t the step's gradient norm (before clipping) and decay d,

    ema_t = d * ema_{t-1} + (1 - d) * g_t       (ema_1 = g_1)
    spike_t = g_t > spike_factor * ema_{t-1}    (only after ``warmup`` steps, while the EMA settles)

A spike compares the new norm with the average of the steps before it, so one outlier cannot hide itself.
A non-finite norm is always a spike and leaves the statistics alone. The statistics are saved with every
checkpoint, so a resumed run reports the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from swiftk.contracts import StepState, hookimpl, register_callback


@register_callback("grad_norm_monitor")
class GradNormMonitor:
    """Adds ``grad_norm_ema``, ``grad_norm_max`` and ``grad_norm_spike`` (0.0 or 1.0) to each step's metrics."""

    def __init__(self, spike_factor: float = 5.0, warmup: int = 10, decay: float = 0.9) -> None:
        if spike_factor <= 1 or warmup < 0 or not 0 <= decay < 1:
            raise ValueError("grad_norm_monitor: needs spike_factor > 1, warmup >= 0 and 0 <= decay < 1, "
                             f"got {spike_factor}, {warmup}, {decay}")
        self.spike_factor, self.warmup, self.decay = spike_factor, warmup, decay
        self.ema, self.max, self.count = 0.0, 0.0, 0

    @hookimpl
    def swiftk_step_end(self, state: StepState, metrics: Mapping[str, float]) -> dict[str, float] | None:
        if "grad_norm" not in metrics:
            return None
        norm = float(metrics["grad_norm"])
        if not math.isfinite(norm):
            spike = True
        else:
            spike = self.count >= self.warmup and norm > self.spike_factor * self.ema
            self.ema = norm if self.count == 0 else self.decay * self.ema + (1 - self.decay) * norm
            self.max = max(self.max, norm)
            self.count += 1
        return {"grad_norm_ema": self.ema, "grad_norm_max": self.max, "grad_norm_spike": float(spike)}

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "max": self.max, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema, self.max, self.count = float(state["ema"]), float(state["max"]), int(state["count"])
