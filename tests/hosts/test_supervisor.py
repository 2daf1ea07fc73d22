"""The supervisor on its own: handshake checks, shutdown escalation, hosts dying with their kernel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swiftk.contracts.conformance import tiny_batch, tiny_state
from swiftk.contracts.errors import PluginError
from swiftk.hosts import supervisor
from swiftk.hosts.group import HostGroup, HostSettings, HostSpec, Policy

from .helpers import REPO, assert_clean

STUBBORN = '''
import signal
import swiftk.hosts.host as host
from swiftk.contracts import hookimpl

signal.signal(signal.SIGTERM, signal.SIG_IGN)
host.shutdown = lambda reason: None  # ignores the polite request too

@hookimpl
def swiftk_batch_start(batch):
    pass
'''


def group(tmp_path: Path, code: str, **settings: float) -> tuple[HostGroup, list[tuple[str, dict]]]:
    (tmp_path / "plugin.py").write_text(code)
    seen: list[tuple[str, dict]] = []
    hosts = HostGroup([HostSpec("process:plugin", [str(tmp_path / "plugin.py")], ["plugin"])],
                      {"plugin": Policy()}, HostSettings(**settings))
    hosts.sink = lambda event, fields: seen.append((event, fields))
    return hosts, seen


def test_shutdown_escalates_to_sigkill_for_a_host_that_ignores_it(tmp_path: Path) -> None:
    hosts, seen = group(tmp_path, STUBBORN, shutdown_timeout_s=0.5)
    assert hosts.start() == []
    (_, proxy), = hosts.module_proxies
    proxy.swiftk_batch_start(tiny_batch())  # the host works
    started = time.monotonic()
    hosts.close()
    assert [f["escalation"] for e, f in seen if e == "host_shutdown"] == ["SIGTERM", "SIGKILL"]
    assert time.monotonic() - started < 5
    assert_clean()


def test_a_contract_version_mismatch_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "CONTRACT_VERSION", "9.0.0")
    hosts, _ = group(tmp_path, "x = 1\n")
    problems = hosts.start()
    hosts.close()
    assert len(problems) == 1 and "implements contract 0." in problems[0] and "this kernel 9.0.0" in problems[0]
    assert_clean()


def test_a_plugin_that_fails_to_import_is_reported_with_its_error(tmp_path: Path) -> None:
    hosts, _ = group(tmp_path, "import not_a_module_anywhere\n")
    problems = hosts.start()
    hosts.close()
    assert len(problems) == 1 and "failed to load in its host" in problems[0] and "not_a_module_anywhere" in problems[0]
    assert_clean()


def test_a_hung_host_is_caught_by_its_missing_heartbeats(tmp_path: Path) -> None:
    # A C call that holds the GIL (PyDLL does not release it): the host is alive but its heartbeats stop.
    code = ("import ctypes\nfrom swiftk.contracts import hookimpl\n\n@hookimpl\ndef swiftk_run_start(state):\n"
            "    ctypes.PyDLL(None).sleep(60)\n")
    hosts, seen = group(tmp_path, code, heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0)
    assert hosts.start() == []
    (_, proxy), = hosts.module_proxies
    started = time.monotonic()
    with pytest.raises(Exception, match="missed heartbeats"):
        proxy.swiftk_run_start(tiny_state(tmp_path))
    assert time.monotonic() - started < 10  # well before the 30 s deadline
    hosts.close()
    assert_clean()


KERNEL = '''
import sys, time
from swiftk.hosts.group import HostGroup, HostSpec, Policy
hosts = HostGroup([HostSpec("process:p", [sys.argv[1]], ["p"])], {"p": Policy()})
assert hosts.start() == []
print(hosts.hosts[0].pid, flush=True)
time.sleep(120)
'''


def test_hosts_die_with_their_kernel_even_on_kill_9(tmp_path: Path) -> None:
    (tmp_path / "plugin.py").write_text("from swiftk.contracts import hookimpl\n")
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, str(tmp_path / "plugin.py")], stdout=subprocess.PIPE,
                              cwd=REPO, text=True)
    host_pid = int(kernel.stdout.readline())
    os.kill(host_pid, 0)  # alive
    kernel.send_signal(signal.SIGKILL)
    kernel.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{host_pid}").exists():
        status = Path(f"/proc/{host_pid}/status").read_text() if Path(f"/proc/{host_pid}").exists() else ""
        if "State:\tZ" in status:
            break  # dead, waiting for init to reap it
        time.sleep(0.05)
    status = Path(f"/proc/{host_pid}/status").read_text() if Path(f"/proc/{host_pid}").exists() else ""
    assert status == "" or "State:\tZ" in status, "the host outlived its kernel"
    assert not list(Path("/dev/shm").glob("*swiftk*"))


def test_a_plugin_file_that_changed_during_the_handshake_is_refused(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "file_hash", lambda source: "0123456789ab")  # what the kernel read earlier
    hosts, _ = group(tmp_path, "x = 1\n")
    problems = hosts.start()
    hosts.close()
    assert len(problems) == 1 and "file on disk hashes to 0123456789ab" in problems[0]
    assert_clean()


REWARD = '''
from swiftk.contracts import hookimpl, register_reward

@register_reward("length")
class Length:
    def __init__(self, target: int = 4) -> None:
        self.target = target

    @hookimpl
    def swiftk_reward_compute(self, completions):
        return {"length": [-abs(len(c) - self.target) / 10 for c in completions]}
'''


def test_a_reward_and_a_second_plugin_share_one_host_by_group(tmp_path: Path) -> None:
    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "plugin.py").write_text("from swiftk.contracts import hookimpl\n\n@hookimpl\ndef swiftk_step_end"
                                        "(state, metrics):\n    return {'seen': metrics['loss'] * 2}\n")
    hosts = HostGroup([HostSpec("process:shared", [str(tmp_path / "reward.py"), str(tmp_path / "plugin.py")],
                                ["reward", "plugin"])], {"reward": Policy(), "plugin": Policy()})
    assert hosts.start() == [] and len(hosts.hosts) == 1
    assert hosts.build("reward", "length", {"target": 3}) == []
    reward = hosts.proxies[("reward", "length")]
    (_, plugin), = hosts.module_proxies
    assert reward.swiftk_reward_compute(["abc", "a", "abcdef"]) == {"length": [0.0, -0.2, -0.3]}
    assert plugin.swiftk_step_end(tiny_state(tmp_path), {"loss": 1.5}) == {"seen": 3.0}
    assert reward.host is plugin.host
    hosts.close()
    assert_clean()


ALLOCATES = '''
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_step_end(state, metrics):
    return {"mib": float(len(bytearray(int(metrics["mib"]) << 20)) >> 20)}
'''


def test_memory_mb_counts_what_the_plugin_maps_not_the_host_itself(tmp_path: Path) -> None:
    """512 MiB is less than torch alone maps (gigabytes with a CUDA build): the limit applies beyond what the host
    mapped before it started serving (its own threads' stacks and arenas come out of it), so the host starts and
    its plugin gets 200 MiB, not 1 GiB."""
    (tmp_path / "plugin.py").write_text(ALLOCATES)
    hosts = HostGroup([HostSpec("process:plugin", [str(tmp_path / "plugin.py")], ["plugin"], memory_mb=512)],
                      {"plugin": Policy()}, HostSettings())
    hosts.sink = lambda event, fields: None
    try:
        assert hosts.start() == []
        (_, proxy), = hosts.module_proxies
        assert proxy.swiftk_step_end(state=None, metrics={"mib": 200.0}) == {"mib": 200.0}
        with pytest.raises(PluginError, match="MemoryError"):
            proxy.swiftk_step_end(state=None, metrics={"mib": 1024.0})
        assert proxy.swiftk_step_end(state=None, metrics={"mib": 1.0}) == {"mib": 1.0}  # the host lives on
    finally:
        hosts.close()
    assert_clean()
