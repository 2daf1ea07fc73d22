"""Shared fixtures: offline environment, the repository root, and tiny configs written into tmp folders."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs name data by paths relative to the repository root, as the README's commands do."""
    monkeypatch.chdir(REPO)


def write_config(path: Path, text: str, **replace: str) -> Path:
    """Write a config, replacing ``key = value`` lines (``replace={"max_steps": "20"}``)."""
    for key, value in replace.items():
        text, count = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
        assert count, f"no line '{key} = ...' in the config"
    path.write_text(text)
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """configs/tiny_sft.toml, shortened to 12 steps (batch 16), writing into tmp_path/run."""
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    return write_config(
        tmp_path / "tiny.toml", text,
        max_steps="12", batch_size="16", save_every="4", every="6", dir=f'"{tmp_path / "run"}"',
    )


class ServerProcess:
    """A ``swiftk`` server command (serve, web) in a subprocess, its stdout read until a line has ``marker``:
    ``self.line`` is that line. A server that exits or stays silent past ``timeout`` fails the test with its
    stderr."""

    def __init__(self, args: list[str], marker: str, timeout: float, **popen: object) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "swiftk", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, **popen)  # type: ignore[call-overload]
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is None and time.monotonic() < deadline:
                    continue
                self.stop()
                raise AssertionError(f"swiftk {args[0]} printed no {marker!r} line (exit {self.proc.returncode}): "
                                     f"{self.proc.stderr.read()}") from None
            if marker in line:
                self.line = line
                return

    def stop(self) -> int:
        """SIGTERM, and the exit code (0: a clean stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``configs/quickstart.toml`` as shipped (SmolLM2-135M, LoRA, 2 epochs: 76 steps, ~6 minutes on a 2-core AVX2
    VM) with ``--merge``: trained once per session, read-only for the tests (the adapter in final/, the merged
    model, samples.json).
    Shorter trainings learn the answer's form, not its fact: after 20, 30 (lr 2e-3), 40 or 60 steps the adapter
    answers the held-out "largest planet" question "Answer: Neptune." (the base model's belief), not Jupiter."""
    from swiftk.kernel.cli import main

    root = tmp_path_factory.mktemp("quickstart")
    cfg = write_config(root / "quickstart.toml", (REPO / "configs" / "quickstart.toml").read_text(),
                       dir=f'"{root / "run"}"', save_every="1000")
    assert main(["run", str(cfg), "--merge"]) == 0
    return root / "run"


@pytest.fixture(scope="session")
def tiny_addition_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``configs/tiny_sft.toml`` as shipped (450 steps, ~3 min on 2 cores in float32): a full tiny model folder that
    adds two-digit numbers (about 45 % of the held-out sums right, greedy, in float32), trained once per session; the
    starting point, teacher or policy of the online-RL tests. Read-only for the tests. Trained in float32 on every
    CPU: ``precision = "auto"`` picks bf16 on one with AVX512-BF16, where the same 450 steps reach only ~25 %."""
    from swiftk.kernel.cli import main

    root = tmp_path_factory.mktemp("tiny_addition")
    cfg = write_config(root / "tiny_sft.toml", (REPO / "configs" / "tiny_sft.toml").read_text(),
                       dir=f'"{root / "run"}"', save_every="1000", every="1000", precision='"fp32"')
    assert main(["run", str(cfg)]) == 0
    return root / "run" / "final"


@pytest.fixture(scope="session")
def habit_model(tiny_addition_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``configs/tiny_habit.toml`` from ``tiny_addition_model`` (60 steps, ~10 s): it ends most answers with a stray
    digit, so its final number is usually wrong (a few % held-out accuracy); what the online-RL tests unlearn."""
    from swiftk.kernel.cli import main

    root = tmp_path_factory.mktemp("habit")
    cfg = write_config(root / "habit.toml", (REPO / "configs" / "tiny_habit.toml").read_text(),
                       model_id=f'"{tiny_addition_model}"', dir=f'"{root / "run"}"')
    assert main(["run", str(cfg)]) == 0
    return root / "run" / "final"


@pytest.fixture(scope="session")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LLaVA folder (CLIP tower, Llama, character tokenizer) and shape images: 256 to train on, 64
    held out, each asking the shape's colour (4 colours: chance is 25 %). Read-only for the tests."""
    from swiftk.kernel.synthetic import shape_rows, write_jsonl
    from swiftk.kernel.tiny import save_tiny_llava

    root = tmp_path_factory.mktemp("llava")
    save_tiny_llava(root / "model")
    write_jsonl(shape_rows(root / "data", 256, seed=0), root / "data" / "train.jsonl")
    write_jsonl(shape_rows(root / "data", 64, seed=1), root / "data" / "eval.jsonl")
    return root


# -- a hang fails its test in minutes, with the stacks of every process of the test ------------------------------
TIMEOUT_S = 300.0  # per phase (setup, call, teardown); a test may say more with @pytest.mark.timeout(seconds)
SLOW_TIMEOUT_S = 600.0  # tests marked slow


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): this test's per-phase limit (default 300 s, slow 600 s)")


def descendants() -> list[int]:
    """Every live process below this one (plugin hosts, torchrun agents and ranks, sandbox launchers...)."""
    return [child.pid for child in psutil.Process().children(recursive=True)]


def stacks_of_every_process() -> str:
    """This process's threads (faulthandler), then each descendant's Python stacks (py-spy, as root) or at least
    its command line."""
    with tempfile.TemporaryFile("w+") as own:
        faulthandler.dump_traceback(own, all_threads=True)
        own.seek(0)
        parts = [f"== this test process (pid {os.getpid()}), every thread:\n{own.read()}"]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    for pid in descendants():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        text = "(py-spy is not installed: no stack)"
        if Path(spy).is_file():
            try:
                done = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
                text = done.stdout or done.stderr
            except subprocess.TimeoutExpired:
                text = "(py-spy took too long)"
        parts.append(f"== pid {pid}: {cmdline[:300]}\n{text}")
    return "\n".join(parts)


@contextlib.contextmanager
def deadline(item: pytest.Item, phase: str) -> Iterator[None]:
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker else SLOW_TIMEOUT_S if item.get_closest_marker("slow") else TIMEOUT_S

    def expired(signum: int, frame: object) -> None:
        report = stacks_of_every_process()
        for pid in descendants():  # whatever the test waits on returns, and nothing outlives it
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{item.nodeid}: {phase} took longer than {limit:g} s (a hang?); the stacks of every process "
                    f"of the test when it was stopped:\n{report}", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with deadline(item, "setup"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with deadline(item, "the test"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    with deadline(item, "teardown"):
        yield
