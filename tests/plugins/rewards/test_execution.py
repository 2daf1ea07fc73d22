"""Without the sandbox's core layers, the code reward refuses to start (saying why) unless told
``allow_unsandboxed``: then rlimits, seccomp and Landlock still apply, with a warning."""

from __future__ import annotations

import logging

import pytest

from swiftk.hosts import tenants
from swiftk.plugins.rewards import execution
from swiftk.plugins.rewards.code import Code

NO_NAMESPACES = "namespaces: unshare: Operation not permitted (a test's pretend machine)"


@pytest.fixture
def no_namespaces(monkeypatch: pytest.MonkeyPatch) -> None:
    layers, _, _ = tenants.plan(None)

    def plan(require: list[str] | None) -> tuple[list[str], list[str], list[str]]:
        return [layer for layer in layers if layer not in ("namespaces", "uid")], [NO_NAMESPACES], []

    monkeypatch.setattr(execution, "plan", plan)


@pytest.mark.usefixtures("no_namespaces")
def test_refuses_without_the_sandbox() -> None:
    with pytest.raises(tenants.SandboxUnavailable, match="namespaces: unshare"):
        Code()


@pytest.mark.usefixtures("no_namespaces")
def test_unsandboxed_when_allowed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        reward = Code(timeout_s=3.0, allow_unsandboxed=True)
    try:
        assert "WITHOUT A SANDBOX" in caplog.text and "namespaces" not in reward.executor.layers
        result = reward.swiftk_reward_compute(
            prompts=["def f():\n", "def f():\n", "def f():\n"],
            completions=["    return 1\n", "    return 2\n", "    x = bytearray(4 << 30)\n"],
            references=["assert f() == 1"] * 3)
        assert result == {"code": [1.0, 0.0, 0.0]}
    finally:
        reward.close()
