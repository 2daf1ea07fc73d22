"""Throughput and memory: a moving average of training speed, and the process's peak memory.

From the kernel's per-step ``tokens`` and ``tokens_per_s`` (so the step time is tokens / tokens_per_s,
eval and checkpoint time excluded), over the last ``window`` steps:

    tokens_per_s_avg = sum(tokens) / sum(step seconds)

a token-weighted average, so a short step does not count as much as a long one. Also the peak resident
memory of this process (``getrusage``'s ru_maxrss) and, with CUDA, ``torch.cuda.max_memory_allocated``, in MiB.
"""

from __future__ import annotations

import resource
import sys
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch

from swiftk.contracts import StepState, hookimpl, register_callback

MIB = 2**20
RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux


@register_callback("throughput")
class Throughput:
    """Adds ``tokens_per_s_avg``, ``peak_rss_mib`` and, with CUDA, ``cuda_max_allocated_mib`` to each step."""

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"throughput: window must be >= 1, got {window}")
        self.window = window
        self.steps: deque[tuple[float, float]] = deque(maxlen=window)  # (tokens, seconds) per step

    @hookimpl
    def swiftk_step_end(self, state: StepState, metrics: Mapping[str, float]) -> dict[str, float] | None:
        out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT / MIB}
        if torch.cuda.is_available():
            out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        tokens, rate = float(metrics.get("tokens", 0)), float(metrics.get("tokens_per_s", 0))
        if tokens > 0 and rate > 0:
            self.steps.append((tokens, tokens / rate))
        seconds = sum(s for _, s in self.steps)
        if seconds > 0:
            out["tokens_per_s_avg"] = sum(t for t, _ in self.steps) / seconds
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": [list(step) for step in self.steps]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = deque(((float(t), float(s)) for t, s in state["steps"]), maxlen=self.window)
