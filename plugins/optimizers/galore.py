"""GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (Zhao et al. 2024, Algorithm 1).

For a weight matrix W [m, n] (m <= n; the other side is symmetric) with gradient G_t [m, n], Adam runs in a
rank-r subspace that is refreshed every ``update_proj_gap`` steps from the gradient's SVD:

    P_t = U[:, :r] of svd(G_t)                  # [m, r], recomputed when t % update_proj_gap == 0
    R_t = P_t^T G_t                             # [r, n]  the projected gradient
    M_t, V_t = Adam moments of R_t              # [r, n]  instead of [m, n]
    W_t = W_{t-1} - lr * scale * P_t (M_t / (sqrt(V_t) + eps))   (+ decoupled weight decay)

so the optimizer state of W is O(r n) instead of O(m n), while every weight stays trainable (unlike LoRA).
Only 2-D weights whose parameter name contains one of ``target_modules`` are projected (the attention
and MLP matrices of a transformer; "all-linear": every matrix but embeddings and the output head);
embeddings, norms and biases get plain AdamW. Wraps ``galore_torch.GaLoreAdamW`` (pip install galore-torch).
``[train] tuner_strategy = "galore"`` selects this optimizer with the ``galore_*`` keys as its arguments.
"""

from __future__ import annotations

from typing import Any

import torch

from swiftk.contracts import register_optimizer

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


@register_optimizer("galore_adamw")
def galore_adamw(
    param_groups: list[dict[str, Any]],
    lr: float,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: str | tuple[str, ...] = ("attn", "mlp", "self_attn"),
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> torch.optim.Optimizer:
    """AdamW whose targeted matrices are updated in a rank-``rank`` gradient subspace; ``proj_type`` picks
    the side projected (``PROJ_TYPES``; "std": the shorter one). Weight decay stays per group."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as exc:
        raise ImportError("optimizer 'galore_adamw' needs galore-torch: pip install 'galore-torch>=1.0'") from exc
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"galore_adamw: proj_type {proj_type!r} is not one of {', '.join(PROJ_TYPES)}")
    galore = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    check_targets(param_groups, targets)
    groups = split_groups(param_groups, targets, projected=galore)
    return GaLoreAdamW(groups, lr=lr, betas=tuple(betas), eps=eps, no_deprecation_warning=True)


def split_groups(param_groups: list[dict[str, Any]], targets: tuple[str, ...], projected: dict[str, Any],
                 plain: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each param group split in two: its targeted matrices (with the ``projected`` settings added) and the
    rest (with ``plain``); the group's own settings, weight decay included, stay on both."""
    groups = []
    for group in param_groups:
        for is_projected in (False, True):
            pairs = [(name, p) for name, p in zip(group["names"], group["params"], strict=True)
                     if is_target(name, p, targets) == is_projected]
            if pairs:
                names, params = zip(*pairs, strict=True)
                extra = projected if is_projected else (plain or {})
                groups.append({**group, "params": list(params), "names": list(names), **extra})
    return groups


# Matrices "all-linear" leaves to plain AdamW: lookup tables and output heads, as peft's "all-linear" does.
NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "score", "classifier")


def is_target(name: str, param: torch.Tensor, target_modules: tuple[str, ...]) -> bool:
    """GaLore projects matrices of the targeted modules; vectors have no low-rank structure to exploit."""
    if param.dim() != 2:
        return False
    if "all-linear" in target_modules:
        return not any(part in name for part in NOT_LINEAR)
    return any(target in name for target in target_modules)


def check_targets(param_groups: list[dict[str, Any]], targets: tuple[str, ...],
                  optimizer: str = "galore_adamw") -> None:
    """Refuse targets that project nothing: GaLore would silently be plain AdamW with full optimizer state."""
    pairs = [(name, p) for group in param_groups for name, p in zip(group["names"], group["params"], strict=True)]
    if any(is_target(name, p, targets) for name, p in pairs):
        return
    modules = sorted({name.rsplit(".", 2)[-2] for name, p in pairs if p.dim() == 2 and "." in name})
    raise ValueError(f"{optimizer}: target_modules {list(targets)} match none of the model's trainable matrices "
                     f"(module names: {', '.join(modules[:12]) or 'none'}); name some of those, or 'all-linear'")
