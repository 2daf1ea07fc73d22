"""The Stage contract: registration checks, and the kernel running a plugin stage's phases around ``learn``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swiftk.contracts import Stage, register_stage
from swiftk.contracts.events import StepEvent, of_kind, read
from swiftk.kernel.cli import main

from ..conftest import write_config

PHASED = '''
import json
from swiftk.plugin import register_stage
from swiftk.plugins.stages.sft import SFT

LOG = {log!r}

@register_stage("phased")
class Phased(SFT):
    phases = ("rollout", "learn", "sync")

    def rollout(self, ctx, micro):  # before the update: may replace the step's micro-batches
        self.note("rollout", ctx.step, len(micro))
        return micro[:1]  # learn from the first micro-batch only

    def sync(self, ctx, micro):  # after the update
        self.note("sync", ctx.step, len(micro))
        return micro

    def note(self, phase, step, batches):
        with open(LOG, "a") as handle:
            handle.write(json.dumps([phase, step, batches]) + "\\n")
'''


def test_a_stage_without_learn_or_not_a_stage_is_refused() -> None:
    with pytest.raises(TypeError, match="has no 'learn'"):
        register_stage("no_learn")(type("NoLearn", (Stage,), {"phases": ("rollout",)}))
    with pytest.raises(TypeError, match="subclass of swiftk.contracts.Stage"):
        register_stage("not_a_stage")(object)  # type: ignore[type-var]


def test_the_kernel_runs_a_plugin_stages_phases_around_learn(tmp_path: Path, tiny_config: Path) -> None:
    log = tmp_path / "phases.jsonl"
    plugin = tmp_path / "phased.py"
    plugin.write_text(PHASED.format(log=str(log)))
    config = write_config(tmp_path / "phased.toml", f'plugins = ["{plugin}"]\n' + tiny_config.read_text(),
                          max_steps="2", grad_accum="2")
    config.write_text(config.read_text().replace("[train]\n", '[train]\nstage = "phased"\n'))
    assert main(["run", str(config), "--set", 'log.progress="none"', "--set", "output.save_final=false"]) == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["rollout", 0, 2], ["sync", 1, 1], ["rollout", 1, 2], ["sync", 2, 1]]
    rows = of_kind(read(tmp_path / "run" / "metrics.jsonl"), StepEvent)
    assert [r.step for r in rows] == [1, 2]
