import math

import pluggy
import pytest
import torch

import swiftk.contracts.hookspecs
from swiftk.contracts import Batch, ModelOutputs, StepState, lookup
from swiftk.plugins.metrics.text import ExactMatch
from swiftk.plugins.metrics.token import Perplexity, TokenAccuracy

STATE = StepState(step=10, max_steps=20, epoch=0, lr=1e-3, tokens_seen=0, elapsed_s=0.0, run_dir=".")
L2 = math.log(2)


def one_row(logits: list[list[float]], labels: list[int]) -> tuple[Batch, ModelOutputs]:
    """A batch of one row; ``logits[t]`` scores ``labels[t + 1]``."""
    ids = torch.tensor([labels]).clamp(min=0)
    return Batch(ids, torch.tensor([labels]), None, num_items_in_batch=0), ModelOutputs(torch.tensor([logits]))


# Batch A scores 2 tokens: argmax right on the first (p = 1/2), wrong on the second (p = 1/4); the third position
# (label of a 4th token) is padding. Batch B scores 1 token, right, with p = 1/2. The prompt position is skipped.
A = one_row([[0, L2, 0], [L2, 0, 0], [9, 0, 0], [0, 0, 0]], [-100, 1, 2, -100])
B = one_row([[0, 0, 9], [L2, 0, 0], [0, 0, 0]], [-100, -100, 0])


def run_pass(*metrics: object) -> dict[str, float]:
    manager = pluggy.PluginManager("swiftk")
    manager.add_hookspecs(swiftk.contracts.hookspecs)
    for metric in metrics:
        manager.register(metric)
    manager.hook.swiftk_eval_start(state=STATE)
    for batch, outputs in (A, B):
        manager.hook.swiftk_eval_batch(batch=batch, outputs=outputs, state=STATE)
    manager.hook.swiftk_eval_predictions(prompts=["a", "b", "c", "d"], predictions=[" 4 ", "Seven", "1  2", "9"],
                                         references=["4", "seven", "1 2", "8"], state=STATE)
    return {k: v for result in manager.hook.swiftk_eval_end(state=STATE) for k, v in result.items()}


def test_token_accuracy_is_token_weighted_over_the_pass() -> None:
    """2 right out of 3 scored tokens (a mean of the batch accuracies would say (1/2 + 1) / 2)."""
    assert run_pass(TokenAccuracy()) == {"eval_token_accuracy": pytest.approx(2 / 3)}


def test_perplexity_is_exp_of_the_token_mean_nll() -> None:
    """NLLs ln 2 and ln 4 in A, ln 2 in B: exp((ln 2 + ln 4 + ln 2) / 3) = 2^(4/3)."""
    assert run_pass(Perplexity()) == {"eval_ppl": pytest.approx(2 ** (4 / 3))}


def test_a_second_pass_starts_from_zero() -> None:
    metric = lookup("metric", "token_accuracy").build()
    run_pass(metric)
    metric.swiftk_eval_start(state=STATE)
    metric.swiftk_eval_batch(batch=B[0], outputs=B[1], state=STATE)
    assert metric.swiftk_eval_end(state=STATE) == {"eval_token_accuracy": 1.0}


@pytest.mark.parametrize(("config", "expected"), [({}, 2 / 4), ({"ignore_case": True}, 3 / 4),
                                                  ({"normalize": False}, 0 / 4)])
def test_exact_match_normalises_whitespace_and_optionally_case(config: dict, expected: float) -> None:
    assert run_pass(ExactMatch(**config)) == {"eval_exact_match": expected}


def test_no_scored_tokens_or_predictions_report_nothing() -> None:
    metrics = [TokenAccuracy(), Perplexity(), ExactMatch()]
    for metric in metrics:
        metric.swiftk_eval_start(state=STATE)
    assert [metric.swiftk_eval_end(state=STATE) for metric in metrics] == [None, None, None]


def answers(metric: object, predictions: list[str], references: list[str]) -> dict[str, float] | None:
    metric.swiftk_eval_start(state=STATE)  # type: ignore[attr-defined]
    metric.swiftk_eval_predictions(prompts=[""] * len(predictions), predictions=predictions,  # type: ignore
                                   references=references, state=STATE)
    return metric.swiftk_eval_end(state=STATE)  # type: ignore[attr-defined]


def test_vqa_accuracy_normalises_answers_and_reports_each_answer_type() -> None:
    from swiftk.plugins.metrics.vision import VQAAccuracy

    got = answers(VQAAccuracy(), ["Yes.", "no", "Two", "3", "a red circle", "blue"],
                  ["yes", "yes", "2", "4", "red circle", "green"])
    assert got == {"eval_vqa_accuracy": 3 / 6, "eval_vqa_yes_no": 1 / 2, "eval_vqa_number": 1 / 2,
                   "eval_vqa_other": 1 / 2}


def test_box_iou_scores_overlap_and_counts_answers_without_a_box() -> None:
    from swiftk.plugins.metrics.vision import BoxIoU

    got = answers(BoxIoU(), ["[0, 0, 10, 10]", "[10, 10, 0, 0]", "[5, 0, 15, 10]", "somewhere left"],
                  ["[0, 0, 10, 10]"] * 4)
    assert got == {"eval_mean_iou": (1 + 1 + 1 / 3 + 0) / 4, "eval_iou50": 2 / 4, "eval_box_unreadable": 1 / 4}
    with pytest.raises(ValueError, match="holds no"):
        answers(BoxIoU(), ["[1, 2, 3, 4]"], ["top left"])
