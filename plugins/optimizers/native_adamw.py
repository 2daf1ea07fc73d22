"""AdamW in C++ (``optimizer = "native_adamw"``): the same update as ``torch.optim.AdamW``, in one call.

    m = beta1 m + (1 - beta1) g          v = beta2 v + (1 - beta2) g^2          (amsgrad: v_max = max(v_max, v))
    p = p (1 - lr wd) - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)               bc_k = 1 - beta_k^t

(Loshchilov & Hutter 2019, Algorithm 2; ``maximize`` ascends). native/adamw.cpp updates every parameter of a
group in one multithreaded, vectorised pass; float32 results match torch's AdamW to the last bit or one ulp.
Parameters may be float32 or bfloat16. The moments are float32, or bfloat16 with ``bf16_moments = true``: 4 bytes
of optimizer state per parameter instead of 8. ``stochastic_rounding = true`` stores every bfloat16 result (a
bfloat16 parameter, bfloat16 moments) rounded up or down at random in proportion to its distance to each
(unbiased), from a hash of ``seed``, the step, the tensor and the element: reproducible, exact across a resume. With
round-to-nearest, an update smaller than half a bfloat16 step is lost, and so is the second moment's
``(1 - beta2) g^2`` increment (0.1 % of v, under bfloat16's 0.4 % step): use stochastic rounding with bfloat16
moments. The extension is compiled on first use (10-30 s, cached; see ``swiftk native build``). CPU tensors
only: on CUDA use ``adamw`` (torch's fused kernel).
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
    bf16_moments: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay (per group), bias correction, optional amsgrad and maximize; moments in
    bfloat16 and stochastic rounding of bfloat16 results on request."""
    beta1, beta2 = betas
    if bf16_moments and amsgrad:
        raise ValueError("native_adamw: amsgrad keeps float32 moments; set bf16_moments = false or amsgrad = false")
    if not 0 <= seed < 2**53:
        raise ValueError(f"native_adamw: seed must be in [0, 2^53), got {seed}")
    for index, group in enumerate(param_groups):  # each group's rounding draws its own bits
        if isinstance(group, dict):
            group.setdefault("group", index)
    return NativeOptimizer(param_groups, builtin("adamw"), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                           amsgrad=amsgrad, maximize=maximize, bf16_moments=bf16_moments,
                           stochastic_rounding=stochastic_rounding, seed=seed)
