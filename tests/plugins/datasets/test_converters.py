"""Each converter on its shipped sample gives the records worked out by hand from the upstream rows."""

import json
from pathlib import Path

from swiftk.plugins.datasets import SAMPLES, resolve_dataset, summary


def records(name: str, sample: str, **kw) -> list[dict]:
    path = resolve_dataset(name, dataset_path=SAMPLES / name / sample, **kw)
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_hh_rlhf_keeps_the_shared_turns_as_the_prompt_and_the_last_answers_as_completions() -> None:
    rows = records("hh-rlhf", "train.jsonl")
    assert len(rows) == 10
    # line 4: Human, Assistant, Human shared; then "Mix 4 cups..." against "Soda bread is a traditional Irish bread."
    assert [m["role"] for m in rows[3]["prompt"]] == ["user", "assistant", "user"]
    assert rows[3]["prompt"][2] == {"role": "user", "content": "Yes please, a simple one."}
    assert rows[3]["chosen"][0]["content"].startswith("Mix 4 cups of flour")
    assert rows[3]["rejected"] == [{"role": "assistant", "content": "Soda bread is a traditional Irish bread."}]
    canberra = ("The capital of Australia is Canberra. Many people guess Sydney or Melbourne, but Canberra was "
                "purpose-built as a compromise between those two cities.")
    assert rows[4] == {"prompt": [{"role": "user", "content": "What is the capital of Australia?"}],
                       "chosen": [{"role": "assistant", "content": canberra}],
                       "rejected": [{"role": "assistant", "content": "The capital of Australia is Sydney."}]}


def test_alpaca_joins_instruction_and_input_and_skips_an_empty_output() -> None:
    rows = records("alpaca", "alpaca_data.json")
    assert len(rows) == 5  # the 6th has no output
    assert rows[1] == {"messages": [
        {"role": "user", "content": "Translate the following sentence into French.\n\nThe library opens at nine."},
        {"role": "assistant", "content": "La bibliothèque ouvre à neuf heures."}]}
    assert rows[0]["messages"][0]["content"] == "Give three tips for staying healthy."  # empty input: no blank line


def test_sharegpt_maps_speakers_and_drops_unanswerable_turns() -> None:
    rows = records("sharegpt", "sharegpt.json")
    assert len(rows) == 4  # the last conversation has no answer
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert rows[1]["messages"][0] == {"role": "system", "content": "You are a concise assistant."}
    # the third starts with a gpt turn (dropped) and ends with an unanswered "thanks" (dropped)
    assert [m["role"] for m in rows[2]["messages"]] == ["user", "assistant"]
    assert rows[2]["messages"][0]["content"] == "Why is it red at sunset then?"


def test_ultrafeedback_pairs_and_sft_messages() -> None:
    pairs = records("ultrafeedback", "train_prefs.jsonl", task_type="dpo")
    assert pairs[2] == {"prompt": [{"role": "user", "content": "Give me two synonyms for 'happy'."}],
                        "chosen": [{"role": "assistant", "content": "Joyful and content."}],
                        "rejected": [{"role": "assistant", "content": "Sad and gloomy."}]}
    sft = records("ultrafeedback", "train_prefs.jsonl", task_type="sft")
    assert sft[2]["messages"][-1] == {"role": "assistant", "content": "Joyful and content."}
    path = resolve_dataset("ultrafeedback", task_type="sft", dataset_path=SAMPLES / "ultrafeedback/train_prefs.jsonl")
    assert "split train_sft, task sft" in summary(path) and "4 of 4 rows" in summary(path)
