"""The Stage contract: what one training step of an algorithm does, in the algorithm's own words.

The kernel runs a stage without knowing which one it is. It reads the stage's data through it, batches it
with the stage's collate, and runs the stage's ``phases`` in order once per optimizer step. ``learn`` is the
kernel's own phase (forward, the ``swiftk_loss_compute`` hook, backward, optimizer step); every other phase
is a method of the stage that turns the step's micro-batches into the ones it learns from (a GRPO stage's
``rollout`` and ``score``). A stage also says which loss plugin it trains with, what its forward needs (a
frozen reference, a reward head), how it evaluates, and which ``[train]`` keys it adds (its ``config``).

A new algorithm is a new stage file, registered like any plugin and chosen by ``[train] stage``::

    @register_stage("unlikelihood")
    class Unlikelihood(Stage):
        task_types = ("sft",)
        ...

Stages run in the kernel's process: they hold the live model, so they are never isolated in a host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from swiftk.contracts.generation import Generator
from swiftk.contracts.registry import register
from swiftk.contracts.rewards import Scores
from swiftk.contracts.types import Batch, ModelOutputs, StepState

LEARN = "learn"  # the kernel's phase: forward, loss, backward, optimizer step


class StageConfig(BaseModel):
    """Base of a stage's own ``[train]`` keys. The kernel merges it with the generic ``[train]`` table, so a
    stage's key is an unknown key under every other stage."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


@dataclass(frozen=True)
class LossChoice:
    """The loss plugin a stage trains with, its arguments, and the config keys that chose them."""

    name: str
    arguments: dict[str, Any]
    key: str = "[train] loss_type"  # the key that named the loss, for error messages
    config_key: str = "[train] loss_config"  # the key its arguments came from


@dataclass(frozen=True)
class RewardChoice:
    """A registered reward plugin a stage scores with (``register_reward``), and its arguments."""

    name: str
    arguments: dict[str, Any]
    key: str = "[train] rewards"
    config_key: str = "[train] reward_config"


class PendingScores(Protocol):
    """Rewards being computed in the background (``StepContext.score``)."""

    def result(self) -> Scores:
        """Wait for them: one typed column per reward (``contracts.rewards``)."""


class DataContext(Protocol):
    """What the kernel gives a stage to read its data with (before the model is loaded)."""

    tokenizer: Any  # transformers tokenizer
    data: Any  # the [data] table
    eval: Any  # the [eval] table
    processor: Any  # a vision stage's (``Stage.vision``) transformers processor: images and text; else None

    def transform(self, split: str) -> Callable[[dict[str, Any]], Any] | None:
        """The ``swiftk_data_row`` hook as a row -> row function for ``split``, or None."""

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call a hook by name, keywords only."""

    def implemented(self, hook: str) -> bool:
        """Whether any registered plugin implements ``hook``."""


class Reference(Protocol):
    """The frozen reference model of a stage that needs one (``needs_reference``)."""

    def extras(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"ref_logps": [rows]}``: the reference's summed log-probs of each row, without gradient."""

    def logps(self, batch: Batch) -> torch.Tensor:
        """The reference's summed log-probs ``[rows]`` of ``batch``."""

    def token_logps(self, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
        """The reference's per-token log-probs ``[rows, T-1]`` of the labelled tokens (position t: the token at
        t+1; 0 where unlabelled), from its logits divided by ``temperature``."""

    def release(self) -> None:
        """Every example carries its reference log-probs now (``batch.extras["ref_logps"]``): the reference
        model's memory can go; asking it to score a batch afterwards is an error."""


class StepContext(Protocol):
    """What the kernel gives a stage during training: the live model and its surroundings."""

    model: torch.nn.Module  # as trained (possibly wrapped by DDP/FSDP/DeepSpeed)
    tokenizer: Any
    device: torch.device
    reference: Reference | None
    step: int
    model_config: Any  # the run's [model] table (to load a second model the way the kernel loads the first)

    def autocast(self) -> AbstractContextManager[Any]:
        """The run's mixed-precision context for forward passes."""

    def forward_logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """``[B, T, V]`` logits (a reward model: ``[B, 1, 1]`` scores) of ``batch``."""

    def forward_outputs(self, model: torch.nn.Module, batch: Batch) -> ModelOutputs:
        """``batch``'s outputs as the run's losses read them: the final hidden states and the head's weight when
        ``[train] chunked_loss`` is on and the model allows it (no ``[B, T, V]`` logits until a loss reads
        ``logits``), else the logits."""

    def unwrapped(self) -> torch.nn.Module:
        """The model itself, without its parallel wrapper (for generation, evaluation)."""

    def generator(self) -> Generator:
        """The run's ``[generation]`` engine, serving this step's weights: the kernel pushes them (the adapter, or
        the trainable tensors) when the step moved since the last call, so a rollout never samples stale ones."""

    def score(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None]
              ) -> PendingScores:
        """Score completions with every reward plugin (``swiftk_reward_compute``), in the background: each plugin is
        called on its own and its result typed ok / invalid / timeout / crashed (``contracts.rewards``), so a stage
        can generate the next chunk while this one is scored."""

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call a hook by name, keywords only."""

    def data_sum(self, value: float) -> float:
        """``value`` summed over the ranks that read different batches (the ranks of a tensor-parallel group read
        the same one): a step's global token or sequence count."""

    def log(self, metrics: dict[str, float]) -> None:
        """Add ``metrics`` to this step's record (averaged across ranks), e.g. a rollout's rewards and lengths."""

    def state(self) -> StepState:
        """Where the run is."""

    def say(self, message: str) -> None:
        """A line on the console (the main process only)."""


