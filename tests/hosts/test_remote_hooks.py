"""Callbacks, metrics and module hooks in a host: tensors in by reference, floats out, state checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest

from swiftk.contracts.events import EvalEvent, StepEvent
from swiftk.kernel.cli import main

from .helpers import REPO, assert_clean, events, run

COUNTER = '''
from swiftk.contracts import hookimpl, register_callback

@register_callback("counter")
class Counter:
    """Counts steps and label tokens it saw (a stateful callback, so its state goes into checkpoints)."""

    def __init__(self) -> None:
        self.steps = 0
        self.tokens = 0

    @hookimpl
    def swiftk_batch_start(self, batch):
        self.tokens += int((batch.labels != -100).sum())  # reads the batch's tensors, mapped read-only

    @hookimpl
    def swiftk_step_end(self, state, metrics):
        self.steps += 1
        return {"counted_steps": float(self.steps), "counted_tokens": float(self.tokens)}

    def state_dict(self):
        return {"steps": self.steps, "tokens": self.tokens}

    def load_state_dict(self, state):
        self.steps, self.tokens = state["steps"], state["tokens"]
'''


def config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "counter.py").write_text(COUNTER)
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    for old, new in (("max_steps = 450", "max_steps = 6"), ("save_every = 150", "save_every = 3"),
                     ("every = 150", "every = 6"), ('dir = "runs/tiny_sft"', f'dir = "{tmp_path / "run"}"'),
                     ("batch_size = 64", "batch_size = 8"), ("[train]\n", '[train]\ncallbacks = ["counter"]\n')):
        text = text.replace(old, new, 1)
    head = f'[[plugins]]\npath = "{tmp_path / "counter.py"}"\nisolation = "process"\n\n'
    head += '[[plugins]]\nmodule = "swiftk.plugins.metrics.token"\nisolation = "process"\n' + extra + "\n"
    path = tmp_path / "c.toml"
    path.write_text(head + text)
    return path


def test_callback_and_metric_in_hosts_report_and_resume(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert main(["run", str(cfg), "--set", 'log.progress="none"', "--set", "train.max_steps=3"]) == 0
    assert main(["run", str(cfg), "--set", 'log.progress="none"', "--resume"]) == 0
    records = [r.metrics for r in events(tmp_path / "run", StepEvent) if "counted_steps" in r.metrics]
    assert [r["counted_steps"] for r in records] == [1, 2, 3, 4, 5, 6]  # state came back from the checkpoint
    assert records[-1]["counted_tokens"] > records[2]["counted_tokens"] > 0
    evals = events(tmp_path / "run", EvalEvent)
    assert evals and 0 <= evals[-1].metrics["eval_token_accuracy"] <= 1
    assert_clean()


def test_eval_metric_in_a_host_matches_in_process(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert run(cfg) == 0
    remote = events(tmp_path / "run", EvalEvent)[-1].metrics["eval_token_accuracy"]
    inline = cfg.read_text().replace('metrics.token"\nisolation = "process"', 'metrics.token"\nisolation = "inline"')
    cfg.write_text(inline)
    assert run(cfg, "--overwrite") == 0
    assert events(tmp_path / "run", EvalEvent)[-1].metrics["eval_token_accuracy"] == pytest.approx(remote, rel=1e-6)
    assert_clean()


def test_a_hook_that_needs_the_model_is_refused_before_training(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "patch.py").write_text(
        "from swiftk.contracts import hookimpl\n\n@hookimpl\ndef swiftk_model_loaded(model, tokenizer, config):\n"
        "    return None\n")
    text = (REPO / "configs" / "tiny_sft.toml").read_text().replace('dir = "runs/tiny_sft"',
                                                                     f'dir = "{tmp_path / "run"}"')
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[plugins]]\npath = "{tmp_path / "patch.py"}"\nisolation = "process"\n\n' + text)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "swiftk_model_loaded receives kernel objects" in err and "patch.py" in err
    assert not (tmp_path / "run").exists()
    assert_clean()


def test_plugins_of_one_group_share_a_host_and_different_limits_are_refused(tmp_path: Path) -> None:
    from swiftk.kernel.config import load_config
    from swiftk.kernel.plugins import start_hosts

    cfg_path = config(tmp_path)
    text = cfg_path.read_text().replace('isolation = "process"\n', 'isolation = "process"\ngroup = "shared"\n')
    cfg_path.write_text(text)
    hosts, problems = start_hosts(load_config(cfg_path))
    assert problems == [] and hosts is not None
    assert [h.spec.names for h in hosts.hosts] == [["counter", "swiftk.plugins.metrics.token"]]
    hosts.close()
    cfg_path.write_text(text.replace('group = "shared"\n', 'group = "shared"\nmemory_mb = 4096\n', 1))
    hosts, problems = start_hosts(load_config(cfg_path))
    assert hosts is None and "group 'shared' sets different memory_mb values" in problems[0]
    assert_clean()
