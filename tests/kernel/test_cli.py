"""The ``swiftk`` command table: help without importing torch, and commands that installed packages add."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from swiftk.kernel.cli import COMMANDS

SWIFTK = [sys.executable, "-X", "importtime", "-m", "swiftk"]


def swiftk(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run([*SWIFTK, *args], capture_output=True, text=True, timeout=60, env=env)
    return done, time.perf_counter() - started


def imported(importtime: str) -> set[str]:
    """Module names from ``-X importtime`` lines: ``import time: self | cumulative | name``."""
    return {line.rsplit("|", 1)[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


def test_help_lists_every_command_at_once_without_torch() -> None:
    done, seconds = swiftk("--help")
    assert done.returncode == 0, done.stderr
    assert seconds < 2.0  # ~0.1 s on 2 shared cores; importing torch alone takes ~1 s
    assert not {"torch", "transformers"} & imported(done.stderr)
    assert all(f"    {name} " in done.stdout for name in COMMANDS), done.stdout
    assert not [name for name in imported(done.stderr) if name.startswith("swiftk.kernel.cli.")]


def test_each_commands_help_imports_only_that_command() -> None:
    for name in COMMANDS:
        done, seconds = swiftk(name, "--help")
        assert done.returncode == 0 and f"usage: swiftk {name}" in done.stdout, done.stdout + done.stderr
        modules = imported(done.stderr)
        assert "torch" not in modules and seconds < 2.0, (name, seconds)
        assert {m for m in modules if m.startswith("swiftk.kernel.cli.")} <= {f"swiftk.kernel.cli.{name}",
                                                                               "swiftk.kernel.cli.run",
                                                                               "swiftk.kernel.cli.plugin"}


GREET = '''"""Say hello (a command an installed package adds)."""

def add_arguments(parser):
    parser.add_argument("--who", default="world", help="whom to greet")

def main(args):
    print(f"hello {args.who}")
    return 3
'''


def test_an_installed_package_adds_a_command_through_its_entry_point(tmp_path: Path) -> None:
    (tmp_path / "greet_command.py").write_text(GREET)
    info = tmp_path / "swiftk_greet-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: swiftk-greet\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[swiftk.commands]\ngreet = greet_command\nrun = greet_command\n"
                                           "broken = no_such_module_here\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    listing, _ = swiftk("--help", env=env)
    assert "greet     (from swiftk-greet 0.1; see swiftk greet --help)" in listing.stdout, listing.stdout
    assert not [m for m in imported(listing.stderr) if m.startswith("greet_command")]
    greeted, _ = swiftk("greet", "--who", "tests", env=env)
    assert (greeted.returncode, greeted.stdout) == (3, "hello tests\n"), greeted.stderr
    assert "whom to greet" in swiftk("greet", "--help", env=env)[0].stdout
    assert "train from a config file" in listing.stdout  # a built-in's name is not taken
    assert "usage: swiftk run [-h] [--set KEY=VALUE]" in swiftk("run", "--help", env=env)[0].stdout
    broken, _ = swiftk("broken", env=env)
    assert broken.returncode == 1 and "command 'broken' (no_such_module_here) failed to load" in broken.stderr
