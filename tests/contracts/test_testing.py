"""The pytest plugin for plugin authors: its fixtures, swiftk_check's failure report, and its import cost."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

AUTHOR_TESTS = '''
import swiftk.plugins
from swiftk.contracts import hookimpl, lookup


def test_fixtures(swiftk_check, swiftk_batch, swiftk_outputs, swiftk_state, tmp_path):
    swiftk_check(lookup("loss", "cross_entropy"), label_smoothing=0.1)
    assert swiftk_outputs.logits.shape == (*swiftk_batch.input_ids.shape, 11)
    assert swiftk_state.run_dir == str(tmp_path) and swiftk_state.step == 0


def test_typo(swiftk_check):
    class Typo:
        @hookimpl
        def swiftk_lossx(self, batch):
            pass

    swiftk_check(Typo())
'''


def kit_args() -> list[str]:
    """``-p swiftk.contracts.testing`` unless swiftk's pytest11 entry point already loads it."""
    installed = any(ep.value == "swiftk.contracts.testing" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "swiftk.contracts.testing"]


def test_the_fixtures_and_swiftk_check_in_an_authors_test_run(tmp_path: Path) -> None:
    (tmp_path / "test_author.py").write_text(AUTHOR_TESTS)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", *kit_args(), "test_author.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed" in run.stdout, run.stdout + run.stderr
    assert "1 conformance finding(s):" in run.stdout
    assert "plugin 'Typo' (hook swiftk_lossx) is not a swiftk hook" in run.stdout
    assert "Fix: rename it to swiftk_loss_compute" in run.stdout


def test_loading_the_plugin_imports_neither_the_kernel_nor_transformers() -> None:
    """pytest loads the plugin in every session of the environment: it must stay cheap."""
    code = "import sys, swiftk.contracts.testing; print({'swiftk.kernel', 'transformers'} & set(sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "set()", run.stderr
