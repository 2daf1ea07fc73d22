"""``swiftk eval --backend evalscope``: EvalScope asks an OpenAI-compatible endpoint, swiftk's rewards score.

    RUN|MODEL -> `swiftk serve` started here (a free local port, its own process), stopped afterwards
    URL       -> that endpoint, as it is
    each task -> evalscope.run_evalscope (its managed environment): generate tasks as general_qa, multiple
                 choice as general_mcq (the model answers with a letter)
              -> a generate task's answers scored by its reward plugin, exactly as on the lm-eval path
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from swiftk.kernel.errors import SwiftkError
from swiftk.kernel.evals.results import ItemRecord, TaskResult, standard_error
from swiftk.kernel.evals.runner import Resolved, TaskError, own_tasks

READY = re.compile(r"ready at (http://\S+/v1)")
LETTERS = "ABCDEFGHIJ"


class ServeError(SwiftkError):
    """`swiftk serve`, started to be evaluated, did not come up."""


def run_on_endpoint(url: str, model: str, api_key: str | None, tasks: list[Resolved], limit: int | None,
                    say: Callable[[str], None]) -> tuple[list[TaskResult], dict[str, list[ItemRecord]]]:
    """Every task through EvalScope against ``url``; the figures and each task's items."""
    from swiftk.kernel.evals.evalscope import run_evalscope
    from swiftk.kernel.evals.lmeval import RewardScore

    native = [t.name for t in tasks if t.task is None]
    if native:
        raise TaskError(f"--backend evalscope runs swiftk's tasks ({', '.join(own_tasks())}, .jsonl files), not "
                        f"lm-eval's own {', '.join(native)}; use --backend lm-eval for those")
    results, samples = [], {}
    work = Path(tempfile.mkdtemp(prefix="swiftk-evalscope-"))
    for r in tasks:
        task = r.task
        assert task is not None
        items = task.items()[:limit] if limit else task.items()
        say(f"eval: {task.name} (evalscope) ...")
        kind = "mcq" if task.kind == "multiple_choice" else "qa"
        rows = [mcq_row(item) for item in items] if kind == "mcq" else \
            [{"query": item["prompt"], "response": item["target"]} for item in items]
        result, records = run_evalscope(task.name, kind, rows, base_url=url, model=model, api_key=api_key,
                                        max_new_tokens=task.max_new_tokens if kind == "qa" else 8,
                                        work_dir=work / task.name, endpoint="chat" if task.chat else "completions")
        if kind == "qa":  # the task's own reward decides, as on the lm-eval path
            score = RewardScore(task)
            try:
                records = [replace(rec, score=score(item["prompt"], rec.output, item["target"]))
                           for rec, item in zip(records, items, strict=True)]
            finally:
                score.close()
            value = sum(rec.score for rec in records) / len(records)
            result = replace(result, metric=task.metric, value=value,
                             stderr=standard_error([rec.score for rec in records]),
                             metrics={**result.metrics, task.metric: value})
        results.append(result)
        samples[task.name] = records
        say(f"eval: {task.name} {result.metric} {result.value:.4f} (n={result.n}, {result.seconds:.1f} s)")
    return results, samples


def mcq_row(item: dict[str, Any]) -> dict[str, str]:
    """A multiple-choice item in general_mcq's layout: the question without lm-eval's trailing "Answer:"."""
    question = re.sub(r"\s*Answer:\s*$", "", item["prompt"]).removeprefix("Question: ")
    options = {LETTERS[i]: c.strip() for i, c in enumerate(item["choices"])}
    return {"question": question, **options, "answer": LETTERS[item["gold"]]}


def serve_and_run(target: Any, tasks: list[Resolved], args: Any, say: Callable[[str], None]
                  ) -> tuple[list[TaskResult], dict[str, list[ItemRecord]], str]:
    """The tasks through EvalScope against `swiftk serve` of ``target`` (started and stopped here)."""
    engine = target.generation_with(args.engine).engine
    command = [sys.executable, "-m", "swiftk", "serve", target.spec, "--port", "0", "--engine", engine]
    if args.gguf_file:
        command += ["--gguf-file", args.gguf_file]
    if args.merged:
        command.append("--merged")
    with served(command, target.generation.start_timeout_s) as url:
        say(f"swiftk eval: {target.describe()} served at {url} ({engine} engine) for EvalScope")
        results, samples = run_on_endpoint(url, args.model_name or target.name, None, tasks, args.limit, say)
    return results, samples, engine


@contextmanager
def served(command: list[str], timeout_s: float) -> Iterator[str]:
    """Start `swiftk serve` (its own process group), yield its URL once it says it is ready, stop it after."""
    log = Path(tempfile.mkstemp(prefix="swiftk-serve-", suffix=".log")[1])
    env = {**os.environ, "SWIFTK_API_KEY": ""}
    with log.open("w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                env=env, start_new_session=True)
        try:
            yield wait_ready(proc, log, timeout_s)
        finally:
            stop(proc)


def wait_ready(proc: subprocess.Popen[str], log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ServeError(f"`swiftk serve` exited ({proc.returncode}) before it was ready:\n    {tail}")
        found = READY.search(line)
        if found:  # keep reading what it prints, so that a full pipe never blocks it
            threading.Thread(target=proc.stdout.read, daemon=True, name="swiftk-serve-stdout").start()
            return found.group(1)
    raise ServeError(f"`swiftk serve` was not ready within {timeout_s:g} s; see {log}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
