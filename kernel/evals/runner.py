"""``swiftk eval``'s work: which tasks, on what, with which backend, into which report.

    --tasks a,b  -> resolve(): a built-in or registered task (plugins/evals), a .jsonl file, or an lm-eval task
                    by name (its data must be on this machine); anything else: an error with close matches
    RUN|MODEL    -> loaded once (served.py, as `swiftk infer` loads it) -> SwiftkLM over the model + generator
    each task    -> lmeval.run_task (or evalscope.run_evalscope against an endpoint) -> TaskResult + items
    -> EvalReport -> OUT/results.json, OUT/samples/<task>.jsonl, the table on the terminal

During training the kernel calls :func:`evaluate_live` on the live model and the run's generator.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from swiftk.contracts.evals import EvalTask
from swiftk.contracts.registry import lookup, registered
from swiftk.kernel.errors import SwiftkError
from swiftk.kernel.evals.results import EvalReport, ItemRecord, TaskResult


class TaskError(SwiftkError):
    """A task name that names nothing (raised before any model loads), bad task options, or an lm-eval task whose
    data is not on this machine (raised when the task loads)."""

    exit_code = 2


@dataclass(frozen=True)
class Resolved:
    """A task to run: ours (``task``) or lm-eval's own (``lm_eval_name``)."""

    name: str
    task: EvalTask | None = None
    lm_eval_name: str | None = None
    include_path: str | None = None  # where lm_eval_name's YAML was found, besides lm-eval's own


def resolve(specs: list[str], include_path: str | None = None) -> list[Resolved]:
    """Each of ``specs`` as a task; a :class:`TaskError` naming every unknown one with its close matches."""
    import swiftk.plugins  # noqa: F401  (the built-in tasks and rewards)

    ours = {s.name for s in registered("eval_task")}  # jsonl among them: it is named by its file
    resolved, unknown = [], []
    lm_eval_tasks: list[str] | None = None
    for spec in specs:
        name, options = split_options(spec)
        if name in ours and name != "jsonl":
            resolved.append(Resolved(name, task=build(name, options)))
        elif spec.endswith(".jsonl"):
            if not Path(spec).expanduser().is_file():
                raise TaskError(f"--tasks {spec}: no such file (a .jsonl task is a file of prompt/answer rows)")
            task = lookup("eval_task", "jsonl").target(file=spec)
            resolved.append(Resolved(task.name, task=task))
        else:
            lm_eval_tasks = lm_eval_tasks if lm_eval_tasks is not None else lm_eval_names(include_path)
            if spec in lm_eval_tasks:
                resolved.append(Resolved(spec, lm_eval_name=spec, include_path=include_path))
            else:
                unknown.append(spec)
    if unknown:
        known = own_tasks() + (lm_eval_tasks or [])
        raise TaskError("; ".join(_unknown(name, known) for name in unknown) +
                        f". swiftk's own tasks: {', '.join(own_tasks())}; a path ending in .jsonl is a task of your "
                        f"rows; `swiftk eval --list-tasks` lists lm-eval's {len(lm_eval_tasks or [])}.")
    return resolved


def own_tasks() -> list[str]:
    """The registered tasks that are asked for by name (all but jsonl, which is asked for by its file)."""
    import swiftk.plugins  # noqa: F401  (the built-in tasks)

    return [s.name for s in registered("eval_task") if s.name != "jsonl"]


def split_options(spec: str) -> tuple[str, dict[str, Any]]:
    """``arithmetic:n=50:chat=false`` -> ("arithmetic", {"n": 50, "chat": False}); a spec without options as is."""
    name, *parts = spec.split(":")
    if not parts or not all("=" in p for p in parts):
        return spec, {}
    options: dict[str, Any] = {}
    for part in parts:
        key, _, raw = part.partition("=")
        options[key.strip()] = _value(raw.strip())
    return name, options


def _value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def build(name: str, options: dict[str, Any]) -> EvalTask:
    """The registered task with ``options``; a bad option names the task's own."""
    import inspect

    spec = lookup("eval_task", name)
    try:
        inspect.signature(spec.target).bind(**options)
        task: EvalTask = spec.target(**options)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"eval task '{name}' with {options}: {exc}. Its options: "
                        f"{inspect.signature(spec.target)}") from None
    return task


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return f"no eval task named '{name}'" + (f" (did you mean {', '.join(close)}?)" if close else "")


_MANAGERS: dict[str | None, Any] = {}


def task_manager(include_path: str | None = None) -> Any:
    """lm-eval's index of its task YAMLs (and ``include_path``'s): built once, it reads ~15,000 files."""
    if include_path not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[include_path] = TaskManager(include_path=include_path)
    return _MANAGERS[include_path]


