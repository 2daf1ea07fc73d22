"""``swiftk plugin new|check`` and ``swiftk plugins list|show``: scaffold, check, install and list a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from swiftk.kernel.cli import main
from swiftk.kernel.cli.plugin import KINDS

SWIFTK = [sys.executable, "-c", "import sys; from swiftk.kernel.cli import main; sys.exit(main())"]


def kit_args() -> list[str]:
    """``-p swiftk.contracts.testing`` unless swiftk's pytest11 entry point already loads it."""
    installed = any(ep.value == "swiftk.contracts.testing" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "swiftk.contracts.testing"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_scaffolded_plugin_passes_check_and_its_own_tests(kind: str, tmp_path: Path, capsys) -> None:
    assert main(["plugin", "new", f"scaffold-{kind}", "--kind", kind, "--dir", str(tmp_path)]) == 0
    package = tmp_path / f"scaffold-{kind}"
    module = package / f"scaffold_{kind}.py"
    assert 'SWIFTK_CONTRACT = "0.1"' in module.read_text()
    assert f'scaffold_{kind} = "scaffold_{kind}"' in (package / "pyproject.toml").read_text()
    capsys.readouterr()
    assert main(["plugin", "check", str(module)]) == 0
    assert capsys.readouterr().out.startswith("ok ")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", *kit_args()], cwd=package,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout + run.stderr


def test_new_refuses_a_bad_name_and_a_non_empty_folder(tmp_path: Path, capsys) -> None:
    assert main(["plugin", "new", "2fast", "--kind", "loss", "--dir", str(tmp_path)]) == 2
    assert "'2fast' is not a valid plugin name" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["plugin", "new", "taken", "--kind", "loss", "--dir", str(tmp_path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


BAD_LOSS = '''
from swiftk.contracts import LossResult, hookimpl, register_loss

@register_loss("cli_bad_loss")
class PerRow:
    def __init__(self, scale: float = 1.0):
        assert scale > 0, "scale must be positive"

    @hookimpl
    def swiftk_loss_compute(self, batch, outputs):
        return LossResult(outputs.logits.sum(dim=(1, 2)))
'''


def test_check_reports_findings_config_and_syntax_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.py").write_text(BAD_LOSS)
    assert main(["plugin", "check", str(tmp_path / "bad.py")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  loss:cli_bad_loss: 1 finding(s)" in out
    assert ("(hook swiftk_loss_compute) returned shape [2]; expected a 0-dim loss (on a plain SFT micro-batch). "
            "Fix: ") in out
    config = ["--name", "cli_bad_loss", "--config", '{"scale": -1}']
    assert main(["plugin", "check", str(tmp_path / "bad.py"), *config]) == 1
    assert "(hook build)" in capsys.readouterr().out
    (tmp_path / "broken.py").write_text("x = 1\ndef f(:\n")
    assert main(["plugin", "check", str(tmp_path / "broken.py")]) == 2
    assert f"SyntaxError at {tmp_path / 'broken.py'}:2" in capsys.readouterr().err


def test_list_and_show_the_builtins(capsys) -> None:
    assert main(["plugins", "list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["cross_entropy"][1:3] == ["loss", "built-in"] and rows["cross_entropy"][-1] == "inline"
    assert rows["adamw"][1] == "optimizer" and rows["cosine"][1] == "scheduler"
    assert main(["plugins", "show", "cross_entropy"]) == 0
    out = capsys.readouterr().out
    assert "label_smoothing: float = 0.0" in out and "Next-token cross-entropy" in out
    assert main(["plugins", "show", "cross_entropi"]) == 1
    assert "did you mean cross_entropy" in capsys.readouterr().err


def test_a_pip_installed_plugin_is_found_by_its_entry_point(tmp_path: Path) -> None:
    assert main(["plugin", "new", "epdemo", "--kind", "metric", "--dir", str(tmp_path)]) == 0
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
           str(tmp_path / "site"), str(tmp_path / "epdemo")]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([*SWIFTK, "plugins", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    row = ["epdemo", "metric", "epdemo", "0.1.0", "(entry", "point)", "0.1", "inline"]
    assert row in [line.split() for line in run.stdout.splitlines()], run.stdout
    # by module name, from the folder that holds the package's source folder of the same name
    run = subprocess.run([*SWIFTK, "plugin", "check", "epdemo"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok    metric:epdemo"), run.stdout + run.stderr


def test_a_pip_installed_loss_is_used_by_a_run_with_no_plugins_line(tmp_path: Path, repo: Path) -> None:
    """The package is named only by its registered name: the entry point brings it in."""
    assert main(["plugin", "new", "eploss", "--kind", "loss", "--dir", str(tmp_path)]) == 0
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
           str(tmp_path / "site"), str(tmp_path / "eploss")]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    overrides = ["--set", "train.loss_type='eploss'", "--set", "train.max_steps=2", "--set", "eval.every=2",
                 "--set", f"output.dir='{tmp_path / 'run'}'", "--set", "train.batch_size=8"]
    run = subprocess.run([*SWIFTK, "run", str(repo / "configs/tiny_sft.toml"), *overrides], env=env, cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = (tmp_path / "run/checkpoints/step-000002/meta.json").read_text()
    assert '"loss:eploss"' in meta  # the run used it, and recorded its code hash
