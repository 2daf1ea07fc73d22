"""EvalScope as an evaluation backend: one task, scored against an OpenAI-compatible endpoint, from EvalScope's managed
environment (``swiftk env install evalscope``; it pins a ``datasets`` the training venv cannot share).

``run_evalscope`` writes the rows in EvalScope's local layout (``general_qa`` or ``general_mcq``), runs
``evalscope_runner.py`` with that environment's python as a supervised subprocess (a deadline, its log in
``work_dir/evalscope.log``), then reads EvalScope's report and per-item reviews into swiftk's schema
(``kernel/evals/results.py``). What reaches the endpoint is described in ``evalscope_runner.py``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

from swiftk.kernel.errors import SwiftkError
from swiftk.kernel.evals.results import ItemRecord, TaskResult, standard_error

RUNNER = Path(__file__).with_name("evalscope_runner.py")
BENCHMARK = {"qa": "general_qa", "mcq": "general_mcq"}
LOG = "evalscope.log"
LETTERS = "ABCDEFGHIJ"  # general_mcq's option columns, in order


class EvalScopeError(SwiftkError):
    """EvalScope could not evaluate a task: bad rows, a failed or overdue run, or outputs that cannot be read."""


def run_evalscope(task: str, kind: Literal["qa", "mcq"], rows: list[dict], *, base_url: str, model: str,
                  api_key: str | None, max_new_tokens: int, work_dir: Path, timeout_s: float = 1800,
                  env_dir: str | None = None,
                  endpoint: Literal["chat", "completions"] = "chat") -> tuple[TaskResult, list[ItemRecord]]:
    """Score ``rows`` with EvalScope against the model ``model`` served at ``base_url`` (``http://HOST:PORT/v1``).

    ``kind`` "qa": rows ``{"query", "response"}``, generated greedily, main metric ``exact_match``: the prediction
    ``.strip()`` equals the reference ``.strip()``. EvalScope's general_qa has no exact match (it scores Rouge and
    BLEU), so exact match is computed here from its per-item predictions; its Rouge figures are in ``metrics``
    (BLEU is left out: it needs NLTK data that an offline run cannot download). ``kind`` "mcq": rows
    ``{"question", "A", "B", ..., "answer": "B"}``, main metric ``acc``: EvalScope's accuracy of the letter it
    extracts from the generated answer. ``endpoint`` "chat" sends the prompt as one user message to
    /chat/completions (EvalScope's own ``openai_api``; the server applies its chat template), "completions" as a
    raw prompt to /completions. Installs the EvalScope environment on first use."""
    from swiftk.kernel import envs

    if kind not in BENCHMARK:
        raise EvalScopeError(f"evalscope task '{task}': kind '{kind}'; expected 'qa' or 'mcq'")
    work_dir = Path(work_dir)
    data_dir, out_dir = work_dir / "data", work_dir / "outputs"
    write_rows(task, kind, rows, data_dir)
    python = envs.ensure("evalscope", env_dir=env_dir, progress=True, cuda=False)
    job = {"task": task, "kind": kind, "endpoint": endpoint, "data_dir": str(data_dir), "out_dir": str(out_dir),
           "base_url": base_url, "model": model, "max_new_tokens": max_new_tokens, "timeout_s": timeout_s}
    (work_dir / "job.json").write_text(json.dumps(job, indent=1))
    started = time.monotonic()
    # -I: neither the user site nor the runner's folder (with this evalscope.py) on its sys.path
    envs.supervise([str(python), "-I", str(RUNNER), str(work_dir / "job.json")], work_dir / LOG,
                   f"evalscope task '{task}'", timeout_s,
                   # ModelScope has no offline switch; a local_path dataset fetches nothing
                   {**os.environ, **envs.OFFLINE, "SWIFTK_EVALSCOPE_API_KEY": api_key or "EMPTY"}, EvalScopeError)
    return read_results(task, kind, out_dir, seconds=time.monotonic() - started)


def write_rows(task: str, kind: Literal["qa", "mcq"], rows: list[dict], data_dir: Path) -> Path:
    """``data_dir/<task>.jsonl`` in EvalScope's local layout: general_qa reads ``query``/``response``, general_mcq
    ``question``, the options ``A``, ``B``... (consecutive letters) and ``answer`` (the correct letter)."""
    if not rows:
        raise EvalScopeError(f"evalscope task '{task}': no rows to evaluate")
    lines = []
    for i, row in enumerate(rows):
        if kind == "qa":
            record = {"query": row.get("query"), "response": row.get("response")}
        else:
            options = [row[letter] for letter in LETTERS if letter in row]
            record = {"question": row.get("question"), **{LETTERS[j]: str(o) for j, o in enumerate(options)},
                      "answer": row.get("answer")}
            if len(options) < 2 or any(letter not in row for letter in LETTERS[:len(options)]):
                raise EvalScopeError(f"evalscope task '{task}': row {i} needs options A, B... in order, at least "
                                     f"two (it has {sorted(k for k in row if k in LETTERS)})")
            if record["answer"] not in LETTERS[:len(options)]:
                raise EvalScopeError(f"evalscope task '{task}': row {i}: answer {record['answer']!r} is not one of "
                                     f"its options {list(LETTERS[:len(options)])}")
        missing = [key for key, value in record.items() if not isinstance(value, str)]
        if missing:
            raise EvalScopeError(f"evalscope task '{task}' ({kind}): row {i} lacks text for {missing} "
                                 f"(its keys: {sorted(row)})")
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{task}.jsonl"  # EvalScope looks for <subset>_<split>.jsonl, then <subset>.jsonl
    path.write_text("".join(lines))
    return path


def read_results(task: str, kind: Literal["qa", "mcq"], out_dir: Path,
                 seconds: float = 0.0) -> tuple[TaskResult, list[ItemRecord]]:
    """The task's figures and items from EvalScope's ``reports/<model>/<benchmark>.json`` and
    ``reviews/<model>/<benchmark>_<task>.jsonl`` under ``out_dir``."""
    benchmark = BENCHMARK[kind]
    report_path = _one(out_dir, f"reports/*/{benchmark}.json", task)
    reviews_path = _one(out_dir, f"reviews/*/{benchmark}_{task}.jsonl", task)
    try:
        report = json.loads(report_path.read_text())
        reviews = [json.loads(line) for line in reviews_path.read_text().splitlines() if line.strip()]
        metrics = {_metric_name(m["identity"]): float(m["score"]) for m in report["metrics"]}
        items = [_item(review, kind) for review in sorted(reviews, key=lambda r: r["index"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalScopeError(f"evalscope task '{task}': cannot read its outputs in {out_dir} "
                             f"({type(exc).__name__}: {exc})") from None
    if not items:
        raise EvalScopeError(f"evalscope task '{task}': no scored items in {reviews_path}")
    main = "exact_match" if kind == "qa" else "acc"
    scores = [item.score for item in items]
    value = sum(scores) / len(scores)
    if kind == "mcq" and not math.isclose(value, metrics.get("accuracy", value), abs_tol=1e-6):
        raise EvalScopeError(f"evalscope task '{task}': its report says accuracy {metrics['accuracy']} but its "
                             f"{len(items)} reviews average {value}; {out_dir} is inconsistent")
    metrics[main] = value
    return TaskResult(task=task, metric=main, value=value, stderr=standard_error(scores), n=len(items), metrics=metrics,
                      backend="evalscope", seconds=seconds), items


# ------------------------------------------------------------------------------------------------ internals


def _one(out_dir: Path, pattern: str, task: str) -> Path:
    found = sorted(out_dir.glob(pattern))
    if len(found) != 1:
        raise EvalScopeError(f"evalscope task '{task}': expected one {pattern} in {out_dir}, found "
                             f"{[str(p) for p in found] or 'none'}; see {out_dir.parent / LOG}")
    return found[0]


def _metric_name(identity: dict[str, Any]) -> str:
    """``rouge`` {variant: l, statistic: recall} -> ``rouge_l_recall``; {ngram: 1, ...} -> ``rouge_1_recall``."""
    dims = identity.get("dimensions") or {}
    ordered = [v for k, v in dims.items() if k != "statistic"] + ([dims["statistic"]] if "statistic" in dims else [])
    return "_".join([identity["name"], *(str(v) for v in ordered)])


def _item(review: dict[str, Any], kind: str) -> ItemRecord:
    score = review["sample_score"]["score"]
    prompt = "\n".join(str(m["content"]) for m in review["messages"] if m["role"] != "assistant")
    target = review["target"]
    target = "".join(target) if isinstance(target, list) else str(target)
    prediction = score["prediction"] or ""
    extra = {"evalscope": score["value"], "status": score.get("status")}
    if kind == "qa":  # our normalisation, the same as the lm-eval tasks'
        return ItemRecord(review["index"], prompt, prediction, target,
                          float(prediction.strip() == target.strip()), extra)
    return ItemRecord(review["index"], prompt, score.get("extracted_prediction") or "", target,
                      float(score["value"][score.get("main_score_name") or "accuracy"]),
                      {**extra, "generated": prediction})
