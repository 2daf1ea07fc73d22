import math

import pytest
import torch

from swiftk.plugins.schedulers.warmup import constant, cosine, linear


def lrs(build, total: int = 10, warmup: int = 2, **kw: float) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build(optimizer, total, warmup, **kw)
    values = []
    for _ in range(total):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


def test_warmup_then_constant() -> None:
    assert lrs(constant) == [0.5, 1.0] + [1.0] * 8


def test_linear_decays_to_min_ratio() -> None:
    """After 2 warmup steps (1/2, 2/2), the decay factor is 1 - p with p = (step - 2) / 8, so 1 at step 2."""
    assert lrs(linear) == pytest.approx([0.5, 1.0] + [1 - i / 8 for i in range(8)])


def test_cosine_follows_half_a_cosine() -> None:
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert lrs(cosine, min_lr_ratio=0.1) == pytest.approx(expected)
