"""The parallel engine: what the kernel asks of whatever spreads a model over ranks (DDP, FSDP2, DeepSpeed ZeRO,
tensor parallelism), and nothing more.

The kernel's run assembly calls, in this order: ``wrap`` (and ``wrap_frozen`` for a reference model) before the
optimizer is built, ``attach`` after; the step loop then calls ``learn`` (the step's micro-batches through forward,
the loss and ``backward``, in the order the engine runs them) and ``clip_grad_norm``, ``step``, ``zero_grad`` per
optimizer step; checkpoints go through ``full_weights``, ``optimizer_state`` and
``save_shards``, a resume through ``load`` and ``load_rng``. Every rank makes the same calls in the same order:
several are collectives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from swiftk.contracts.types import Batch, ModelOutputs


class StepWork(Protocol):
    """One optimizer step's micro-batches, as the kernel hands them to ``ParallelEngine.learn``. The engine decides
    the order (one micro-batch after another, or a pipeline schedule interleaving them across ranks); what the
    forward, the loss and the backward are stays the kernel's."""

    @property
    def micro(self) -> list[Batch]:
        """The step's micro-batches (``grad_accum`` of them, or what the stage drew), on the device."""
        ...

    @property
    def step(self) -> int:
        """The optimizer step these micro-batches make (0-based: the number of steps done before it)."""
        ...

    def begin(self, batch: Batch) -> None:
        """The ``swiftk_batch_start`` hook for one micro-batch (``forward`` calls it; an engine that runs the
        model's parts itself calls it once per micro-batch on every rank)."""
        ...

    def forward(self, batch: Batch) -> ModelOutputs:
        """The stage's forward of one micro-batch on the whole model."""
        ...

    def loss(self, batch: Batch, outputs: ModelOutputs) -> torch.Tensor:
        """The loss plugin on ``outputs``, its contract checked; counted into ``total``."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss (through the engine's ``backward``)."""
        ...

    total: torch.Tensor  # the summed loss of the micro-batches this rank scored (0-dim)


class TrainPlan(Protocol):
    """The part of the ``[train]`` table an engine may read (an engine that batches itself, like DeepSpeed)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def grad_accum(self) -> int: ...

    @property
    def max_grad_norm(self) -> float | None: ...


@runtime_checkable
class ParallelEngine(Protocol):
    """How the model trains across ranks. One process is an engine too: every call is the plain PyTorch one."""

    name: ClassVar[str]  # the name ``[distributed] backend`` gives it
    optimizer_by_name: ClassVar[bool]  # ``optimizer_state`` keys parameters by name (DCP), else by index
    whole_forward: ClassVar[bool]  # the unwrapped model generates (samples, [eval] generate); not a pipeline stage
    own_partitions: ClassVar[bool]  # its optimizer state is in partitions of its own format (``save_shards``): its
    # ``load`` gets any checkpoint's state as written and lays it out itself; the others get it whole, laid out

    @property
    def sharded(self) -> bool:
        """Parameters live in pieces across ranks: forward passes (eval, generation) must run on every rank."""
        ...

    @property
    def head_readable(self) -> bool:
        """The LM head's weight can be read outside the head's own forward, so losses score hidden states chunk
        by chunk (``[train] chunked_loss``): whole, or split by vocabulary rows over a tensor-parallel group; not
        where FSDP2 or ZeRO-3 gathers it only inside that forward."""
        ...

    @property
    def data_shard(self) -> tuple[int, int]:
        """(this rank's index, how many) among the groups of ranks that read different batches."""
        ...

    @property
    def replicas(self) -> int:
        """Ranks that read the same batch (a tensor-parallel group); 1 for data parallelism."""
        ...

    @property
    def layout(self) -> dict[str, Any]:
        """How this engine splits what it checkpoints beyond its name and world size (a ZeRO stage, a tp_size...),
        recorded in the checkpoint: a resume under another layout lays the state out again."""
        ...

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        """The model made ready for the ranks, before the optimizer sees its parameters (FSDP2 replaces them)."""
        ...

    def wrap_frozen(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        """A frozen model beside the trained one (a preference stage's reference)."""
        ...

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainPlan) -> torch.nn.Module:
        """Called once the plugin-built optimizer exists; returns the module the loop runs forward on."""
        ...

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model itself (for generation, saving, building the optimizer's parameter groups)."""
        ...

    def learn(self, work: StepWork) -> None:
        """Every micro-batch of the step through forward, loss and backward, gradients accumulated; afterwards
        ``work.total`` holds the step's loss on every rank that reads the batch."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss, already divided by the step's global item count."""
        ...

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
        """Clip (when ``max_norm`` is set) and return the global gradient norm; None if ``step`` measures it."""
        ...

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: float | None) -> float:
        """The optimizer step; returns the step's gradient norm."""
        ...

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients gone before the next step."""
        ...

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole, on CPU; rank 0's copy is the one written (a collective when sharded)."""
        ...

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state rank 0 writes into the checkpoint ({} when the engine saves its own shards)."""
        ...

    def save_shards(self, folder: Path) -> None:
        """What each rank writes itself into the checkpoint ``folder`` (its RNG state, an engine's partitions)."""
        ...

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
             optimizer_state: dict[str, Any], path: Path, writer: str | None = None) -> None:
        """Restore weights and optimizer state written at the same world size by the same engine, or, laid out
        again for this one (``optimizer_by_name``), by another engine or layout, from whole tensors (an engine with
        ``own_partitions`` gets the checkpoint's state as written, and lays it out again itself). ``writer``: the
        engine that wrote it, when its layout is not this run's (None: this layout's own)."""
        ...

    @classmethod
    def whole_state(cls, path: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    local_rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A checkpoint this engine wrote (``weights`` and ``optimizer_state`` as ``path`` holds them) as whole
        tensors that another engine continues from: the optimizer state by parameter name or by index, its groups
        naming their parameters. A collective where the engine must convert its own partitions."""
        ...

    def load_rng(self, path: Path) -> dict[str, Any] | None:
        """This rank's RNG state from the checkpoint at ``path`` (None: use the shared one)."""
        ...
