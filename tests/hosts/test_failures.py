"""Deliberately bad plugins in a host: each costs at most its calls, per its policy, never the run's
checkpoints, and leaves no process or shared segment behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from swiftk.contracts.events import HostDiedEvent, HostRestartedEvent, PluginFailedEvent, PluginQuarantinedEvent
from swiftk.kernel import checkpoint

from .helpers import assert_clean, bad_plugin, events, host_config, run, steps


def test_raises_at_step_3_with_skip_the_run_goes_on(tmp_path: Path) -> None:
    config = host_config(tmp_path, str(bad_plugin(tmp_path, "raise RuntimeError('boom at step 3')")),
                         table='on_failure = "skip"')
    assert run(config) == 0
    failed = events(tmp_path / "run", PluginFailedEvent)
    assert [(e.step, e.kind) for e in failed] == [(2, "error")]
    assert "RuntimeError" in failed[0].error and "boom at step 3" in failed[0].error
    assert sorted(steps(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert steps(tmp_path / "run")[3] == 0.0  # the skipped step contributed no loss and no gradient
    assert_clean()


def test_raises_at_step_3_with_fail_stops_and_keeps_a_resumable_checkpoint(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    config = host_config(tmp_path, str(bad_plugin(tmp_path, "raise RuntimeError('boom at step 3')")))
    assert run(config) != 0
    assert "plugin 'loss:bad' (hook swiftk_loss_compute) raised RuntimeError" in capsys.readouterr().err
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step-000002"
    assert_clean()
    fixed = host_config(tmp_path, str(bad_plugin(tmp_path, "pass")))
    assert run(fixed, "--resume") == 0
    assert sorted(steps(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert_clean()


@pytest.mark.parametrize("action, reason", [("os._exit(1)", "exited with code 1"),
                                            ("os.kill(os.getpid(), signal.SIGSEGV)", "killed by SIGSEGV")])
def test_host_death_with_retry_restarts_the_host(tmp_path: Path, action: str, reason: str) -> None:
    once = f"if not os.path.exists(__file__ + '.died'):\n    open(__file__ + '.died', 'w').close()\n    {action}"
    config = host_config(tmp_path, str(bad_plugin(tmp_path, once)), table='on_failure = "retry"')
    assert run(config, "--set", "hosts.restart_backoff_s=0.1") == 0
    dead = events(tmp_path / "run", HostDiedEvent)
    assert len(dead) == 1 and reason in dead[0].reason and dead[0].step == 2
    restarts = events(tmp_path / "run", HostRestartedEvent)
    assert len(restarts) == 1 and restarts[0].pid != dead[0].pid
    assert sorted(steps(tmp_path / "run")) == [1, 2, 3, 4, 5] and steps(tmp_path / "run")[3] > 0
    assert_clean()


def test_sleeping_past_the_deadline_kills_the_host_and_skips(tmp_path: Path) -> None:
    config = host_config(tmp_path, str(bad_plugin(tmp_path, "time.sleep(60)")),
                         table='on_failure = "skip"\ndeadline_s = 1.5')
    assert run(config, "--set", "hosts.restart_backoff_s=0.1") == 0
    failed = events(tmp_path / "run", PluginFailedEvent)
    assert len(failed) == 1 and "did not answer within 1.5 s" in failed[0].error
    assert len(events(tmp_path / "run", HostRestartedEvent)) == 1
    assert sorted(steps(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert_clean()


@pytest.mark.parametrize("action, message", [
    ("return LossResult(torch.ones(4, requires_grad=True))", "expected a 0-dim loss"),
    ("return LossResult(outputs.logits.float().sum() * float('nan'))", "non-finite loss"),
    ("return {'loss': 1.0}", "expected a LossResult"),
    ("return LossResult(torch.tensor(1.0))", "does not require grad"),
])
def test_a_loss_that_breaks_its_contract_is_a_plugin_error(tmp_path: Path, action: str, message: str) -> None:
    config = host_config(tmp_path, str(bad_plugin(tmp_path, action)), table='on_failure = "skip"')
    assert run(config) == 0
    failed = events(tmp_path / "run", PluginFailedEvent)
    assert len(failed) == 1 and message in failed[0].error and failed[0].kind == "error"
    assert events(tmp_path / "run", HostDiedEvent) == []  # the host lived on
    assert_clean()


def test_repeated_failures_quarantine_the_plugin(tmp_path: Path) -> None:
    plugin = bad_plugin(tmp_path, "raise ValueError('always')")
    config = host_config(tmp_path, str(plugin), steps=6, table='on_failure = { fallback = 0.5 }\nmax_failures = 2')
    assert run(config, "--set", "train.loss_config={ at_step = [2, 3, 4, 5, 6] }") == 0
    assert len(events(tmp_path / "run", PluginFailedEvent)) == 2  # steps 2 and 3; then no more calls
    quarantined = events(tmp_path / "run", PluginQuarantinedEvent)
    assert len(quarantined) == 1 and quarantined[0].step == 2
    losses = steps(tmp_path / "run")
    assert losses[1] > 1 and all(losses[s] == 0.5 for s in (2, 3, 4, 5, 6))
    assert_clean()


def test_unbounded_allocation_hits_the_memory_limit_and_the_host_lives(tmp_path: Path) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))"
    config = host_config(tmp_path, str(bad_plugin(tmp_path, hog)), table='on_failure = "skip"\nmemory_mb = 2048')
    assert run(config) == 0
    failed = events(tmp_path / "run", PluginFailedEvent)
    assert len(failed) == 1 and "MemoryError" in failed[0].error
    assert sorted(steps(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert_clean()


def test_a_malformed_message_from_the_host_kills_it(tmp_path: Path) -> None:
    forge = """
    import gc, socket
    sock = next(o for o in gc.get_objects() if isinstance(o, socket.socket) and o.type == socket.SOCK_SEQPACKET)
    sock.send(b"\\x00\\x93garbage")  # one whole frame (the lead byte of a last packet) that is not a message
    time.sleep(60)
    """
    config = host_config(tmp_path, str(bad_plugin(tmp_path, forge)), table='on_failure = "skip"')
    assert run(config, "--set", "hosts.restart_backoff_s=0.1") == 0
    dead = events(tmp_path / "run", HostDiedEvent)
    assert len(dead) == 1 and "malformed message" in dead[0].reason
    assert sorted(steps(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert_clean()


def test_a_result_pointing_into_the_kernels_input_segment_kills_the_host(tmp_path: Path) -> None:
    forge = """
    import swiftk.hosts.host as h
    from swiftk.hosts import messages as m
    from swiftk.shm import TensorRef
    h.Server.reply = lambda self, call_id, result, grads: m.CallReply(
        call_id, {"loss": TensorRef(0, 0, "float32", ())}, [None])  # the kernel's own input bytes
    raise RuntimeError("from now on every reply is forged")
    """
    config = host_config(tmp_path, str(bad_plugin(tmp_path, forge)), table='on_failure = "skip"')
    assert run(config, "--set", "hosts.restart_backoff_s=0.1") == 0
    dead = events(tmp_path / "run", HostDiedEvent)
    assert len(dead) == 1 and "malformed result" in dead[0].reason and "input segment" in dead[0].reason
    assert sorted(steps(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert_clean()


def test_a_host_that_ignores_shutdown_at_the_end_of_a_run_is_killed(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    stubborn = """
    import swiftk.hosts.host as h
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    h.shutdown = lambda reason: None
    """
    config = host_config(tmp_path, str(bad_plugin(tmp_path, stubborn)))
    assert run(config, "--set", "hosts.shutdown_timeout_s=0.3") == 0
    err = capsys.readouterr().err
    assert "host_shutdown" in err and "escalation=SIGKILL" in err
    assert_clean()
