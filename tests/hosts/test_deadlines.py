"""No socket operation waits forever: a host that dies between two calls, or while a request is being sent, is a
``HostDeadError`` within a deadline, never a hang (a PAIR socket whose peer is gone blocks a plain send)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from swiftk.contracts.errors import HostDeadError
from swiftk.contracts.events import PluginFailedEvent, StepEvent
from swiftk.hosts.group import HostGroup, HostSettings, HostSpec, Policy

from .helpers import assert_clean, events, host_config, run

# Answers, then leaves 50 ms later while the kernel is idle (the kernel's next send finds no peer).
LEAVES_WHEN_IDLE = '''
import os, threading
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_step_end(state, metrics):
    if metrics.get("leave"):
        threading.Timer(0.05, os._exit, args=(3,)).start()
    return {"pid": float(os.getpid())}
'''

SETTINGS = {"restart_backoff_s": 0.0, "heartbeat_interval_s": 0.1}
BOUND_S = 3.0  # a dead host is noticed within a few heartbeat intervals, far below this


def start(tmp_path: Path, code: str, deadline_s: float = 10.0) -> HostGroup:
    (tmp_path / "plugin.py").write_text(code)
    hosts = HostGroup([HostSpec("process:plugin", [str(tmp_path / "plugin.py")], ["plugin"])],
                      {"plugin": Policy("fail", deadline_s=deadline_s, max_failures=10_000)}, HostSettings(**SETTINGS))
    hosts.sink = lambda event, fields: None
    assert hosts.start() == []
    return hosts


def call(hosts: HostGroup, leave: bool = False) -> dict[str, float]:
    (_, proxy), = hosts.module_proxies
    result: dict[str, float] = proxy.swiftk_step_end(state=None, metrics={"leave": float(leave)})
    return result


def test_a_host_that_exits_while_idle_fails_the_next_call_and_then_restarts(tmp_path: Path) -> None:
    hosts = start(tmp_path, LEAVES_WHEN_IDLE)
    try:
        pids = set()
        for _ in range(6):
            pid = call(hosts, leave=True)["pid"]  # answers, then exits 50 ms later
            pids.add(pid)
            time.sleep(0.3)  # the host is gone before the next call is sent
            started = time.monotonic()
            with pytest.raises(HostDeadError, match=r"exited with code 3"):
                call(hosts)
            assert time.monotonic() - started < BOUND_S
        assert call(hosts)["pid"] not in pids  # the next call restarts it
        assert len(pids) == 6
    finally:
        hosts.close()
    assert_clean()


def test_a_host_killed_at_any_moment_never_hangs_a_call(tmp_path: Path) -> None:
    """SIGKILL at a random moment while calls go back to back: between two calls, while a request is queued, while
    the host computes or replies. Every call answers or fails with HostDeadError within the bound."""
    hosts = start(tmp_path, LEAVES_WHEN_IDLE)
    rng = random.Random(1234)
    outcomes = {"answered": 0, "dead": 0}
    try:
        for _ in range(12):
            host = hosts.hosts[0]
            if host.proc is None:
                call(hosts)  # restart it (a dead host restarts on the next call)
            pid = host.pid
            assert pid is not None
            killer = threading.Timer(rng.uniform(0.0, 0.02), os.kill, args=(pid, signal.SIGKILL))
            killer.start()
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                started = time.monotonic()
                try:
                    call(hosts)
                    outcomes["answered"] += 1
                except HostDeadError:
                    outcomes["dead"] += 1
                    assert time.monotonic() - started < BOUND_S
                    break
                assert time.monotonic() - started < BOUND_S
            killer.join()
    finally:
        hosts.close()
    assert outcomes["dead"] == 12, outcomes
    assert_clean()


def test_a_host_that_stops_reading_does_not_block_the_segment_channel(tmp_path: Path) -> None:
    """A host alive but stuck (never reading its segment channel or calls) costs a call its deadline, no more."""
    hosts = start(tmp_path, LEAVES_WHEN_IDLE, deadline_s=1.0)
    try:
        host = hosts.hosts[0]
        call(hosts)
        assert host.pid is not None
        os.kill(host.pid, signal.SIGSTOP)  # alive, answers nothing, sends no heartbeat
        started = time.monotonic()
        with pytest.raises(HostDeadError, match=r"did not answer within 1 s"):
            call(hosts)
        assert time.monotonic() - started < 1.0 + BOUND_S
        assert call(hosts)["pid"] > 0  # restarted
    finally:
        hosts.close()
    assert_clean()


IDLE_EXIT_PLUGIN = '''
import os, threading
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_step_end(state, metrics):
    if state.step == 4:  # answer, then leave while the kernel trains step 5
        threading.Timer(0.05, os._exit, args=(3,)).start()
    return {"alive": 1.0}
'''


SLOW_LOSS = '''
import time
import torch.nn.functional as F
from swiftk.contracts import LossResult, hookimpl, register_loss, supervised

@register_loss("slow_ce")
class SlowCE:
    @hookimpl
    def swiftk_loss_compute(self, batch, outputs):
        time.sleep(0.25)  # every step outlasts the host's 50 ms timer, on a GPU too
        logits, labels = supervised(batch, outputs)
        return LossResult(F.cross_entropy(logits.float(), labels, reduction="sum") / batch.num_items_in_batch)
'''


def test_a_run_whose_host_exits_between_steps_goes_on(tmp_path: Path) -> None:
    """The single-process form of the shared-host hang: the host answers step 4's step_end and exits 50 ms later,
    while step 5 computes its (slow, in-process) loss; step 5's call fails (policy skip) instead of blocking in a
    send for ever, and step 6 restarts the host."""
    (tmp_path / "leaves.py").write_text(IDLE_EXIT_PLUGIN)
    (tmp_path / "slow_loss.py").write_text(SLOW_LOSS)
    cfg = host_config(tmp_path, str(tmp_path / "leaves.py"), loss="slow_ce", steps=8, save_every=100,
                      table='on_failure = "skip"\nmax_failures = 5')
    cfg.write_text(f'[[plugins]]\npath = "{tmp_path / "slow_loss.py"}"\n\n' + cfg.read_text())
    started = time.monotonic()
    assert run(cfg) == 0
    assert time.monotonic() - started < 120
    records = events(tmp_path / "run", StepEvent)
    alive = [r.step for r in records if "alive" in r.metrics]
    assert [r.step for r in records] == list(range(1, 9))
    assert alive == [1, 2, 3, 4, 6, 7, 8], alive
    [failed] = events(tmp_path / "run", PluginFailedEvent)
    assert failed.step == 5 and "exited with code 3" in failed.error, failed
    assert_clean()
