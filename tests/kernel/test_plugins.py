"""The kernel's side of the plugin contract: loading, checking, selecting, and calling plugins in a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from swiftk.contracts.events import RunEndEvent, read
from swiftk.hosts import tenants
from swiftk.kernel.cli import main

from ..conftest import write_config
from .test_run import losses, records

FOCAL = '''
import torch
import torch.nn.functional as F
from swiftk.plugin import register_loss


@register_loss("focal_loss")
class FocalLoss(torch.nn.Module):
    def __init__(self, alpha: float = 1.0, gamma: float = 2.0):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits, labels):  # [N, V], [N]
        logp = F.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
        return -self.alpha * (1 - logp.exp()).clamp(min=1e-12) ** self.gamma * logp
'''


def with_plugin(tmp_path: Path, tiny_config: Path, code: str, train_lines: str = "", name: str = "custom.py") -> Path:
    (tmp_path / name).write_text(code)
    text = f'plugins = ["{tmp_path / name}"]\n' + tiny_config.read_text()
    return write_config(tmp_path / "c.toml", text.replace("[train]\n", f"[train]\n{train_lines}\n", 1))


def test_seed_example_focal_with_gamma_0_trains_exactly_like_cross_entropy(tiny_config: Path, tmp_path: Path) -> None:
    cfg = with_plugin(tmp_path, tiny_config, FOCAL,
                      'loss_type = "focal_loss"\nloss_config = { alpha = 1.0, gamma = 0.0 }')
    assert main(["run", str(cfg), "--set", "train.max_steps=3", "--set", "train.precision='fp32'"]) == 0
    focal = losses(tmp_path / "run")
    ce_dir = tmp_path / "ce"
    assert main(["run", str(tiny_config), "--set", "train.max_steps=3", "--set", "train.precision='fp32'",
                 "--set", f"output.dir='{ce_dir}'"]) == 0
    assert focal == pytest.approx(losses(ce_dir), rel=1e-6)
    assert main(["run", str(cfg), "--overwrite", "--set", "train.max_steps=3",
                 "--set", "train.loss_config={gamma=2.0}"]) == 0
    focal2 = losses(tmp_path / "run")
    assert all(focal2[s] < focal[s] for s in focal)  # (1 - p_t)^2 < 1 down-weights every token


def test_seed_example_in_yaml(tiny_config: Path, tmp_path: Path) -> None:
    import tomllib

    (tmp_path / "custom.py").write_text(FOCAL)
    data = tomllib.loads(tiny_config.read_text())
    data["plugins"] = [str(tmp_path / "custom.py")]
    data["train"] |= {"loss_type": "focal_loss", "loss_config": {"alpha": 0.8, "gamma": 2.0}, "max_steps": 2}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    assert sorted(losses(tmp_path / "run")) == [1, 2]


def test_every_plugin_problem_is_reported_before_loading(tiny_config: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "hooks.py").write_text(
        "from swiftk.contracts import hookimpl\nSWIFTK_CONTRACT = '0.1'\n"
        "@hookimpl\ndef swiftk_step_end(state, metrics, oops):\n    return None\n")
    cfg = with_plugin(tmp_path, tiny_config, FOCAL, 'loss_type = "focal_loss"\nloss_config = { beta = 1 }')
    text = cfg.read_text().replace("plugins = [", f'plugins = ["{tmp_path / "broken.py"}", "{tmp_path / "hooks.py"}", ')
    cfg.write_text(text)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"SyntaxError at {tmp_path / 'broken.py'}:1" in err
    assert "swiftk_step_end takes oops, which the hook does not pass" in err and "it may take any of" in err
    assert "unexpected keyword argument 'beta'" in err and "it accepts: alpha=1.0, gamma=2.0" in err
    assert not (tmp_path / "run").exists()


def test_argument_types_and_contract_versions_are_checked(tiny_config: Path, tmp_path: Path, capsys) -> None:
    code = FOCAL.replace("import torch\n", "import torch\nSWIFTK_CONTRACT = '9.0'\n", 1)
    cfg = with_plugin(tmp_path, tiny_config, code, 'loss_type = "focal_loss"\nloss_config = { alpha = "high" }')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "alpha = 'high' is not a valid float" in err
    assert "written for contract 9.0" in err


def test_a_hook_class_with_a_typo_or_a_missing_marker_is_refused(tiny_config: Path, tmp_path: Path, capsys) -> None:
    code = ("from swiftk.plugin import register_callback, hookimpl\n@register_callback('noisy')\nclass Noisy:\n"
            "    @hookimpl\n    def swiftk_step_ends(self, state):\n        pass\n"
            "    def swiftk_run_start(self, state):\n        pass\n")
    cfg = with_plugin(tmp_path, tiny_config, code, 'callbacks = ["noisy"]')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "swiftk_step_ends is not a swiftk hook" in err and "rename it to swiftk_step_end" in err
    assert "swiftk_run_start is not marked with @hookimpl" in err


def test_the_same_name_from_two_plugin_files_names_both(tiny_config: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "other.py").write_text(FOCAL)
    cfg = with_plugin(tmp_path, tiny_config, FOCAL, 'loss_type = "focal_loss"')
    cfg.write_text(cfg.read_text().replace("plugins = [", f'plugins = ["{tmp_path / "other.py"}", '))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "registered twice" in err and "other.py" in err and "custom.py" in err


def test_long_form_plugin_tables(tiny_config: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "m.py").write_text(STEP_METRIC)
    table = f'[[plugins]]\npath = "{tmp_path / "m.py"}"\nname = "my-metric"\nisolation = "inline"\n\n'
    cfg = write_config(tmp_path / "c.toml", table + tiny_config.read_text())
    assert main(["run", str(cfg), "--set", "train.max_steps=2"]) == 0
    assert records(tmp_path / "run")[0][0].metrics["double_loss"] == pytest.approx(2 * losses(tmp_path / "run")[1])
    cfg.write_text(cfg.read_text().replace('isolation = "inline"', 'isolation = "process"'))
    assert main(["run", str(cfg), "--set", "train.max_steps=2", "--overwrite"]) == 0  # the same hook, in a host
    assert records(tmp_path / "run")[0][0].metrics["double_loss"] == pytest.approx(2 * losses(tmp_path / "run")[1])
    cfg.write_text(cfg.read_text().replace('isolation = "process"', 'isolation = "sandbox"'))
    _, missing, _ = tenants.plan(None)
    if missing:  # not root: the sandbox refuses to start and says which layers are missing
        assert main(["run", str(cfg), "--set", "train.max_steps=2", "--overwrite"]) == 2
        assert "cannot give tenant hosts the core layers" in capsys.readouterr().err
        return
    assert main(["run", str(cfg), "--set", "train.max_steps=2", "--overwrite"]) == 0  # a tenant of its own
    assert records(tmp_path / "run")[0][0].metrics["double_loss"] == pytest.approx(2 * losses(tmp_path / "run")[1])


STEP_METRIC = '''
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_step_end(state, metrics):
    return {"double_loss": 2 * metrics["loss"]}
'''


STATEFUL = '''
from swiftk.plugin import register_callback, hookimpl

@register_callback("counter")
class Counter:
    def __init__(self):
        self.seen = 0

    @hookimpl
    def swiftk_step_end(self, state):
        self.seen += 1
        return {"seen": float(self.seen)}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]
'''


def test_plugin_state_is_checkpointed_and_restored(tiny_config: Path, tmp_path: Path) -> None:
    cfg = with_plugin(tmp_path, tiny_config, STATEFUL, 'callbacks = ["counter"]')
    assert main(["run", str(cfg), "--set", "output.keep_last=5"]) == 0
    resumed = tmp_path / "resumed"
    assert main(["run", str(cfg), "--set", f"output.dir='{resumed}'",
                 "--resume", str(tmp_path / "run/checkpoints/step-000004")]) == 0
    steps = records(resumed)[0]
    assert [r.metrics["seen"] for r in steps] == [float(s) for s in range(5, 13)]


DATA_HOOKS = '''
import torch
from swiftk.contracts import hookimpl

calls = {"rows": 0, "collate": 0, "batch_start": 0}

@hookimpl
def swiftk_data_row(row, split):
    calls["rows"] += 1
    if split == "train":
        return {"prompt": row["prompt"], "completion": "7"}  # every answer becomes 7

@hookimpl
def swiftk_batch_start(batch):
    calls["batch_start"] += 1
    assert batch.num_items_in_batch > 0

@hookimpl
def swiftk_model_loaded(model):
    calls["model_params"] = sum(p.numel() for p in model.parameters())

@hookimpl
def swiftk_step_end(state):
    return {"rows": float(calls["rows"]), "batch_starts": float(calls["batch_start"]),
            "model_params": float(calls["model_params"])}
'''


def test_data_row_batch_start_and_model_loaded_hooks_are_called(tiny_config: Path, tmp_path: Path) -> None:
    cfg = with_plugin(tmp_path, tiny_config, DATA_HOOKS)
    assert main(["run", str(cfg), "--set", "train.max_steps=40", "--set", "eval.every=40",
                 "--set", "train.lr=3e-3"]) == 0
    steps, events = records(tmp_path / "run")
    assert steps[0].metrics["rows"] == 2000 + 100  # each train and eval row once (the eval references reuse them)
    assert steps[-1].metrics["batch_starts"] == 40 and steps[0].metrics["model_params"] > 3e6
    assert isinstance(events[-1], RunEndEvent)
    assert steps[-1].loss < 0.3  # "always 7" is learnt quickly; real sums would not be


def test_weight_decay_in_optimizer_config_applies_to_the_decayed_group(tiny_config: Path, tmp_path: Path) -> None:
    """The issue's ms-swift spelling, optimizer_config = { weight_decay = 0.01 }: matrices decay, norms do not."""
    from swiftk.kernel.config import load_config
    from swiftk.kernel.plugins import optimizer_arguments, weight_decay

    cfg = load_config(tiny_config, ["train.optimizer_config={ weight_decay = 0.01, eps = 1e-6 }"])
    assert weight_decay(cfg.train) == 0.01 and optimizer_arguments(cfg.train) == {"eps": 1e-6}
    assert main(["run", str(tiny_config), "--set", "train.max_steps=1",
                 "--set", "train.optimizer_config={ weight_decay = 0.01 }"]) == 0


CRASHES_AT_STEP_7 = '''
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_step_end(state):
    if state.step == 7:
        raise ValueError("metric blew up")
'''


def test_a_crashing_plugin_stops_the_run_naming_itself_and_keeps_checkpoints(tiny_config: Path, tmp_path: Path,
                                                                              capsys) -> None:
    cfg = with_plugin(tmp_path, tiny_config, CRASHES_AT_STEP_7, name="crashy.py")
    assert main(["run", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "PluginError: plugin 'module:crashy' (hook swiftk_step_end) raised ValueError" in err
    assert f"{tmp_path / 'crashy.py'}:7: metric blew up" in err
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["step-000004"]
    assert read(tmp_path / "run/metrics.jsonl")[-1] == RunEndEvent(step=7, status="failed")
