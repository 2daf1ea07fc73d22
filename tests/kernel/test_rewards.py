"""The reward scorer: each reward plugin called on its own, what it did typed ok / invalid / timeout / crashed."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from swiftk.contracts import StepState, hookimpl
from swiftk.contracts.rewards import Outcome, Scores
from swiftk.hosts.group import HostGroup
from swiftk.hosts.process import HostSpec
from swiftk.hosts.proxy import Policy
from swiftk.hosts.settings import HostSettings
from swiftk.kernel.plugins import Plugins, new_manager
from swiftk.kernel.rewards import RewardScorer

STATE = StepState(step=3, max_steps=10, epoch=0, lr=0.0, tokens_seen=0, elapsed_s=0.0, run_dir="", rank=0,
                  world_size=1)


class Good:
    @hookimpl
    def swiftk_reward_compute(self, completions: list[str]) -> dict[str, list[float]]:
        return {"good": [float(len(c)) for c in completions]}


class Partial:  # None: "does not apply" to that completion, not a failure
    @hookimpl
    def swiftk_reward_compute(self, completions: list[str], references: list[str | None]) -> dict[str, list[Any]]:
        return {"partial": [None if r is None else 1.0 for r in references]}


class Garbage:
    @hookimpl
    def swiftk_reward_compute(self, completions: list[str]) -> dict[str, list[Any]]:
        return {"garbage": ["high", math.inf, 0.5][: len(completions)], "short": [1.0]}


class Crashing:
    @hookimpl
    def swiftk_reward_compute(self, completions: list[str]) -> dict[str, list[float]]:
        raise RuntimeError("the judge is down")


class Abstaining:
    @hookimpl
    def swiftk_reward_compute(self, completions: list[str]) -> None:
        return None


def scorer(*plugins: object) -> tuple[RewardScorer, list[tuple[str, dict[str, Any]]]]:
    manager = Plugins(new_manager())
    for i, plugin in enumerate(plugins):
        manager.register(f"reward:{type(plugin).__name__.lower()}{i}", plugin, type(plugin))
    events: list[tuple[str, dict[str, Any]]] = []
    return RewardScorer(manager, lambda name, **fields: events.append((name, fields))), events


def test_each_plugin_gets_its_own_typed_columns_and_failures_are_nan_and_recorded() -> None:
    rewards, events = scorer(Good(), Partial(), Garbage(), Crashing(), Abstaining())
    pending = rewards.submit(["p"] * 3, ["a", "bb", "ccc"], ["x", None, "y"], STATE)
    scores = pending.result()
    pending.result()  # a second wait records nothing twice
    rewards.close()
    by_name = {c.name: c for c in scores.columns}
    assert set(by_name) == {"good", "partial", "garbage", "short", "crashing3"}  # the abstainer has no column
    assert by_name["good"].values == [1.0, 2.0, 3.0] and by_name["good"].outcome is Outcome.OK
    assert by_name["partial"].outcome is Outcome.OK and math.isnan(by_name["partial"].values[1])
    garbage = by_name["garbage"]
    assert garbage.outcome is Outcome.INVALID and garbage.failed == 2 and garbage.values[2] == 0.5
    assert "'high'" in (garbage.error or "")
    assert by_name["short"].outcome is Outcome.INVALID and by_name["short"].failed == 3
    assert "1 values for 3 completions" in (by_name["short"].error or "")
    crashed = by_name["crashing3"]
    assert crashed.outcome is Outcome.CRASHED and all(math.isnan(v) for v in crashed.values)
    assert "the judge is down" in (crashed.error or "")
    assert scores.failure_rate == pytest.approx((2 + 3 + 3) / (3 * 5))
    failed = {(f["reward"], f["outcome"]) for name, f in events if name == "reward_failed"}
    assert failed == {("garbage", "invalid"), ("short", "invalid"), ("crashing3", "crashed")}
    assert all(f["step"] == 3 and f["count"] == 3 for _, f in events)


def test_totals_are_weighted_nansums_and_nan_only_where_no_reward_has_a_value() -> None:
    rewards, _ = scorer(Good(), Partial())
    scores = rewards.submit(["p"] * 2, ["a", "bb"], ["x", None], STATE).result()
    assert scores.total({"good": 0.5, "partial": 2.0}) == [0.5 + 2.0, 1.0]
    crash_only, _ = scorer(Crashing())
    assert all(math.isnan(v) for v in crash_only.submit(["p"], ["a"], ["x"], STATE).result().total({}))


def test_chunks_merge_into_one_scores_in_order() -> None:
    rewards, _ = scorer(Good(), Crashing())
    parts = [rewards.submit(["p"] * n, ["x" * (i + 1)] * n, [None] * n, STATE) for i, n in enumerate((2, 3))]
    merged = Scores.merge([p.result() for p in parts])
    assert merged.count == 5
    assert next(c for c in merged.columns if c.name == "good").values == [1, 1, 2, 2, 2]
    assert next(c for c in merged.columns if c.name != "good").failed == 5


def test_scoring_runs_in_the_background_while_the_caller_goes_on() -> None:
    class Slow:
        @hookimpl
        def swiftk_reward_compute(self, completions: list[str]) -> dict[str, list[float]]:
            time.sleep(0.5)
            return {"slow": [1.0] * len(completions)}

    rewards, _ = scorer(Slow())
    started = time.perf_counter()
    pending = [rewards.submit(["p"], ["a"], [None], STATE) for _ in range(2)]
    assert time.perf_counter() - started < 0.2  # submitted, not waited for
    assert [p.result().columns[0].values for p in pending] == [[1.0], [1.0]]
    assert time.perf_counter() - started >= 1.0  # one plugin call at a time, in order


def test_a_wrong_count_of_prompts_is_refused_at_submit() -> None:
    rewards, _ = scorer(Good())
    with pytest.raises(ValueError, match="one of each per completion"):
        rewards.submit(["p"], ["a", "b"], [None, None], STATE)


HANGS = '''
import pathlib
import time
from swiftk.contracts import hookimpl

MARK = pathlib.Path(__file__).with_suffix(".hung")

@hookimpl
def swiftk_reward_compute(completions):
    if not MARK.exists():  # the first call ever hangs: the supervisor kills the host at the deadline
        MARK.touch()
        time.sleep(60)
    return {"hangs": [1.0] * len(completions)}
'''


@pytest.mark.slow
def test_a_reward_in_a_host_that_misses_its_deadline_is_a_timeout_and_the_next_call_is_served(tmp_path: Path) -> None:
    source = tmp_path / "hangs.py"
    source.write_text(HANGS)
    spec = HostSpec("process:hangs", [str(source)], ["hangs"], None)
    group = HostGroup([spec], {"hangs": Policy("skip", None, 2.0, 5, 300.0)}, HostSettings())
    try:
        assert group.start() == []
        manager = Plugins(new_manager(), hosts=group)
        for name, proxy in group.module_proxies:
            manager.register(f"module:{name}", proxy, None, proxy.code_hash)
        events: list[Any] = []
        rewards = RewardScorer(manager, lambda name, **fields: events.append(fields))
        started = time.perf_counter()
        first = rewards.submit(["p"] * 2, ["a", "b"], [None] * 2, STATE).result()
        assert time.perf_counter() - started < 20
        assert first.columns[0].outcome is Outcome.TIMEOUT and first.failure_rate == 1.0
        assert "deadline" in (first.columns[0].error or "")
        second = rewards.submit(["p"] * 2, ["a", "b"], [None] * 2, STATE).result()  # a fresh host answers
        assert [(c.name, c.outcome, c.values) for c in second.columns] == [("hangs", Outcome.OK, [1.0, 1.0])]
        rewards.close()
    finally:
        group.close()
    assert SimpleNamespace(**events[0]).outcome == "timeout"