class Stage:
    """One training algorithm. Subclass it, set the class attributes, override what differs.

    The kernel builds the stage once per run with the assembled ``[train]`` table (``self.train``); the
    class attributes are read before anything heavy is loaded.
    """

    name: ClassVar[str] = ""  # set by register_stage
    config: ClassVar[type[StageConfig] | None] = None  # the [train] keys this stage adds
    task_types: ClassVar[tuple[str, ...]] = ("sft",)  # the [data] task_type values it reads
    unit: ClassVar[str] = "samples"  # what one training example is called in messages
    phases: ClassVar[tuple[str, ...]] = (LEARN,)
    needs_reference: ClassVar[bool] = False  # the kernel builds a frozen reference (ctx.reference)
    reward_head: ClassVar[bool] = False  # the model is a sequence classifier with one score
    writes_text: ClassVar[bool] = True  # the trained model answers prompts (before/after samples apply)
    # A model that reads images, and its processor (DataContext.processor): "generative" (text from images and
    # text: LLaVA, Idefics3, Qwen2-VL, or one composed by [model.vision]) or "dual" (an image and a text encoder:
    # CLIP, SigLIP). "": a text model.
    vision: ClassVar[str] = ""
    # The [distributed] backends the stage trains under with several processes; None: every one the kernel has.
    engines: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, train: Any) -> None:
        self.train = train

    # --- before the model is loaded

    def loss(self) -> LossChoice:
        """The loss plugin and its arguments. Default: ``[train] loss_type`` with ``loss_config``."""
        return LossChoice(self.train.loss_type, dict(self.train.loss_config))

    def rewards(self) -> list[RewardChoice]:
        """Registered reward plugins the kernel builds for this stage (``[train] rewards``); plugins loaded from
        ``[[plugins]]`` that implement ``swiftk_reward_compute`` score as well."""
        return []

    def metrics(self, eval_config: Any) -> list[str]:
        """Metric plugins the kernel selects for held-out evaluation (``[eval] metrics``), if any."""
        return []

    def problems(self, config: Any) -> list[str]:
        """Config problems only this stage knows about, as ``[table] key: message`` lines."""
        return []

    def load(self, path: str, split: str, ctx: DataContext) -> Sequence[Any]:
        """The examples of ``path`` (``split`` is "train" or "eval"), tokenized; raise a DataError naming
        file:line for a bad row."""
        raise NotImplementedError(f"stage '{self.name}' does not read data")

    def collate(self, ctx: DataContext) -> Callable[[list[Any]], Batch]:
        """A function that batches examples of ``load`` into one micro-batch."""
        raise NotImplementedError(f"stage '{self.name}' does not batch data")

    # --- once the model is loaded

    def adapt(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Add what the stage trains beside the model (PPO's value head), once the tuner is applied and before
        the optimizer sees the parameters; a module set as an attribute of ``model`` is trained and checkpointed
        with it."""

    def prepare(self, ctx: StepContext, train: Sequence[Any], held_out: Sequence[Any]) -> None:
        """Anything to do once before the first step (e.g. score the data with the reference once)."""

    def forward(self, ctx: StepContext, model: torch.nn.Module, batch: Batch) -> ModelOutputs:
        """What the loss needs of one micro-batch: the model's outputs (``ctx.forward_outputs``), and the
        reference's log-probs when the stage has one."""
        with ctx.autocast():
            outputs = ctx.forward_outputs(model, batch)  # hidden states and head, or logits [B, T, V]
        if ctx.reference is not None:
            outputs.extras.update(ctx.reference.extras(batch))
        return outputs

    def draw(self, step: int, grad_accum: int) -> int:
        """How many micro-batches the kernel reads from the data for the step after ``step``: ``[train]
        grad_accum``, or another count for a stage that generates for several steps at once (0: it learns from
        what it generated before)."""
        return grad_accum

    def run_phase(self, phase: str, ctx: StepContext, micro: list[Batch]) -> list[Batch]:
        """A phase other than ``learn``: the step's micro-batches in, the ones to go on with out."""
        method = getattr(self, phase, None)
        if method is None:
            raise NotImplementedError(f"stage '{self.name}' lists phase '{phase}' but has no method of that name")
        result: list[Batch] = method(ctx, micro)
        return result

    def evaluate(self, ctx: StepContext, held_out: Sequence[Any]) -> dict[str, float]:
        """Metrics on the held-out examples, named ``eval_*``."""
        return {}


S = TypeVar("S", bound=type[Stage])


def register_stage(name: str) -> Callable[[S], S]:
    """Register a ``Stage`` subclass under ``name`` (``[train] stage = "name"``)."""
    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise TypeError(f"register_stage('{name}') decorates a subclass of swiftk.contracts.Stage, "
                            f"not {cls!r}")
        if LEARN not in cls.phases:
            raise TypeError(f"stage '{name}': phases {cls.phases} has no '{LEARN}' (the kernel's forward, loss, "
                            f"backward and optimizer step); list it where the update happens")
        cls.name = name
        return register("stage", name)(cls)

    return decorate
