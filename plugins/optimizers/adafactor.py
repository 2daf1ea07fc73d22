"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost").

Adam keeps a second moment per weight; Adafactor keeps, for a matrix W [n, m], only its row and column
sums and rebuilds the estimate as their outer product:

    R_t = beta2_t R_{t-1} + (1 - beta2_t) (G_t^2 + eps1) 1_m      # [n]
    C_t = beta2_t C_{t-1} + (1 - beta2_t) 1_n^T (G_t^2 + eps1)    # [m]
    V_t = R_t C_t / (1_n^T R_t)                                   # [n, m], never stored
    U_t = G_t / sqrt(V_t), clipped to RMS(U_t) <= d,  W_t = W_{t-1} - lr_t U_t

so its state is O(n + m) instead of O(n m). beta2_t = 1 - t^decay_rate. Here lr_t is the kernel's
scheduled lr (``relative_step=False``), not the paper's relative step size, so warmup and decay come from
``[train] scheduler`` as for every other optimizer. Wraps ``transformers.optimization.Adafactor``.
"""

from __future__ import annotations

from typing import Any

import torch

from swiftk.contracts import register_optimizer


@register_optimizer("adafactor")
def adafactor(
    param_groups: list[dict[str, Any]],
    lr: float,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    beta1: float | None = None,
    scale_parameter: bool = False,
    relative_step: bool = False,
    warmup_init: bool = False,
) -> torch.optim.Optimizer:
    """Adafactor with factored second moments; ``beta1`` set adds a (full-size) first moment. Weight
    decay comes from each group; ``relative_step=True`` ignores ``lr`` and uses the paper's own schedule."""
    from transformers.optimization import Adafactor

    return Adafactor(
        param_groups,
        lr=None if relative_step else lr,
        eps=tuple(eps),
        clip_threshold=clip_threshold,
        decay_rate=decay_rate,
        beta1=beta1,
        scale_parameter=scale_parameter,
        relative_step=relative_step,
        warmup_init=warmup_init,
    )
