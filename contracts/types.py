"""The records that cross the hook boundary.

They are plain dataclasses over tensors so that a plugin host can describe them field by field
(tensors as shared-memory references, the rest as msgpack scalars) without knowing any kernel code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from swiftk.contracts.chunked import head_logits, linear_cross_entropy, linear_token_logps

# Label value that marks a position as "no loss here" (prompt, padding), as in PyTorch and transformers.
IGNORE_INDEX = -100


@dataclass
class Batch:
    """One micro-batch, as the kernel feeds it to the model and to the loss.

    ``labels`` are *unshifted*: ``labels[b, t]`` is the token at position t, or ``IGNORE_INDEX``; the logits at
    t-1 score it. ``num_items_in_batch`` counts the label tokens of the whole optimizer step (every
    micro-batch of the accumulation window, on every rank), so that a loss divided by it gives the same
    gradient whatever the micro-batch split.
    """

    input_ids: torch.Tensor  # [B, T] int64, right-padded
    labels: torch.Tensor  # [B, T] int64, IGNORE_INDEX where no loss
    attention_mask: torch.Tensor | None  # [B, T] 1 = real token; None for packed rows
    num_items_in_batch: int
    position_ids: torch.Tensor | None = None  # [B, T]; restarts at 0 at each packed document
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # stage data the kernel does not interpret
    real_tokens: int | None = None  # packed rows (no mask): the tokens that are not padding
    # More keyword inputs of the model, which the kernel passes to every forward pass of the batch: a
    # vision-language model's pixel_values, image_grid_thw...
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on ``device`` (``self`` when nothing moves)."""
        if self.input_ids.device == torch.device(device):
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(self.input_ids.to(device), self.labels.to(device), move(self.attention_mask),
                     self.num_items_in_batch, move(self.position_ids),
                     {k: v.to(device) for k, v in self.extras.items()}, self.real_tokens,
                     {k: v.to(device) for k, v in self.model_inputs.items()})

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in this micro-batch."""
        if self.attention_mask is not None:
            return int(self.attention_mask.sum().item())
        if self.real_tokens is not None:
            return self.real_tokens
        return int(self.input_ids.numel())

    @property
    def num_items(self) -> int:
        """What a loss of this batch is normalised over: preference pairs or unpaired examples when the batch
        carries them (``extras["num_pairs"]``), else the label tokens."""
        if "num_pairs" in self.extras:
            return int(self.extras["num_pairs"])
        return self.num_label_tokens

    @property
    def num_label_tokens(self) -> int:
        """Tokens this micro-batch is scored on (after the causal shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum().item())


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` labels aligned with the logits that score them: position t holds the token at t+1 (the last
    position scores nothing). Lets a loss use the logits as they are, without copying a shifted view."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def supervised(batch: Batch, outputs: ModelOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits ``[N, V]`` and labels ``[N]`` of the supervised tokens, after the causal shift (from the hidden
    states of those tokens alone, when the outputs hold hidden states and no logits yet)."""
    if outputs.chunked:
        hidden, head, targets, _ = labelled_hidden(outputs, batch.labels)
        return head_logits(hidden, head), targets
    labels = batch.labels[:, 1:]  # [B, T-1]: the logits at t-1 score the token at t
    mask = labels != IGNORE_INDEX
    return outputs.logits[:, :-1][mask], labels[mask]


def labelled_hidden(outputs: ModelOutputs, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For outputs of hidden states: the hidden states ``[N, H]`` that score a labelled token (after the causal
    shift), the head ``[V, H]``, those tokens ``[N]``, and the ``[B, T-1]`` mask they were picked with."""
    assert outputs.hidden is not None and outputs.head is not None, "outputs of hidden states expected"
    targets = labels[:, 1:]  # [B, T-1]: the hidden state at t-1 scores the token at t
    mask = targets != IGNORE_INDEX
    return outputs.hidden[:, :-1][mask], outputs.head, targets[mask], mask


def token_logps(logits: torch.Tensor | ModelOutputs, labels: torch.Tensor, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens under ``logits / temperature`` (0 where unlabelled), and the mask.

    logits ``[B, T, V]`` (or a ``ModelOutputs``), labels ``[B, T]`` unshifted -> two ``[B, T-1]`` tensors: position t
    scores the token at t+1. In float32, as gather minus logsumexp, so no ``[B, T, V]`` log-softmax is kept for
    backward. Given ``ModelOutputs`` that hold hidden states, only the labelled positions are scored, from the
    hidden states and the head chunk by chunk (``contracts.chunked``): no ``[B, T, V]`` logits at all."""
    if isinstance(logits, ModelOutputs) and logits.chunked:
        hidden, head, scored, mask = labelled_hidden(logits, labels)
        picked = linear_token_logps(hidden, head, scored, temperature)
        out = torch.zeros(mask.shape, dtype=torch.float32, device=picked.device)
        return out.masked_scatter(mask, picked), mask  # [B, T-1]
    targets = labels[:, 1:]  # [B, T-1]: the logits at t-1 score the token at t
    mask = targets != IGNORE_INDEX
    full: torch.Tensor = logits.logits if isinstance(logits, ModelOutputs) else logits
    scaled = full[:, :-1].float() / temperature  # [B, T-1, V]
    chosen = scaled.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (chosen - scaled.logsumexp(-1)) * mask, mask


def sequence_logps(logits: torch.Tensor | ModelOutputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's labelled tokens (after the causal shift), and their counts.

    logits ``[B, T, V]`` (or a ``ModelOutputs``), labels ``[B, T]`` unshifted (``IGNORE_INDEX`` where not scored) ->
    (``[B]`` sum of log p(token), ``[B]`` scored tokens). Divide the two for per-token means (IPO, SimPO, ORPO)."""
    logps, mask = token_logps(logits, labels)  # [B, T-1]
    return logps.sum(-1), mask.sum(-1)


def token_cross_entropy(outputs: ModelOutputs, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the labelled tokens (after the causal shift), summed, float32 0-dim.

    From the logits when the outputs hold them, else from the hidden states and the head chunk by chunk
    (``contracts.chunked``), scoring only the labelled positions; the two agree to float rounding."""
    if outputs.chunked:
        hidden, head, targets, _ = labelled_hidden(outputs, labels)
        return linear_cross_entropy(hidden, head, targets, label_smoothing)
    # Shift the labels rather than the logits: the logits stay a view and are never copied.
    return torch.nn.functional.cross_entropy(outputs.logits.flatten(0, 1).float(), shifted_labels(labels).flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum",
                                             label_smoothing=label_smoothing)


class _Logits:
    """``ModelOutputs.logits``: the tensor given, or, for outputs made of hidden states and a head, ``hidden @
    head.T`` computed on first read and kept (a loss that reads the logits gets them, as it always did)."""

    def __get__(self, obj: ModelOutputs | None, owner: type[Any] | None = None) -> Any:
        if obj is None:
            return None  # the dataclass's default: outputs of hidden states have no logits until they are read
        value = obj.__dict__.get("_logits")
        if value is None:
            if obj.hidden is None or obj.head is None:
                raise ValueError("these ModelOutputs hold neither logits nor hidden states and a head")
            value = obj.__dict__["_logits"] = head_logits(obj.hidden, obj.head)  # [B, T, V]
        return value

    def __set__(self, obj: ModelOutputs, value: torch.Tensor | None) -> None:
        obj.__dict__["_logits"] = value


@dataclass(repr=False, eq=False)
class ModelOutputs:
    """What the kernel's forward pass produced for a ``Batch``.

    Either the logits, or (the kernel's default for a causal LM, ``[train] chunked_loss``) the final hidden states
    and the LM head's weight, with the logits left uncomputed: ``token_cross_entropy``, ``token_logps`` and
    ``sequence_logps`` then work chunk by chunk, and reading ``logits`` computes them once (``hidden @ head.T``).
    """

    logits: _Logits = _Logits()  # [B, T, V] (a tensor; computed on first read from hidden and head)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. value-head outputs, ref log-probs
    hidden: torch.Tensor | None = None  # [B, T, H]: the head's input, in the dtype its matmul runs in
    head: torch.Tensor | None = None  # [V, H]: the head's weight, same dtype (logits = hidden @ head.T); under
    # tensor parallelism a DTensor split by vocabulary rows (read the logits, or score with the functions above)

    @property
    def chunked(self) -> bool:
        """Whether the logits are still uncomputed, so losses can work from the hidden states and the head."""
        return self.__dict__.get("_logits") is None and self.hidden is not None and self.head is not None

    @property
    def device(self) -> torch.device:
        """Where the outputs are (without computing the logits)."""
        return self.hidden.device if self.chunked and self.hidden is not None else self.logits.device

    def fields(self) -> dict[str, Any]:
        """The fields as stored, without computing the logits (what crosses to a plugin host)."""
        return {"logits": self.__dict__.get("_logits"), "extras": self.extras, "hidden": self.hidden,
                "head": self.head}

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.fields().items() if isinstance(v, torch.Tensor)}
        return f"ModelOutputs({shapes}, extras={sorted(self.extras)})"


@dataclass
class LossResult:
    """The scalar to back-propagate for one micro-batch, plus float metrics for the step record.

    ``loss`` is already normalised for the whole optimizer step (see ``Batch.num_items_in_batch``): the
    kernel sums the micro-batch losses of an accumulation window, it does not average them.
    """

    loss: torch.Tensor  # 0-dim, requires grad
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepState:
    """Where the run is; passed to every per-step hook. Read-only for plugins."""

    step: int  # optimizer steps completed (0 before the first update)
    max_steps: int
    epoch: int
    lr: float
    tokens_seen: int  # real tokens consumed so far, all ranks
    elapsed_s: float
    run_dir: str
    rank: int = 0
    world_size: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0
