"""The Generator contract: prompts in, completions out, and versioned weights.

Sampling at eval, rollouts, ``swiftk infer``/``serve``/``eval`` and the web chat all go through a ``Generator``.
``hf`` runs in the trainer's process over the live model; ``vllm`` runs in its own environment and process.
So ``generate`` takes and returns plain data (strings, chat messages, numbers) that a wire message can carry;
only ``load_weights`` sees tensors, and a remote generator sends those as descriptors, never as bytes.

A generator is registered like any plugin and built by the kernel with the live model and tokenizer first,
then its config table::

    @register_generator("hf")
    class HFGenerator:
        def __init__(self, model, tokenizer, *, batch_size: int = 8, ...) -> None: ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import torch

from swiftk.contracts.registry import lookup, register

Message = dict[str, Any]  # {"role": "user", "content": "..."}, as in the training data
FinishReason = Literal["stop", "length"]
T = TypeVar("T", bound=Callable[..., Any])


@dataclass(frozen=True)
class SamplingParams:
    """How to continue each prompt. ``temperature = 0`` is greedy; ``top_k = 0`` and ``top_p = 1`` are off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1  # completions per prompt
    stop: tuple[str, ...] = ()  # the text is cut before the first of these; finish_reason "stop"
    seed: int | None = None  # set: the same call (prompts, params, batch size) returns the same completions
    logprobs: bool = False  # report log p(token) of each chosen token under the model's raw logits

    def __post_init__(self) -> None:
        problems = [
            f"{name} = {value!r}: {rule}"
            for name, value, ok, rule in (
                ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, "must be at least 1"),
                ("temperature", self.temperature, self.temperature >= 0, "must be >= 0 (0: greedy)"),
                ("top_p", self.top_p, 0 < self.top_p <= 1, "must be in (0, 1]"),
                ("top_k", self.top_k, self.top_k >= 0, "must be >= 0 (0: off)"),
                ("n", self.n, self.n >= 1, "must be at least 1"),
            )
            if not ok
        ]
        if isinstance(self.stop, str):  # a lone string would be read as its characters
            problems.append(f"stop = {self.stop!r}: must be a tuple of strings")
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of ``prompts[prompt_index]``.

    ``token_ids`` are the generated tokens, up to and including the one that ended it (EOS, end of turn, or
    the token that completed a stop string); ``text`` is their decoding without special tokens, cut before a
    stop string. ``logprobs`` (one per token id) when ``SamplingParams.logprobs``, else None."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: FinishReason
    prompt_index: int


@dataclass(frozen=True)
class Scored:
    """log p(continuation | context) under the model's raw logits (no temperature), summed over the continuation's
    tokens: what an evaluation's multiple-choice and perplexity tasks ask of a model."""

    logprob: float
    greedy: bool  # every continuation token was the most likely token at its position
    tokens: int  # continuation tokens scored


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter to serve on top of the base weights: its tensors under the tuner's state-dict names and
    its config (``r``, ``lora_alpha``, ``target_modules``...), as PEFT writes them."""

    tensors: Mapping[str, torch.Tensor]
    config: Mapping[str, Any] = field(default_factory=dict)
    name: str = "default"

    def __post_init__(self) -> None:  # PEFT's to_dict() holds sets and enums; a wire message and a JSON file do not
        object.__setattr__(self, "config", plain_data(self.config))


def plain_data(value: Any) -> Any:
    """``value`` in JSON's types: mappings and sequences element-wise, a set as a sorted list, an enum as its value."""
    if isinstance(value, Enum):
        return plain_data(value.value)
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((plain_data(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [plain_data(v) for v in value]
    return value


@runtime_checkable
class Generator(Protocol):
    """Generates completions and serves a numbered version of the policy's weights.

    A generator that samples from the very model object the trainer holds sets the class attribute
    ``shares_weights = True``: the kernel's sync then calls ``load_weights(version)`` with no tensors. Any other
    is sent, after each update, a PEFT model's adapter or the trainable tensors."""

    @property
    def version(self) -> int:
        """The weights version it serves (0 until the first ``load_weights``)."""
        ...

    def generate(
        self, prompts: Sequence[str] | Sequence[list[Message]], sampling: SamplingParams, *, templated: bool = False
    ) -> list[Completion]:
        """``sampling.n`` completions per prompt, grouped in prompt order (prompt 0's n, then prompt 1's...).

        A prompt is raw text (it gets the tokenizer's special tokens, as in training) or a chat (messages,
        rendered with the tokenizer's chat template up to the assistant's turn). ``templated``: the string
        prompts already went through the chat template, which carries its own special tokens."""
        ...

    def load_weights(
        self, version: int, tensors: Mapping[str, torch.Tensor] | None = None, adapter: Adapter | None = None
    ) -> int:
        """Serve ``version`` from now on: the given full tensors (by parameter name; a subset updates those)
        and/or the adapter, or, with neither, the weights it can already see. Returns the version it serves."""
        ...

    def close(self) -> None:
        """Release what it holds (a server process, its memory); a closed generator generates no more."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """A generator that can also score given continuations (a capability; not every generator has it:
    ``isinstance(generator, Scorer)``)."""

    def score(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[Scored]:
        """For each (context token ids, continuation token ids) pair — ids from the generator's tokenizer, the
        context non-empty, the continuation non-empty — the continuation's log-likelihood given the context, in
        request order. A pair longer than the model's positions loses context tokens from the left (the
        continuation is kept whole)."""
        ...


def register_generator(name: str) -> Callable[[T], T]:
    """Register a generator class (or factory) called ``target(model, tokenizer, **config)`` by the kernel."""
    return register("generator", name)


def build_generator(name: str, model: Any, tokenizer: Any, **config: Any) -> Generator:
    """The registered generator ``name`` (built-ins register once ``swiftk.plugins`` is imported)."""
    generator = lookup("generator", name).target(model, tokenizer, **config)
    if not isinstance(generator, Generator):
        raise TypeError(f"generator '{name}' built a {type(generator).__name__}, which lacks the Generator methods")
    return generator
