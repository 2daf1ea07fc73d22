"""What scoring completions returns: one typed column per reward, whatever ran it and however it ended.

The online RL stages (GRPO, PPO) score every rollout through ``StepContext.score``. The kernel calls each
plugin implementing ``swiftk_reward_compute`` on its own (in-process, in a host, or sandboxed as a tenant) and
turns what happened into a ``RewardColumn``:

    ok        the plugin answered one finite float (or None: "does not apply") per completion
    invalid   it answered, but not that (a wrong length, a string, inf): the bad entries are NaN
    timeout   its host missed the call's deadline and was killed by the supervisor
    crashed   it raised, or its host died

A value that is not ``ok`` is NaN, and NaN never reaches an advantage: a completion whose every reward is NaN
gets advantage 0 and is left out of the loss. ``Scores.failure_rate`` is the share of (completion, reward)
cells that failed; a stage pauses the run (``PauseRun``) when it passes ``[train] reward_failure_threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"
    INVALID = "invalid"
    TIMEOUT = "timeout"
    CRASHED = "crashed"


@dataclass(frozen=True)
class RewardColumn:
    """One reward's values for the scored completions (NaN: failed, or "does not apply" when ``ok``)."""

    name: str  # the reward's name as the plugin returned it (``{"accuracy": [...]}``)
    plugin: str  # the plugin that computed it, as registered ("reward:accuracy", "module:my_rewards")
    values: list[float]
    outcome: Outcome
    failed: int  # entries that failed (all of them unless ``ok``/``invalid``)
    seconds: float
    error: str | None = None  # what went wrong, for the event and the pause message


@dataclass(frozen=True)
class Scores:
    """Every reward column for one batch of completions."""

    columns: list[RewardColumn]
    count: int  # completions scored

    def total(self, weights: Mapping[str, float]) -> list[float]:
        """The weighted sum per completion over the columns with a value (NaN where none has one), as TRL's
        nansum: a reward that does not apply to a completion does not zero it."""
        totals = []
        for i in range(self.count):
            terms = [weights.get(c.name, 1.0) * c.values[i] for c in self.columns if not math.isnan(c.values[i])]
            totals.append(sum(terms) if terms else math.nan)
        return totals

    @property
    def failure_rate(self) -> float:
        cells = self.count * len(self.columns)
        return sum(c.failed for c in self.columns) / cells if cells else 0.0

    def means(self) -> dict[str, float]:
        """Each reward's mean over the completions it has a value for (NaN if none)."""
        return {column.name: mean_of(column.values) for column in self.columns}

    def metrics(self) -> dict[str, float]:
        """``reward/failure_rate`` and, per reward, the mean and std of its values and its failures."""
        out = {"reward/failure_rate": self.failure_rate}
        for column in self.columns:
            values = [v for v in column.values if not math.isnan(v)]
            mean = mean_of(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            out[f"rewards/{column.name}/mean"] = mean
            out[f"rewards/{column.name}/std"] = std
            if column.failed:
                out[f"rewards/{column.name}/failed"] = float(column.failed)
        return out

    @staticmethod
    def merge(parts: Sequence[Scores]) -> Scores:
        """One ``Scores`` for the concatenated completions of ``parts`` (scored chunk by chunk)."""
        names = list(dict.fromkeys((c.plugin, c.name) for part in parts for c in part.columns))
        columns = []
        for plugin, name in names:
            values: list[float] = []
            failed, seconds, outcome, error = 0, 0.0, Outcome.OK, None
            for part in parts:
                column = next((c for c in part.columns if (c.plugin, c.name) == (plugin, name)), None)
                if column is None:  # the plugin did not score this chunk (returned None)
                    values += [math.nan] * part.count
                    continue
                values += column.values
                failed, seconds = failed + column.failed, seconds + column.seconds
                if column.outcome is not Outcome.OK:
                    outcome, error = column.outcome, column.error
            columns.append(RewardColumn(name, plugin, values, outcome, failed, seconds, error))
        return Scores(columns, sum(p.count for p in parts))


def mean_of(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN (NaN if none is)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


class PauseRun(Exception):
    """Raised by a stage's phase when the run must stop for the user to fix something (rewards that keep
    failing): the kernel saves a checkpoint of the current step, records a ``paused`` event with this message and
    ends the run; ``swiftk run CONFIG --resume`` continues from there once it is fixed."""
