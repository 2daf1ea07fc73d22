"""Learning-rate schedules with linear warmup: constant, linear decay, cosine decay.

Each multiplies the peak lr by a factor f(step): ``(step + 1) / warmup`` during warmup (so no step runs at lr 0), then
constant: 1; linear: (T - step) / (T - warmup); cosine: min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2
with p the fraction of the decay phase done. T is the run's total optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from swiftk.contracts import register_scheduler


def _with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, decay: Callable[[float], float], total_steps: int
) -> LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(total_steps - warmup_steps, 1)
        return decay(min((step - warmup_steps) / span, 1.0))

    return LambdaLR(optimizer, factor)


@register_scheduler("constant")
def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> LambdaLR:
    return _with_warmup(optimizer, warmup_steps, lambda p: 1.0, total_steps)


@register_scheduler("linear")
def linear(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    return _with_warmup(optimizer, warmup_steps, lambda p: min_lr_ratio + (1 - min_lr_ratio) * (1 - p), total_steps)


@register_scheduler("cosine")
def cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    def decay(p: float) -> float:
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return _with_warmup(optimizer, warmup_steps, decay, total_steps)
