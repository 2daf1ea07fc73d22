"""The eval-task contract: what ``swiftk eval`` and ``[eval] tasks`` ask a model, and how its answers are scored.

A task is registered like any plugin, as a factory that returns an :class:`EvalTask` (keyword arguments are the
task's options)::

    @register_eval_task("capitals")
    def capitals(n: int = 50) -> EvalTask:
        return EvalTask("capitals", "Capital cities, answered in a word", "generate", "accuracy",
                        items=lambda: [{"prompt": "What is the capital of Peru?", "target": "Lima"}, ...],
                        reward="accuracy", chat=True)

A ``generate`` task's answers are scored by a **reward plugin** (``reward``, with ``reward_config``): the same
``swiftk_reward_compute`` that scores an online-RL rollout scores an eval answer, so a task and a training run
that share a reward share its definition of right. A ``multiple_choice`` task is scored by the log-likelihood of
each choice given the prompt (accuracy, and accuracy normalised by the choice's length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from swiftk.contracts.registry import lookup, register

T = TypeVar("T", bound=Callable[..., Any])
Kind = Literal["generate", "multiple_choice"]


@dataclass(frozen=True)
class EvalTask:
    """One benchmark task.

    Items are dicts: ``prompt`` (raw text, or the user's turn when ``chat``) and ``target`` (the reference the
    reward compares with; for a code task, its tests); a ``multiple_choice`` item also has ``choices`` (the
    continuations scored after the prompt, each with its leading space) and ``gold`` (the right one's index)."""

    name: str
    description: str
    kind: Kind
    metric: str  # the main figure: the reward's name (generate) or "acc" (multiple_choice)
    items: Callable[[], list[dict[str, Any]]]
    reward: str | None = None  # generate: the reward plugin that scores an answer (1.0 right, 0.0 wrong)
    reward_config: dict[str, Any] = field(default_factory=dict)
    chat: bool = False  # the prompt is a user turn, rendered with the model's chat template (and system prompt)
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # generation ends before the first of these (EOS always ends it)
    source: str = ""  # where the items come from, for the user (a file, a package, "generated, seed 0")

    def __post_init__(self) -> None:
        if self.kind == "generate" and not self.reward:
            raise ValueError(f"eval task '{self.name}': a generate task names the reward plugin that scores it")
        if self.kind not in ("generate", "multiple_choice"):
            raise ValueError(f"eval task '{self.name}': kind {self.kind!r}; expected generate or multiple_choice")


def register_eval_task(name: str) -> Callable[[T], T]:
    """Register a factory ``f(**options) -> EvalTask`` as the eval task ``name`` (``swiftk eval --tasks name``)."""
    return register("eval_task", name)


def build_eval_task(name: str, **options: Any) -> EvalTask:
    """The registered task ``name`` built with ``options`` (built-ins register once ``swiftk.plugins`` is imported)."""
    task = lookup("eval_task", name).target(**options)
    if not isinstance(task, EvalTask):
        raise TypeError(f"eval task '{name}' built a {type(task).__name__}, not an EvalTask")
    return task
