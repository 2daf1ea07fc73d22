"""FSDP2: parameters, gradients and optimizer state sharded over the ranks, one ``fully_shard`` per decoder layer
(gathered for its forward and backward, freed after) and one around the whole model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from swiftk.kernel.dist import DistributedError
from swiftk.kernel.parallel.none import OneProcess


class FSDP2(OneProcess):
    """The trained model and a frozen reference are both sharded: no rank holds a whole copy of either."""

    name = "fsdp"
    optimizer_by_name = True  # DCP's full optimizer state dict

    @property
    def sharded(self) -> bool:
        return True

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        """Before the optimizer is built: ``fully_shard`` replaces the parameters with DTensors."""
        return self.shard(model, precision)

    def shard(self, model: torch.nn.Module, precision: str, mesh: Any = None,
              layers: list[torch.nn.Module] | None = None) -> torch.nn.Module:
        """``fully_shard`` each decoder layer (``layers``, or those the model names), then the whole model, over
        ``mesh`` (None: every rank)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = precision == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32 if bf16 else None)
        reshard = self.options.fsdp_reshard_after_forward
        for layer in layers if layers is not None else decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        return model

    def wrap_frozen(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        return self.wrap(model, device, precision)

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Gathered whole on CPU (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        names = [n for n, p in model.named_parameters() if p.requires_grad]
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: full[n] for n in names if n in full}

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Gathered whole on CPU (a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,  # type: ignore[no-any-return]
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
             optimizer_state: dict[str, Any], path: Path, writer: str | None = None) -> None:
        """Whole tensors in, each rank keeps its shard."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=full)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes transformers marks ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedError(f"[distributed] backend = 'fsdp': no decoder layers found in {type(model).__name__} "
                               f"(no _no_split_modules); use backend = 'ddp'")
    return layers


def clip_mixed(params: list[torch.nn.Parameter], max_norm: float | None, skip: set[int] | None = None,
               group: Any = None, device: torch.device | None = None) -> float:
    """The global gradient norm over split (DTensor) and whole gradients alike, clipped in place above ``max_norm``
    (torch's ``clip_grad_norm_`` cannot mix them): each split gradient's norm is reduced over the ranks holding
    its pieces, a whole one counted once. ``skip``: parameters (by id) whose gradient another rank counts;
    ``group``: ranks holding the model's other parts, whose squares are summed in (on ``device``, the group's)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64, device=device or (grads[0].device if grads else None))
    for p in params:
        if p.grad is not None and id(p) not in (skip or ()):
            norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            squares += (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).double() ** 2
    if group is not None:
        dist.all_reduce(squares, group=group)
    total = float(squares.sqrt())
    if max_norm is not None and math.isfinite(total) and total > max_norm:
        for grad in grads:
            grad.mul_(max_norm / (total + 1e-6))
    return total
