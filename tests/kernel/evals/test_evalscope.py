"""EvalScope as a backend: the rows in its local layout, its report and reviews read into swiftk's schema (on files
captured from a real EvalScope 1.14.1 run against ``swiftk serve``), and (``engines``) a real run in its managed
environment against ``swiftk serve`` over the tiny addition model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from swiftk.kernel import envs
from swiftk.kernel.evals.evalscope import EvalScopeError, read_results, run_evalscope, write_rows

# Captured from run_evalscope on 5 rows of data/synthetic/addition_eval.jsonl (qa, endpoint "completions") and 3
# hand-written sums as multiple choice (mcq, endpoint "chat"), against `swiftk serve` over the tiny model.
CAPTURED = Path(__file__).parent / "fixtures" / "evalscope"


def test_rows_are_written_in_evalscopes_general_qa_and_general_mcq_layouts(tmp_path: Path) -> None:
    qa = write_rows("sums", "qa", [{"query": "1+5=", "response": "6", "other": 1}], tmp_path)
    assert qa == tmp_path / "sums.jsonl" and json.loads(qa.read_text()) == {"query": "1+5=", "response": "6"}
    mcq = write_rows("pick", "mcq", [{"question": "2+2=", "A": "4", "B": 3, "answer": "A"}], tmp_path)
    assert json.loads(mcq.read_text()) == {"question": "2+2=", "A": "4", "B": "3", "answer": "A"}
    for kind, row, problem in [("qa", {"query": "1+5="}, "lacks text for.*response"),
                               ("mcq", {"question": "?", "A": "x", "C": "y", "answer": "A"}, "A, B... in order"),
                               ("mcq", {"question": "?", "A": "x", "B": "y", "answer": "C"}, "answer 'C' is not one")]:
        with pytest.raises(EvalScopeError, match=problem):
            write_rows("bad", kind, [row], tmp_path)


def test_a_captured_qa_run_reads_as_exact_match_over_its_predictions_with_rouge_alongside() -> None:
    """5 items, 3 right ("6", "180", "31"): exact match 0.6, stderr sqrt(0.6 * 0.4 / 4) = 0.2449."""
    result, items = read_results("tiny_addition", "qa", CAPTURED / "qa", seconds=4.8)
    assert (result.metric, result.n, result.backend, result.value) == ("exact_match", 5, "evalscope", 0.6)
    assert math.isclose(result.stderr, math.sqrt(0.6 * 0.4 / 4))
    assert result.metrics["rouge_l_recall"] == 0.6 and result.metrics["exact_match"] == 0.6
    assert [i.index for i in items] == [0, 1, 2, 3, 4] and (items[0].prompt, items[0].target) == ("24+1=", "25")
    assert [i.score for i in items] == [float(i.output.strip() == i.target.strip()) for i in items] == [0, 1, 0, 1, 1]


def test_a_captured_mcq_run_reads_as_evalscopes_accuracy_with_the_extracted_letter_as_output() -> None:
    result, items = read_results("tiny_mcq", "mcq", CAPTURED / "mcq")
    assert (result.metric, result.value, result.n, result.metrics["accuracy"]) == ("acc", 0.0, 3, 0.0)
    assert [i.target for i in items] == ["B", "A", "C"] and "A) 5\nB) 6" in items[0].prompt
    assert items[0].output == "" and items[0].extra["generated"] == "10011101"  # no "ANSWER: X": no letter


def test_missing_outputs_name_what_was_expected(tmp_path: Path) -> None:
    shutil.copytree(CAPTURED / "qa" / "reports", tmp_path / "reports")
    with pytest.raises(EvalScopeError, match=r"expected one reviews/\*/general_qa_tiny_addition.jsonl.*none"):
        read_results("tiny_addition", "qa", tmp_path)


def test_a_failing_runner_is_an_error_quoting_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner with a python that has no evalscope: it fails at its import, and the error shows why."""
    import sys

    monkeypatch.setattr(envs, "ensure", lambda *args, **kwargs: Path(sys.executable))
    with pytest.raises(EvalScopeError, match=r"(?s)failed \(exit 1\).*Error lines:.*No module named 'evalscope'"):
        run_evalscope("sums", "qa", [{"query": "1+5=", "response": "6"}], base_url="http://127.0.0.1:9/v1",
                      model="m", api_key=None, max_new_tokens=4, work_dir=tmp_path, timeout_s=60)
    assert (tmp_path / "evalscope.log").is_file() and (tmp_path / "data" / "sums.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)  # installs the EvalScope environment on first use (~1.5-2 min)
def test_evalscope_and_lm_eval_agree_on_the_same_items(tiny_addition_model: Path, tmp_path: Path) -> None:
    """`swiftk eval --backend evalscope` (EvalScope in its environment, against `swiftk serve` started for it) and
    the lm-eval path (in this process) answer the same 20 sums alike, and exact match says the same."""
    from swiftk.kernel.cli import main
    from swiftk.kernel.evals.results import read_report

    task = str(Path("data/synthetic/addition_eval.jsonl").resolve())
    for backend in ("lm-eval", "evalscope"):
        assert main(["eval", str(tiny_addition_model), "--tasks", task, "--limit", "20", "--backend", backend,
                     "--out", str(tmp_path / backend)]) == 0
    ours, theirs = read_report(tmp_path / "lm-eval").tasks[0], read_report(tmp_path / "evalscope").tasks[0]
    assert (ours.backend, theirs.backend) == ("lm-eval", "evalscope") and ours.n == theirs.n == 20
    rows = {b: [json.loads(line) for line in (tmp_path / b / "samples" / "addition_eval.jsonl").read_text()
                .splitlines()] for b in ("lm-eval", "evalscope")}
    assert [r["prompt"] for r in rows["evalscope"]] == [r["prompt"] for r in rows["lm-eval"]]
    assert [r["output"].strip() for r in rows["evalscope"]] == [r["output"].strip() for r in rows["lm-eval"]]
    assert theirs.metric == ours.metric == "exact_match" and theirs.value == ours.value > 0.3
    print(f"exact match on 20 held-out sums: lm-eval {ours.value:.2f}, EvalScope {theirs.value:.2f}")