def lm_eval_names(include_path: str | None = None) -> list[str]:
    return list(task_manager(include_path).all_tasks)


def config_hash(run_dir: Path | None) -> str | None:
    if run_dir is None or not (run_dir / "config.toml").is_file():
        return None
    return hashlib.sha256((run_dir / "config.toml").read_bytes()).hexdigest()[:16]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -------------------------------------------------------------------------------------------------- running


def run_tasks(lm: Any, tasks: list[Resolved], *, system_prompt: str | None, limit: int | None,
              say: Any = print) -> tuple[list[TaskResult], dict[str, list[ItemRecord]]]:
    """Every task on ``lm`` (a SwiftkLM), one after the other; the figures and each task's items."""
    from swiftk.kernel.evals.lmeval import run_task

    results, samples = [], {}
    for r in tasks:
        say(f"eval: {r.name} ...")
        with lm_eval_quiet():
            if r.task is not None:
                result, records = run_task(lm, r.task, r.task.items(), system_prompt=system_prompt, limit=limit)
            else:
                result, records = run_native(lm, r, limit)
        results.append(result)
        samples[result.task] = records
        stderr = f" ± {result.stderr:.4f}" if result.stderr is not None else ""
        say(f"eval: {r.name} {result.metric} {result.value:.4f}{stderr} (n={result.n}, {result.seconds:.1f} s)")
    return results, samples


@contextmanager
def lm_eval_quiet() -> Iterator[None]:
    """lm-eval's warnings about configs it was handed on purpose are not the user's. (Its progress bars still
    print: tqdm reads TQDM_DISABLE once, when it is first imported.)"""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_native(lm: Any, r: Resolved, limit: int | None) -> tuple[TaskResult, list[ItemRecord]]:
    """One of lm-eval's own tasks, as lm-eval defines it (prompts, few-shot, metrics)."""
    from lm_eval import simple_evaluate

    from swiftk.kernel.evals.lmeval import figures_of

    started = time.perf_counter()
    lm.templated = False
    try:
        out = simple_evaluate(model=lm, tasks=[r.lm_eval_name], task_manager=task_manager(r.include_path),
                              limit=limit, log_samples=False, bootstrap_iters=100)
    except Exception as exc:  # datasets raises many types when the hub is out of reach
        if _offline_failure(exc):
            raise TaskError(missing_data(r.name, exc)) from None
        raise
    metrics, stderrs = figures_of(out["results"][r.name])
    main = next(iter(metrics))
    n = int(out.get("n-samples", {}).get(r.name, {}).get("effective", 0))
    return TaskResult(r.name, main, metrics[main], stderrs.get(main), n, metrics, "lm-eval",
                      time.perf_counter() - started), []


def _offline_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("offline", "couldn't reach", "connection", "not found on the hub",
                                   "doesn't exist on the hub", "datasetnotfound", "localentrynotfound"))


def missing_data(name: str, exc: BaseException) -> str:
    path = dataset_of(name)
    fetch = (f"On a machine that reaches the hub run `python -c \"import datasets; datasets.load_dataset('{path}')\"` "
             f"(or `hf download {path} --repo-type dataset`) and copy the Hugging Face cache (~/.cache/huggingface) "
             f"here" if path else "Fetch its dataset where the hub is reachable and copy the Hugging Face cache here")
    return (f"eval task '{name}' (lm-eval) needs its dataset{f' {path}' if path else ''}, which is not in this "
            f"machine's Hugging Face cache, and the hub is out of reach (offline). {fetch}; or use swiftk's own "
            f"offline tasks ({', '.join(own_tasks())}). ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")


def dataset_of(name: str) -> str | None:
    import re

    entry = task_manager().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return None
    found = re.search(r"^dataset_path:\s*(\S+)", Path(entry.yaml_path).read_text(), re.MULTILINE)
    return found.group(1).strip("'\"") if found else None


def evaluate_live(model: Any, tokenizer: Any, generator: Any, tasks: list[Resolved], *, system_prompt: str | None,
                  limit: int | None, batch_size: int) -> tuple[list[TaskResult], dict[str, list[ItemRecord]]]:
    """The tasks on a model being trained (the kernel's [eval] tasks), through the run's generator."""
    from swiftk.kernel.evals.lmeval import SwiftkLM

    lm = SwiftkLM(model, tokenizer, generator, batch_size=batch_size)
    return run_tasks(lm, tasks, system_prompt=system_prompt, limit=limit, say=lambda _: None)


def report(model: str, adapter: str | None, run_dir: Path | None, engine: str, results: list[TaskResult],
           limit: int | None, step: int | None = None) -> EvalReport:
    return EvalReport(model, adapter, config_hash(run_dir), engine, results, now(), step, limit)
