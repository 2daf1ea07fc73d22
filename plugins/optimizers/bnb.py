"""8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").

The update is AdamW's (decoupled weight decay, per group):

    m_t = b1 m_{t-1} + (1 - b1) g_t,   v_t = b2 v_{t-1} + (1 - b2) g_t^2
    W_t = W_{t-1} - lr (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps) - lr wd W_{t-1}

but m and v are stored in 8 bits: each block of 256 values keeps one float absmax and 8-bit codes on a
dynamic (non-linear) quantisation map, dequantised for the update and requantised after it. The optimizer
state shrinks from 8 to about 2 bytes per parameter. Tensors with fewer than ``min_8bit_size`` elements
(biases, norms) keep 32-bit state. Wraps ``bitsandbytes.optim.AdamW8bit`` (pip install bitsandbytes).
"""

from __future__ import annotations

from typing import Any

import torch

from swiftk.contracts import register_optimizer


@register_optimizer("adamw_8bit")
def adamw_8bit(
    param_groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    min_8bit_size: int = 4096,
    is_paged: bool = False,
) -> torch.optim.Optimizer:
    """AdamW with block-wise 8-bit moments; weight decay comes from each group. ``is_paged`` keeps the
    state in CUDA unified memory, paged to the CPU under memory pressure."""
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError as exc:
        raise ImportError("optimizer 'adamw_8bit' needs bitsandbytes: pip install 'bitsandbytes>=0.50'") from exc
    # weight_decay=0.0 is only the default for a group that names none: the kernel's groups carry their own.
    return AdamW8bit(
        param_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0,
        min_8bit_size=min_8bit_size, is_paged=is_paged,
    )
