"""The attack suite needs the sandbox's core layers: root on Linux with pyseccomp (CI here runs as root).
Elsewhere every test here is skipped, naming the missing layers."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from swiftk.hosts import tenants


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    mine = [item for item in items if Path(str(item.fspath)).is_relative_to(here)]
    if not mine:
        return
    _, missing, _ = tenants.plan(None)
    if missing:
        skip = pytest.mark.skip(reason="this machine cannot sandbox tenants' hosts: " + "; ".join(missing))
        for item in mine:
            item.add_marker(skip)


def sandbox_leftovers(settle_s: float = 2.0) -> list[str]:
    """Sandbox launchers or hosts still alive, sandbox folders and cgroups still present (after ``settle_s`` for
    killed processes to finish exiting)."""
    end = time.monotonic() + settle_s
    while True:
        found = leftovers()
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.05)


def leftovers() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"swiftk.hosts" in cmdline and f"swiftk-sbx-{os.getpid()}-".encode() in cmdline:
                found.append(f"process {entry.name}")
    found += [str(p) for p in Path(tempfile.gettempdir()).glob(f"swiftk-sbx-{os.getpid()}-*")]
    for controller in ("memory", "pids", "cpu", "cpuacct"):
        parent = tenants.own_cgroup(controller)
        if parent is not None:
            found += [str(p) for p in parent.glob(f"swiftk-{os.getpid()}-*")]
    return found
