"""Projected AdamW in C++ (``optimizer = "native_projected_adamw"``): GaLore's low-rank gradient projection.

For a targeted weight matrix W [m, n] with gradient G_t, rank r, refresh interval K and scale alpha
(Zhao et al. 2024, "GaLore", Algorithm 1, with AdamW's decoupled weight decay):

    every K steps (t = 1, 1 + K, ...):  U, S, V^T = svd(G_t)
        m <= n:  P = U[:, :r]  [m, r]   and   R_t = P^T G_t  [r, n]         (project the shorter side)
        m >  n:  Q = V[:, :r]  [n, r]   and   R_t = G_t Q    [m, r]
    M_t = beta1 M_{t-1} + (1 - beta1) R_t,   V_t = beta2 V_{t-1} + (1 - beta2) R_t^2       (shaped like R_t)
    D_t = (lr / bc1) M_t / (sqrt(V_t) / sqrt(bc2) + eps)                                   bc_k = 1 - beta_k^t
    W_t = (1 - lr wd) W_{t-1} - alpha P D_t        (or  - alpha D_t Q^T)

so the optimizer state of W is 2 r max(m, n) + r min(m, n) floats instead of 2 m n, while every weight still
trains (unlike LoRA). The moments are kept across a refresh (as GaLore does). Matrices whose name contains
none of ``target_modules``, and every vector, get plain AdamW. native/projected_adamw.cpp does the update;
``reference_step`` below is the same maths in torch, used by the tests.
"""

from __future__ import annotations

from typing import Any

import torch

from swiftk.contracts import register_optimizer
from swiftk.native import NativeOptimizer, builtin
from swiftk.plugins.optimizers.galore import check_targets, split_groups


@register_optimizer("native_projected_adamw")
def native_projected_adamw(
    param_groups: list[dict[str, Any]],
    lr: float,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    target_modules: str | tuple[str, ...] = ("attn", "mlp", "self_attn"),
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW whose targeted matrices are updated in a rank-``rank`` subspace of their gradient, refreshed every
    ``update_proj_gap`` steps and scaled by ``scale``; ``target_modules`` as galore_adamw's (name parts, or
    "all-linear"). Weight decay stays per group."""
    if rank < 1 or update_proj_gap < 1:
        raise ValueError(f"native_projected_adamw: rank and update_proj_gap must be >= 1, got {rank}, "
                         f"{update_proj_gap}")
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    check_targets(param_groups, targets, "native_projected_adamw")
    groups = split_groups(param_groups, targets, projected={"rank": rank}, plain={"rank": 0})
    beta1, beta2 = betas
    return NativeOptimizer(groups, builtin("projected_adamw"), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                           rank=rank, update_proj_gap=update_proj_gap, scale=scale)


@torch.no_grad()
def reference_step(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], *, lr: float, rank: int,
                   update_proj_gap: int, scale: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0) -> None:
    """One projected-AdamW step of a matrix ``param`` in plain torch (the module docstring's maths)."""
    m, n = param.shape
    r, left = min(rank, m, n), m <= n
    state["step"] = step = state.get("step", 0) + 1
    G = grad.float()
    if (step - 1) % update_proj_gap == 0:
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        state["proj"] = U[:, :r].clone() if left else Vh[:r].T.clone()
    P = state["proj"]
    R = P.T @ G if left else G @ P
    M = state.setdefault("exp_avg", torch.zeros_like(R))
    V = state.setdefault("exp_avg_sq", torch.zeros_like(R))
    M.lerp_(R, 1 - beta1)
    V.mul_(beta2).addcmul_(R, R, value=1 - beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    D = (lr / bc1) * M / (V.sqrt() / bc2**0.5 + eps)
    update = P @ D if left else D @ P.T
    param.mul_(1 - lr * weight_decay).sub_(scale * update)
