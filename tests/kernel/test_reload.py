"""Hot reload: a loss edited while training runs is used from the next step; broken edits are rejected."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from swiftk.contracts.events import (
    Event,
    HostDiedEvent,
    PluginFailedEvent,
    PluginReloadedEvent,
    PluginReloadRejectedEvent,
    of_kind,
    read,
    steps,
)
from swiftk.hosts import tenants
from swiftk.kernel.cli import main

REPO = Path(__file__).resolve().parents[2]
LOSS = '''
import time
import torch.nn.functional as F
from swiftk.contracts import LossResult, hookimpl, register_loss, supervised

@register_loss("live")
class Live:
    @hookimpl
    def swiftk_loss_compute(self, batch, outputs):
        time.sleep(0.03)  # a steady step, so that edits land mid-run
        logits, labels = supervised(batch, outputs)
        ce = F.cross_entropy(logits.float(), labels, reduction="sum") / batch.num_items_in_batch
        return LossResult(FACTOR * ce, {"ce": float(ce.detach())})
'''


def config(tmp_path: Path, isolation: str = "inline", steps: int = 40) -> Path:
    (tmp_path / "live.py").write_text(LOSS.replace("FACTOR", "1.0"))
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    for old, new in (("max_steps = 450", f"max_steps = {steps}"), ("save_every = 150", "save_every = 1000"),
                     ("every = 150", "every = 1000"), ('dir = "runs/tiny_sft"', f'dir = "{tmp_path / "run"}"'),
                     ("batch_size = 64", "batch_size = 4"), ("[train]\n", '[train]\nloss_type = "live"\n')):
        text = text.replace(old, new, 1)
    head = f'[[plugins]]\npath = "{tmp_path / "live.py"}"\nisolation = "{isolation}"\nwatch = true\n\n'
    (tmp_path / "c.toml").write_text(head + text)
    return tmp_path / "c.toml"


def records(run_dir: Path) -> list[Event]:
    path = run_dir / "metrics.jsonl"
    return read(path) if path.exists() else []


def edit_at_step(run_dir: Path, step: int, edit: Callable[[], None]) -> threading.Thread:
    def wait_then_edit() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(r.step >= step for r in records(run_dir)):
            time.sleep(0.01)
        edit()
    thread = threading.Thread(target=wait_then_edit, daemon=True)
    thread.start()
    return thread


def run(cfg: Path) -> int:
    return main(["run", str(cfg), "--set", 'log.progress="none"'])


SANDBOX = pytest.param("sandbox", marks=pytest.mark.skipif(bool(tenants.plan(None)[1]),
                                                          reason="the sandbox's core layers need root"))


@pytest.mark.parametrize("isolation", ["inline", "process", SANDBOX])
def test_an_edited_loss_is_used_from_the_step_after_the_reload(tmp_path: Path, isolation: str) -> None:
    cfg = config(tmp_path, isolation)
    loss_file = tmp_path / "live.py"
    editor = edit_at_step(tmp_path / "run", 3, lambda: loss_file.write_text(LOSS.replace("FACTOR", "2.0")))
    assert run(cfg) == 0
    editor.join()
    lines = records(tmp_path / "run")
    [reload] = of_kind(lines, PluginReloadedEvent)
    assert reload.plugin == "loss:live" and reload.old_hash != reload.new_hash
    assert len(steps(lines)) == 40 and 3 <= reload.step < 40
    for r in steps(lines):
        factor = 2.0 if r.step > reload.step else 1.0
        assert r.loss == pytest.approx(factor * r.metrics["ce"], rel=1e-5), r


def test_a_broken_edit_is_rejected_and_the_run_completes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = config(tmp_path)
    loss_file = tmp_path / "live.py"
    editor = edit_at_step(tmp_path / "run", 3, lambda: loss_file.write_text(LOSS.replace("FACTOR *", "FACTOR **(")))
    assert run(cfg) == 0
    editor.join()
    lines = records(tmp_path / "run")
    [failed] = of_kind(lines, PluginReloadRejectedEvent)
    assert "SyntaxError" in failed.error and f"{loss_file}:" in failed.error
    assert not of_kind(lines, PluginReloadedEvent)
    assert all(r.loss == pytest.approx(r.metrics["ce"], rel=1e-5) for r in steps(lines))
    assert "the old code keeps running" in capsys.readouterr().out


def test_a_loss_that_fails_the_probe_is_rejected(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    loss_file = tmp_path / "live.py"
    nan = LOSS.replace("FACTOR * ce", "ce * float('nan')")
    editor = edit_at_step(tmp_path / "run", 3, lambda: loss_file.write_text(nan))
    assert run(cfg) == 0
    editor.join()
    [failed] = of_kind(records(tmp_path / "run"), PluginReloadRejectedEvent)
    assert "non-finite loss" in failed.error


def test_a_burst_of_saves_is_one_reload_and_an_atomic_rename_is_seen(tmp_path: Path) -> None:
    cfg = config(tmp_path, steps=60)
    loss_file = tmp_path / "live.py"

    def burst() -> None:
        for i in range(5):  # five saves within 50 ms
            loss_file.write_text(LOSS.replace("FACTOR", f"1.{i + 1}"))
            time.sleep(0.008)
        time.sleep(1.0)
        tmp = tmp_path / ".live.py.swp"  # how vim and many editors save: write aside, then rename over
        tmp.write_text(LOSS.replace("FACTOR", "3.0"))
        os.replace(tmp, loss_file)

    editor = edit_at_step(tmp_path / "run", 3, burst)
    assert run(cfg) == 0
    editor.join()
    lines = records(tmp_path / "run")
    reloads = of_kind(lines, PluginReloadedEvent)
    assert len(reloads) == 2, reloads
    last = steps(lines)[-1]
    assert last.loss == pytest.approx(3.0 * last.metrics["ce"], rel=1e-5)
    middle = [r for r in steps(lines) if reloads[0].step < r.step <= reloads[1].step]
    assert middle and all(r.loss == pytest.approx(1.5 * r.metrics["ce"], rel=1e-5) for r in middle)


def test_configs_live_loss_runs_watching_its_plugin(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "configs/live_loss.toml", "--set", "train.max_steps=5", "--set", "eval.every=1000",
                 "--set", f'output.dir="{tmp_path / "run"}"', "--set", 'log.progress="none"']) == 0
    assert f"watching for edits: {REPO / 'configs' / 'plugins' / 'live_loss.py'}" in capsys.readouterr().out


def test_saving_a_local_module_the_plugin_imports_reloads_the_plugin(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    helper = tmp_path / "live_factor.py"
    helper.write_text("FACTOR = 1.0\n")
    (tmp_path / "live.py").write_text(LOSS.replace("import time\n", "import time\nimport live_factor\n")
                                      .replace("FACTOR *", "live_factor.FACTOR *"))
    editor = edit_at_step(tmp_path / "run", 3, lambda: helper.write_text("FACTOR = 2.0\n"))
    assert run(cfg) == 0
    editor.join()
    lines = records(tmp_path / "run")
    [reload] = of_kind(lines, PluginReloadedEvent)
    last = steps(lines)[-1]
    assert last.step > reload.step and last.loss == pytest.approx(2.0 * last.metrics["ce"], rel=1e-5)


@pytest.mark.slow
def test_ten_edits_in_a_row_of_a_host_loss_are_swapped_in_and_the_run_completes(tmp_path: Path) -> None:
    """Edits 0.3 s apart, faster than a host starts (~1 s): the next edit's host is prepared while the last one is
    swapped in, and edits land while the old host is computing a loss (the loss sleeps half of each step). Every
    swap is recorded, no call reaches a retired host, and the last edit is what trains at the end."""
    cfg = config(tmp_path, "process", steps=400)
    loss_file = tmp_path / "live.py"

    def edits() -> None:
        for i in range(10):
            loss_file.write_text(LOSS.replace("FACTOR", f"{1.0 + (i + 1) / 10:.1f}"))
            time.sleep(0.3)

    editor = edit_at_step(tmp_path / "run", 3, edits)
    assert run(cfg) == 0
    editor.join()
    lines = records(tmp_path / "run")
    assert not [r for r in lines if isinstance(r, (PluginFailedEvent, PluginReloadRejectedEvent, HostDiedEvent))]
    assert [r.step for r in steps(lines)] == list(range(1, 401))
    reloads = of_kind(lines, PluginReloadedEvent)
    assert len(reloads) >= 3, reloads
    assert all(a.new_hash == b.old_hash for a, b in zip(reloads, reloads[1:], strict=False))  # one chain
    after = [r for r in steps(lines) if r.step > reloads[-1].step]
    assert after and all(r.loss == pytest.approx(2.0 * r.metrics["ce"], rel=1e-5) for r in after)


def test_a_save_while_the_new_host_starts_is_reloaded_after_it(tmp_path: Path) -> None:
    """The file changes between the new host importing it and the kernel reading it (an edit faster than a host
    starts; here the edited file rewrites itself when imported). The reload records the code the host runs, not
    what the kernel hashed, and the later save is reloaded next: no rejection, no host killed."""
    cfg = config(tmp_path, "process", steps=120)
    loss_file = tmp_path / "live.py"
    final = LOSS.replace("FACTOR", "3.0")
    rewrites = LOSS.replace("FACTOR", "2.0") + f"\nfrom pathlib import Path\nPath(__file__).write_text({final!r})\n"
    editor = edit_at_step(tmp_path / "run", 3, lambda: loss_file.write_text(rewrites))
    assert run(cfg) == 0
    editor.join()
    lines = records(tmp_path / "run")
    assert not [r for r in lines if isinstance(r, (PluginFailedEvent, PluginReloadRejectedEvent, HostDiedEvent))], \
        lines
    first, second = of_kind(lines, PluginReloadedEvent)
    assert first.new_hash == second.old_hash != second.new_hash
    by_step = {r.step: r for r in steps(lines)}
    between = [r for s, r in by_step.items() if first.step < s <= second.step]
    assert all(r.loss == pytest.approx(2.0 * r.metrics["ce"], rel=1e-5) for r in between), between
    assert by_step[120].loss == pytest.approx(3.0 * by_step[120].metrics["ce"], rel=1e-5)


def test_an_edit_of_the_running_stages_file_is_rejected_not_half_applied(tmp_path: Path) -> None:
    """A stage (or tuner) is built once, when the run starts: an edit of its file is a recorded rejection that
    says to --resume, and nothing in the file is swapped in."""
    from swiftk.kernel.plugins import Plugins, new_manager
    from swiftk.kernel.reload import RejectedEdit, Reloader

    stage_file = str((REPO / "configs" / "plugins" / "unlikelihood.py").resolve())
    plugins = Plugins(new_manager(), components={"stage:unlikelihood": stage_file})
    with pytest.raises(RejectedEdit, match="defines stage:unlikelihood, which this run uses.*--resume"):
        Reloader(plugins, [stage_file]).prepare_inline(stage_file, "new", 0.0)
