"""Tenants in a real training run: configs/tenants.toml (alice and bob, each reading only its own data) plus a
tenant mallory whose plugin misbehaves at some steps. The run finishes, alice's and bob's metrics are there at
every step, and metrics.jsonl holds an audit record for each host's sandbox and for everything mallory did."""

from __future__ import annotations

from pathlib import Path

import pytest

from swiftk.contracts.events import AuditEvent, Event, of_kind, read
from swiftk.contracts.events import steps as step_events
from swiftk.hosts import tenants
from swiftk.hosts.group import HostGroup, HostSpec
from swiftk.kernel.cli import main

from .conftest import sandbox_leftovers

REPO = Path(__file__).resolve().parents[2]
MALLORY = '''
import os
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_step_end(state, metrics):
    if state.step == 3:
        os.fork()                       # refused by seccomp: the call fails and is skipped
    if state.step == 5:
        while True:                     # over its CPU budget: the host is killed and restarts
            pass
    if state.step == 7:
        bytearray(10 << 30)             # over its address-space limit: MemoryError; third failure: quarantine
    return {"mallory/steps": float(state.step)}
'''


def config(tmp_path: Path, extra: str = "") -> Path:
    text = (REPO / "configs" / "tenants.toml").read_text()
    plugin = tmp_path / "mallory.py"
    plugin.write_text(MALLORY)
    mallory = (f'[tenants.mallory]\nplugins = ["{plugin}"]\ncpu_seconds_per_call = 1\ndeadline_s = 20\n'
               f'scratch = "{tmp_path / "scratch-mallory"}"\n')
    for name in ("alice", "bob"):  # own scratch folders: several test runs may share a machine
        text = text.replace(f"[tenants.{name}]\n", f'[tenants.{name}]\nscratch = "{tmp_path / name}"\n')
    text = text.replace('dir = "runs/tenants"', f'dir = "{tmp_path / "run"}"')
    path = tmp_path / "tenants.toml"
    path.write_text(mallory + extra + text)
    return path


def records(run_dir: Path) -> list[Event]:
    return read(run_dir / "metrics.jsonl")


def test_two_tenants_see_only_their_data_and_a_third_cannot_stop_the_run(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    cwd = Path.cwd()
    try:
        import os
        os.chdir(REPO)  # the config's paths are relative to the repository
        assert main(["run", str(config(tmp_path)), "--set", 'log.progress="none"']) == 0
    finally:
        os.chdir(cwd)
    lines = records(tmp_path / "run")
    steps = {r.step: r.metrics for r in step_events(lines)}
    assert sorted(steps) == list(range(1, 21))
    for step in steps.values():  # the well-behaved tenants, at every step, each seeing only its own key
        assert (step["alice/key_rows"], step["alice/sees_bob"]) == (40.0, 0.0)
        assert (step["bob/key_rows"], step["bob/sees_alice"]) == (25.0, 0.0)
    assert [s for s, r in steps.items() if "mallory/steps" in r] == [1, 2, 4, 6]  # then quarantined
    audit = of_kind(lines, AuditEvent)
    started = {r.tenant: r.layers or {} for r in audit if r.action == "sandbox_started"}
    assert set(started) == {"alice", "bob", "mallory"}
    assert all({"uid", "namespaces", "seccomp", "rlimits"} <= set(layers) for layers in started.values())
    mallory = [r for r in audit if r.tenant == "mallory" and r.action != "sandbox_started"]
    reasons = " | ".join(f"{r.step}:{r.action}:{r.reason}" for r in mallory)
    assert "PermissionError" in reasons and "CPU-seconds" in reasons and "MemoryError" in reasons, reasons
    assert any(r.action == "plugin_quarantined" for r in mallory), reasons
    assert all(r.plugin for r in mallory)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert sandbox_leftovers() == []


def test_missing_data_and_plugin_files_are_reported_before_anything_starts(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path)
    text = path.read_text().replace('data = ["data/tenants/bob/"]', 'data = ["data/tenants/nobody/"]')
    text = text.replace('plugins = ["configs/plugins/tenants/alice.py"]', 'plugins = ["configs/plugins/nope.py"]')
    text = text.replace("[tenants.bob]\n", "[tenants.bob]\nuid = 65534\n")  # nobody's
    path.write_text(text)
    cwd = Path.cwd()
    try:
        import os
        os.chdir(REPO)
        assert main(["run", str(path), "--set", 'log.progress="none"']) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "[tenants.bob] data: 'data/tenants/nobody/' does not exist" in err
    assert "plugin file 'configs/plugins/nope.py' does not exist" in err
    assert "[tenants.bob] uid = 65534 belongs to the account 'nobody'" in err
    assert not (tmp_path / "run").exists()
    assert sandbox_leftovers() == []


def test_a_required_layer_the_machine_lacks_stops_the_run_with_the_reason(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path)
    path.write_text(path.read_text().replace(
        "[sandbox]\n", '[sandbox]\nrequire = ["uid", "namespaces", "seccomp", "rlimits", "landlock"]\n'))
    probed = tenants.machine_layers()
    tenants._probed = {**probed, "landlock": "the kernel has no Landlock (simulated)"}
    try:
        assert main(["run", str(path), "--set", 'log.progress="none"']) == 2
    finally:
        tenants._probed = probed
    err = capsys.readouterr().err
    assert "cannot give tenant hosts [sandbox] require: landlock: the kernel has no Landlock (simulated)" in err
    assert "swiftk sandbox doctor" in err


def test_doctor_prints_what_each_tenant_host_got(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "doctor", str(REPO / "configs" / "tenants.toml")]) == 0
    out = capsys.readouterr().out
    for tenant in ("alice", "bob"):
        assert f"tenant '{tenant}'" in out
    assert out.count("no capabilities") == 2 and "new ipc mnt net pid uts" in out
    assert "verdict: ok" in out
    assert sandbox_leftovers() == []


def test_a_host_that_cannot_start_in_its_sandbox_is_a_problem_not_a_hang(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tenants, "SYSTEM_FILES", ())  # a root without /usr: the interpreter cannot run
    tmp_path.chmod(0o755)
    layers, _, _ = tenants.plan(None)
    tenant = tenants.Tenant("broken", 61960, str(tmp_path / "scratch"))
    group = HostGroup([HostSpec("sandbox:broken/x", [], [], 1024, tenant, tuple(layers))], {})
    try:
        problems = group.start()
    finally:
        group.close()
    assert len(problems) == 1 and "exited with code 70 (its sandbox could not be built" in problems[0], problems
    assert sandbox_leftovers() == []


def test_a_scratch_folder_that_is_not_the_tenants_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "someone-else.txt").write_text("not the tenant's")
    layers, _, _ = tenants.plan(None)
    tenant = tenants.Tenant("squatter", 61961, str(taken))
    group = HostGroup([HostSpec("sandbox:squatter/x", [], [], 1024, tenant, tuple(layers))], {})
    try:
        problems = group.start()
    finally:
        group.close()
    assert len(problems) == 1 and "holds files and belongs to uid 0, not to the tenant's uid 61961" in problems[0]
    assert taken.stat().st_uid == 0 and (taken / "someone-else.txt").exists()
