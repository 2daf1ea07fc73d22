"""``swiftk eval RUN|MODEL|URL``: benchmark a finished run, a model or a served endpoint; compare the reports."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from swiftk.kernel.cli.run import quiet_libraries
from swiftk.kernel.served import add_target_arguments

DESCRIPTION = textwrap.dedent("""\
    Benchmark a finished run, a model or an OpenAI-compatible endpoint on tasks, and compare reports.

    RUN|MODEL as for `swiftk infer` (a LoRA run is its adapter on its base); or an endpoint URL
    (http://HOST:PORT/v1, e.g. `swiftk serve`, with --backend evalscope).

    --tasks a,b: swiftk's own offline tasks (quickstart, arithmetic, countdown, facts, humaneval), a .jsonl file of
    {"prompt", "completion"|"answer"|"target"} rows (exact match), or any lm-evaluation-harness task by name
    whose data is in this machine's Hugging Face cache (--list-tasks). Options follow a task's name:
    arithmetic:n=50:digits=3 (`swiftk plugins show arithmetic` lists them). Default: the run's [eval] tasks.
    Generated answers are scored by reward plugins (exact_match, accuracy, countdown, code: HumanEval's programs run
    in the sandbox, never in this process); multiple choice by the options' log-likelihoods.

    --backend lm-eval (default) runs lm-evaluation-harness in this process over the loaded model, generating
    with --engine (hf, or vllm in its managed environment). --backend evalscope runs EvalScope in its own
    managed environment (`swiftk env install evalscope`) against the endpoint, or against `swiftk serve` of
    RUN|MODEL started for the occasion; its answers are scored by the same reward plugins.

    Writes OUT/results.json (per task: metric, stderr, n, model, adapter, config hash, time) and
    OUT/samples/TASK.jsonl (each item's prompt, answer, reference and score), and prints a table. OUT defaults
    to RUN/eval for a run (the web UI reads it there), else runs/eval/NAME.

    --compare A B [...]: the reports of A, B... (results.json files, folders holding one, or runs) side by side,
    with each one's difference from A (* where it exceeds 1.96 combined standard errors); with --out, also
    OUT/compare.json and OUT/compare.png.

    exit codes: 0 done, 1 a model or task error, 2 bad arguments, an unknown task or RUN|MODEL, a task's data not
    on this machine.""")


EVAL_SEQS = 64  # vllm: sequences in flight (max_num_seqs) at the least while evaluating; 8 costs a third on CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_target_arguments(parser, required=False)  # not with --compare or --list-tasks
    parser.add_argument("--tasks", default=None, metavar="A,B", help="tasks, comma-separated (see above)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="the first N items of each task")
    parser.add_argument("--out", default=None, metavar="DIR", help="where results.json goes (see above)")
    parser.add_argument("--backend", default="lm-eval", choices=["lm-eval", "evalscope"])
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="sequences per forward (hf engine; default 16)")
    parser.add_argument("--include-path", default=None, metavar="DIR", help="more lm-eval task YAMLs")
    parser.add_argument("--model-name", default=None, metavar="NAME", help="endpoint: the model to ask for")
    parser.add_argument("--api-key", default=None, metavar="KEY", help="endpoint: its key (default: $SWIFTK_API_KEY)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="REPORT", help="compare reports (see above)")
    parser.add_argument("--list-tasks", action="store_true", help="list swiftk's tasks and lm-eval's, and exit")


def main(args: argparse.Namespace) -> int:
    quiet_libraries()
    from swiftk.kernel.served import UsageError

    if args.list_tasks:
        return list_tasks(args.include_path)
    if args.compare:
        return compare(args)
    if args.target is None:
        raise UsageError("name what to evaluate (RUN|MODEL|URL), or --compare REPORTS, or --list-tasks")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: give a positive number of items per task")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: give a positive number of sequences per forward")
    if args.target.startswith(("http://", "https://")):
        return evaluate_endpoint(args)
    return evaluate_target(args)


def task_specs(args: argparse.Namespace, run_tasks: list[str] | None) -> list[str]:
    from swiftk.kernel.evals.runner import own_tasks
    from swiftk.kernel.served import UsageError

    specs = [t.strip() for t in (args.tasks or "").split(",") if t.strip()] or list(run_tasks or [])
    if not specs:
        raise UsageError(f"which tasks? pass --tasks A,B (swiftk's own: {', '.join(own_tasks())}; a .jsonl file; "
                         f"or an lm-eval task, see --list-tasks)")
    return specs


def evaluate_target(args: argparse.Namespace) -> int:
    from swiftk.kernel.evals import runner
    from swiftk.kernel.evals.lmeval import SwiftkLM
    from swiftk.kernel.served import load, make_generator, resolve

    tasks = runner.resolve(task_specs(args, None), args.include_path) if args.tasks else None  # before any load
    target = resolve(args.target, args.gguf_file)
    if tasks is None:
        tasks = runner.resolve(task_specs(args, target.cfg.eval.tasks if target.cfg else None), args.include_path)
    generation = target.generation_with(args.engine).model_copy(update={"batch_size": args.batch_size})
    if generation.engine == "vllm":  # scoring sends hundreds of short requests at once: let vLLM batch them
        generation = generation.model_copy(update={"max_concurrency": max(generation.max_concurrency, EVAL_SEQS)})
    out = Path(args.out) if args.out else (target.run_dir / "eval" if target.run_dir else
                                           Path("runs") / "eval" / target.name)
    if args.backend == "evalscope":
        return evaluate_served(args, target, tasks, out)
    say(f"swiftk eval: {target.describe()} · {generation.engine} engine · {', '.join(t.name for t in tasks)}")
    loaded = load(target, merged=args.merged)
    generator = make_generator(target, loaded, generation, target.system_prompt, report=say)
    try:
        lm = SwiftkLM(loaded.model, loaded.tokenizer, generator, batch_size=args.batch_size)
        results, samples = runner.run_tasks(lm, tasks, system_prompt=target.system_prompt, limit=args.limit, say=say)
    finally:
        generator.close()
    adapter = str(target.adapter_dir) if target.adapter_dir and not args.merged else None
    report = runner.report(str(target.run_dir or target.spec), adapter, target.run_dir, generation.engine, results,
                           args.limit)
    return finish(report, out, samples)


def evaluate_served(args: argparse.Namespace, target: Any, tasks: list[Any], out: Path) -> int:
    """EvalScope against `swiftk serve` of the target, started here on a free local port."""
    from swiftk.kernel.evals.runner import report
    from swiftk.kernel.evals.served_eval import serve_and_run

    results, samples, engine = serve_and_run(target, tasks, args, say)
    adapter = str(target.adapter_dir) if target.adapter_dir and not args.merged else None
    return finish(report(str(target.run_dir or target.spec), adapter, target.run_dir, engine, results, args.limit),
                  out, samples)


def evaluate_endpoint(args: argparse.Namespace) -> int:
    from swiftk.kernel.evals import runner
    from swiftk.kernel.evals.served_eval import run_on_endpoint
    from swiftk.kernel.served import UsageError

    if args.backend != "evalscope":
        raise UsageError(f"{args.target} is an endpoint: lm-eval here needs the model's weights (give RUN|MODEL); "
                         f"evaluate an endpoint with --backend evalscope")
    if not args.model_name:
        raise UsageError("an endpoint serves models by name: pass --model-name NAME (its /v1/models lists them)")
    tasks = runner.resolve(task_specs(args, None), args.include_path)
    results, samples = run_on_endpoint(args.target, args.model_name, args.api_key, tasks, args.limit, say)
    out = Path(args.out) if args.out else Path("runs") / "eval" / args.model_name
    return finish(runner.report(args.target, None, None, "endpoint", results, args.limit), out, samples)


def finish(report: Any, out: Path, samples: dict[str, Any]) -> int:
    from swiftk.kernel.evals.report import table
    from swiftk.kernel.evals.results import write_report

    path = write_report(report, out, samples)
    print(table(report))
    say(f"wrote {path} and {out / 'samples'}/")
    return 0


def compare(args: argparse.Namespace) -> int:
    from swiftk.kernel.evals.report import compare_paths
    from swiftk.kernel.served import UsageError

    try:
        comparison, png = compare_paths([Path(p) for p in args.compare], Path(args.out) if args.out else None)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--compare: {exc}") from None
    print(comparison.table())
    if png is not None:
        say(f"wrote {png} and {png.with_name('compare.json')}")
    return 0


def list_tasks(include_path: str | None) -> int:
    import swiftk.plugins  # noqa: F401
    from swiftk.contracts.evals import build_eval_task
    from swiftk.contracts.registry import registered
    from swiftk.kernel.evals.runner import lm_eval_names

    print("swiftk's tasks (offline):")
    for spec in registered("eval_task"):
        if spec.name != "jsonl":
            task = build_eval_task(spec.name)
            print(f"  {spec.name:<12} {task.kind:<16} {task.metric:<12} {task.description} [{task.source}]")
    names = lm_eval_names(include_path)
    print(f"lm-eval's tasks ({len(names)}; each needs its dataset in the local Hugging Face cache):")
    print(textwrap.fill(", ".join(names), width=120, initial_indent="  ", subsequent_indent="  "))
    return 0


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
