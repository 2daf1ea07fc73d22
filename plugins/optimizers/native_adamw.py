"""AdamW in C++ (``optimizer = "native_adamw"``): the same update as ``torch.optim.AdamW``, in one call.

    m = beta1 m + (1 - beta1) g          v = beta2 v + (1 - beta2) g^2          (amsgrad: v_max = max(v_max, v))
    p = p (1 - lr wd) - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)               bc_k = 1 - beta_k^t

(Loshchilov & Hutter 2019, Algorithm 2; ``maximize`` ascends). native/adamw.cpp updates every parameter of a
group in one multithreaded, vectorised pass; float32 results match torch's AdamW to the last bit or one ulp.
Parameters may be float32 or bfloat16; the moments are always float32. The extension is compiled on first use
(10-30 s, cached; see ``swiftk native build``). CPU tensors only: on CUDA use ``adamw`` (torch's fused kernel).
"""

from __future__ import annotations

from typing import Any

import torch

from swiftk.contracts import register_optimizer
from swiftk.native import NativeOptimizer, builtin


@register_optimizer("native_adamw")
def native_adamw(
    param_groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    amsgrad: bool = False,
    maximize: bool = False,
) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay (per group), bias correction, optional amsgrad and maximize."""
    beta1, beta2 = betas
    return NativeOptimizer(param_groups, builtin("adamw"), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                           amsgrad=amsgrad, maximize=maximize)
