"""Scoring completions: every ``swiftk_reward_compute`` implementation called on its own, its result typed.

    stage: ctx.score(prompts, completions, references)       -> PendingScores (scoring runs in the background)
      scorer thread: for each reward plugin (in-process, host, sandboxed tenant):
          call it -> ok | invalid | timeout | crashed  -> RewardColumn (NaN where not ok)
    stage: pending.result()                                   -> Scores; reward_failed events written here

pluggy would call every plugin in one go and stop at the first exception; here each plugin is called alone, so
one that hangs, crashes or returns garbage costs only its own column. Deadlines are the host supervisor's: a
reward in a host (``isolation = "process"`` or ``"sandbox"``) that misses its ``deadline_s`` has its process
killed and comes back on the next call. An in-process reward is trusted code and is not interrupted.

Scoring runs on one background thread, so that a stage can score a chunk of completions while it generates the
next (streamed scoring); calls reach the plugins one at a time, in the order they were submitted.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from numbers import Real
from typing import Any

from swiftk.contracts import HostDeadError, StepState
from swiftk.contracts.rewards import Outcome, RewardColumn, Scores
from swiftk.hosts.proxy import RemotePlugin
from swiftk.kernel.plugins import Plugins

HOOK = "swiftk_reward_compute"


class PendingScores:
    """Scores being computed; ``result()`` waits for them and records each failed column as an event."""

    def __init__(self, future: Future[Scores], event: Callable[..., None], step: int) -> None:
        self.future, self.event, self.step = future, event, step
        self.reported = False

    def result(self) -> Scores:
        scores = self.future.result()
        if not self.reported:
            self.reported = True
            for column in scores.columns:
                if column.outcome is not Outcome.OK or column.failed:
                    self.event("reward_failed", step=self.step, plugin=column.plugin, reward=column.name,
                               outcome=column.outcome.value, failed=column.failed, count=scores.count,
                               error=column.error or "")
        return scores


class RewardScorer:
    """Calls the run's reward plugins (whatever is registered now: a hot-reloaded reward is used from the next
    call) and types what each one did."""

    def __init__(self, plugins: Plugins, event: Callable[..., None]) -> None:
        self.plugins, self.event = plugins, event
        self.pool: ThreadPoolExecutor | None = None
        self.names: dict[str, list[str]] = {}  # the reward names each plugin returned when it last answered
        self.lock = threading.Lock()

    def submit(self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[str | None],
               state: StepState) -> PendingScores:
        if len(prompts) != len(completions) or len(references) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts, {len(completions)} completions and {len(references)} "
                             f"references; give one of each per completion")
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="swiftk-rewards")
            future = self.pool.submit(self.score, list(prompts), list(completions), list(references), state)
        return PendingScores(future, self.event, state.step)

    def close(self) -> None:
        with self.lock:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = None

    def score(self, prompts: list[str], completions: list[str], references: list[str | None],
              state: StepState) -> Scores:
        arguments: dict[str, Any] = {"prompts": prompts, "completions": completions, "references": references,
                                     "state": state}
        impls = sorted(self.plugins.manager.hook.swiftk_reward_compute.get_hookimpls(), key=lambda i: i.plugin_name)
        columns: list[RewardColumn] = []
        for impl in impls:
            columns += self.call(impl, arguments, len(completions))
        return Scores(columns, len(completions))

    def call(self, impl: Any, arguments: dict[str, Any], n: int) -> list[RewardColumn]:
        plugin_name, plugin = impl.plugin_name, impl.plugin
        started = time.perf_counter()
        error: BaseException | None = None
        result: Any = None
        try:
            result = impl.function(*[arguments[name] for name in impl.argnames])
            if isinstance(plugin, RemotePlugin):
                error = plugin.last_failure  # a policy other than "fail" answered for it
        except Exception as exc:
            error = exc
        seconds = time.perf_counter() - started
        if error is not None:
            outcome = Outcome.TIMEOUT if isinstance(error, HostDeadError) and "deadline_s" in str(error) else \
                Outcome.CRASHED
            return self.failed(plugin_name, outcome, n, seconds, f"{type(error).__name__}: {error}")
        if result is None:
            return []  # this plugin does not score this batch
        if not isinstance(result, dict) or not result:
            return self.failed(plugin_name, Outcome.INVALID, n, seconds,
                               f"returned {type(result).__name__}, not {{reward_name: [one float per completion]}}")
        columns = [typed_column(str(name), plugin_name, values, n, seconds) for name, values in result.items()]
        self.names[plugin_name] = [c.name for c in columns]
        return columns

    def failed(self, plugin: str, outcome: Outcome, n: int, seconds: float, error: str) -> list[RewardColumn]:
        """NaN columns for every reward ``plugin`` gave when it last answered (its own name before that)."""
        names = self.names.get(plugin) or [plugin.split(":", 1)[-1]]
        return [RewardColumn(name, plugin, [math.nan] * n, outcome, n, seconds, error) for name in names]


def typed_column(name: str, plugin: str, values: Any, n: int, seconds: float) -> RewardColumn:
    """One returned column checked: n numbers (None/NaN: does not apply); anything else fails its entry."""
    if not isinstance(values, list | tuple) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
        return RewardColumn(name, plugin, [math.nan] * n, Outcome.INVALID, n, seconds,
                            f"'{name}': returned {got} for {n} completions")
    clean: list[float] = []
    bad: list[str] = []
    for value in values:
        if value is None:
            clean.append(math.nan)
        elif isinstance(value, Real) and not isinstance(value, bool) and not math.isinf(float(value)):
            clean.append(float(value))
        else:
            clean.append(math.nan)
            bad.append(repr(value)[:40])
    if not bad:
        return RewardColumn(name, plugin, clean, Outcome.OK, 0, seconds)
    return RewardColumn(name, plugin, clean, Outcome.INVALID, len(bad), seconds,
                        f"'{name}': {len(bad)} of {n} values are not finite numbers (e.g. {', '.join(bad[:3])})")
