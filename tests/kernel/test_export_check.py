"""What an export's check reads and decides: the held-out text (the run's eval file, else the training tail that
calibration never reads), the calibration sequences, the perplexity it computes, and its verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from swiftk.kernel import export_check
from swiftk.kernel.config import load_config

from ..conftest import REPO, write_config


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO / "data" / "tiny_tokenizer")


def config(tmp_path: Path, eval_file: bool = True, train: str = "data/synthetic/addition_train.jsonl"):
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    text = text.replace('train_file = "data/synthetic/addition_train.jsonl"', f'train_file = "{REPO / train}"')
    text = text.replace('eval_file = "data/synthetic/addition_eval.jsonl"',
                        f'eval_file = "{REPO / "data/synthetic/addition_eval.jsonl"}"' if eval_file else "")
    return load_config(write_config(tmp_path / "c.toml", text, dir=f'"{tmp_path / "run"}"'))


def test_the_eval_file_is_held_out_and_calibration_may_read_all_training_rows(tmp_path: Path, tokenizer) -> None:
    held = export_check.held_out(config(tmp_path), tokenizer, 128)
    assert len(held.task) == 100 and "eval_file" in held.task_source
    assert len(held.calibration_rows) == 2000
    assert all(set(s.labels) != {-100} for s in held.task)  # scored on the completion, as trained
    assert len(held.general) == export_check.GENERAL_CHUNKS and all(len(s.input_ids) == 128 for s in held.general)


def test_without_an_eval_file_the_training_tail_is_held_out_from_calibration(tmp_path: Path, tokenizer) -> None:
    held = export_check.held_out(config(tmp_path, eval_file=False), tokenizer, 128)
    assert len(held.task) == export_check.HELD_OUT_ROWS and "the last 64 rows" in held.task_source
    assert len(held.calibration_rows) == 2000 - 64
    calibrated = {where for where, _ in held.calibration_rows}
    assert not calibrated & {f"{REPO / 'data/synthetic/addition_train.jsonl'}:{i}" for i in range(1937, 2001)}


def test_preference_rows_are_scored_on_their_chosen_answer(tmp_path: Path, tokenizer) -> None:
    cfg = config(tmp_path, eval_file=False, train="data/synthetic/addition_pref_train.jsonl")
    held = export_check.held_out(cfg, tokenizer, 128)
    assert len(held.task) == 64 and held.task[0].input_ids  # prompt + chosen, not a format error


def test_auto_calibration_is_half_the_runs_rows_half_prose(tmp_path: Path, tokenizer) -> None:
    cfg = config(tmp_path, eval_file=False)
    held = export_check.held_out(cfg, tokenizer, 64)
    sequences, own = export_check.calibration(held, cfg, tokenizer, "auto", 10, 64)
    assert len(sequences) == 10 and own == 5 and all(len(s) == 64 for s in sequences)
    digits = [sum(tokenizer.decode([t]).isdigit() for t in s) / 64 for s in sequences]
    assert min(digits[:5]) > 0.4 and max(digits[5:]) < 0.2  # sums first, then Python's documentation
    (tmp_path / "c.txt").write_text("short text")
    with pytest.raises(export_check.CalibrationError, match="fewer than one calibration sequence"):
        export_check.calibration(held, cfg, tokenizer, str(tmp_path / "c.txt"), 10, 64)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": "the quick brown fox " * 4}) + "\n"
                                                 for _ in range(4)))
    assert len(export_check.calibration(held, cfg, tokenizer, str(tmp_path / "rows.jsonl"), 10, 64)[0]) == 5


def test_perplexity_is_the_exponential_of_the_mean_loss_on_labelled_tokens(tmp_path: Path, tokenizer) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)).eval()
    held = export_check.held_out(config(tmp_path), tokenizer, 128)
    samples = held.task[:11]  # two batches, the second a partial one
    got, tokens = export_check.perplexity(model, samples, tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            logits = model(torch.tensor([s.input_ids])).logits[0, :-1]
            labels = torch.tensor(s.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    assert tokens == count and got == pytest.approx(math.exp(total / count), rel=1e-4)
    assert export_check.perplexity(model, [], 0) == (None, 0)


def test_the_verdict_names_the_text_and_the_bound() -> None:
    reference = export_check.Figures(perplexity={"task": 2.0, "general": 20.0})
    assert export_check.verdict(reference, export_check.Figures(perplexity={"task": 2.2, "general": 22.0}), 1.15) \
        is None
    over = export_check.verdict(reference, export_check.Figures(perplexity={"task": 2.0, "general": 24.0}), 1.15)
    assert over is not None and "general perplexity is 24" in over and "1.200x" in over and "1.15x" in over
    nan = export_check.verdict(reference, export_check.Figures(perplexity={"task": float("nan"), "general": 20.0}),
                               1.15)
    assert nan is not None and "task perplexity is nan" in nan
    no_task = export_check.Figures(perplexity={"task": None, "general": 20.0})
    assert export_check.verdict(no_task, export_check.Figures(perplexity={"task": None, "general": 21.0}), 1.1) is None


def test_rows_without_answers_calibrate_on_prose_and_unreadable_data_is_no_task(tmp_path: Path, tokenizer) -> None:
    """Online-RL prompts ({"prompt": [...], "answer": ...}) are no training format: calibration is all prose. Data
    moved since the run: the check scores prose only, and says why."""
    cfg = config(tmp_path, eval_file=False, train="data/synthetic/addition_questions_train.jsonl")
    held = export_check.held_out(cfg, tokenizer, 64)
    assert held.task == [] and held.task_source.startswith("none")
    sequences, own = export_check.calibration(held, cfg, tokenizer, "auto", 6, 64)
    assert len(sequences) == 6 and own == 0
    moved = config(tmp_path, eval_file=False, train="data/synthetic/no_such_file.jsonl")
    held = export_check.held_out(moved, tokenizer, 64)
    assert held.task == [] and "cannot be read here" in held.task_source and len(held.general) > 0
