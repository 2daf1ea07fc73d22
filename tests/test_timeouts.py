"""The suite's own guard: a test that hangs fails after its limit with the stacks of every process it started, and
the run goes on (tests/conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HANGS = '''
import os, subprocess, sys
import pytest

CHILD = "import time\\ndef waiting_forever_in_a_child():\\n    time.sleep(1000)\\nwaiting_forever_in_a_child()\\n"

@pytest.mark.timeout(3)
def test_hangs():
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    with open(os.environ["CHILD_PID_FILE"], "w") as f:
        f.write(str(child.pid))
    child.wait()

def test_after_it():
    pass
'''


def test_a_hanging_test_fails_with_every_process_stack_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_hangs.py").write_text(HANGS)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CHILD_PID_FILE": str(tmp_path / "child.pid")})
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "the test took longer than 3 s (a hang?)" in out, out
    assert "waiting_forever_in_a_child" in out, out  # the child's Python stack, read from outside
    assert re.search(r'test_hangs.py", line \d+ in test_hangs', out), out  # the test process's own stack
    assert time.monotonic() - started < 60
    pid = int((tmp_path / "child.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
