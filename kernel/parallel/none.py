"""One process: every call is the plain PyTorch one. The other engines extend this one where they differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from swiftk.contracts.engines import StepWork, TrainPlan
from swiftk.kernel.dist import DistInfo, agreed


class OneProcess:
    """The model, the optimizer and the gradients whole on this rank (also each rank's part under DDP)."""

    name: ClassVar[str] = "none"
    optimizer_by_name: ClassVar[bool] = False  # its optimizer state is saved by index (torch.optim's state_dict)
    whole_forward: ClassVar[bool] = True  # the unwrapped model runs a whole forward (generation, samples)
    own_partitions: ClassVar[bool] = False  # loads whole tensors, whoever wrote them
    group_size: int = 1  # ranks that read one batch and split the model between them (a TP group, a pipeline)

    def __init__(self, info: DistInfo | None = None, options: Any = None) -> None:
        self.info = info or DistInfo()
        self.options = options  # the [distributed] table (None in one process)

    @classmethod
    def problems(cls, options: Any) -> list[str]:
        """What is wrong with ``options`` for this engine, found before anything starts."""
        return []

    @classmethod
    def run_problems(cls, cfg: Any) -> list[str]:
        """What the rest of the run's config (stage, [train], [eval]) asks that this engine cannot do."""
        return []

    @property
    def sharded(self) -> bool:
        return False

    @property
    def head_readable(self) -> bool:
        return not self.sharded

    @property
    def data_shard(self) -> tuple[int, int]:
        """(this rank's index, how many) among the groups of ranks that read different batches: neighbouring
        ranks form a group of ``group_size``."""
        return self.info.rank // self.group_size, self.info.world_size // self.group_size

    @property
    def replicas(self) -> int:
        """Ranks that read the same batch (a TP group, a pipeline): a sum over all ranks counts it this often."""
        return self.group_size

    @property
    def layout(self) -> dict[str, Any]:
        return {}

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        return model

    def wrap_frozen(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        return model

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainPlan) -> torch.nn.Module:
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    # --- one optimizer step

    def learn(self, work: StepWork) -> None:
        """One micro-batch after another: forward, loss (a failure on one rank stops every rank), backward."""
        for batch in work.micro:
            outputs = work.forward(batch)
            with agreed("swiftk_loss_compute", work.step):
                loss = work.loss(batch, outputs)
            work.backward(loss)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss is already divided by the step's global token count; DDP, FSDP and DeepSpeed average
        gradients over the ranks that read different data, so it is scaled back by their count to give the global
        sum's gradient."""
        readers = self.data_shard[1]
        return loss * readers if readers > 1 else loss

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
        """Clip and return the global gradient norm (a DTensor's norm is gathered whole)."""
        grads = [p.grad for p in params if p.grad is not None]
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        elif grads:
            norm = torch.nn.utils.get_total_norm(grads)
        else:
            return 0.0
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: float | None) -> float:
        optimizer.step()
        return grad_norm or 0.0

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # --- checkpoints

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.unwrap(model).named_parameters() if p.requires_grad}

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def save_shards(self, folder: Path) -> None:
        """Each rank of a multi-process run writes its own RNG state."""
        from swiftk.kernel.checkpoint import rng_state

        folder.mkdir(parents=True, exist_ok=True)
        if self.info.world_size > 1:
            torch.save(rng_state(), folder / f"rng.rank-{self.info.rank}.pt")

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
             optimizer_state: dict[str, Any], path: Path, writer: str | None = None) -> None:
        from swiftk.kernel.tuners import load_trainable

        load_trainable(self.unwrap(model), weights)
        optimizer.load_state_dict(optimizer_state)

    @classmethod
    def whole_state(cls, path: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    local_rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return weights, optimizer_state  # whole already

    def load_rng(self, path: Path) -> dict[str, Any] | None:
        own = path / f"rng.rank-{self.info.rank}.pt"
        return torch.load(own, weights_only=False) if own.is_file() else None


def indivisible(key: str, size: int, options: Any) -> list[str]:
    """``[distributed] key = size`` (ranks per group) that does not divide the processes, as a problem."""
    world = options.num_processes * options.nnodes
    if world % size == 0:
        return []
    return [f"[distributed] {key} = {size} does not divide the {world} processes (num_processes = "
            f"{options.num_processes} x nnodes = {options.nnodes}): use a divisor of {world}"]
