"""`swiftk infer`: batch answers equal the hf generator's own, and a piped conversation keeps its history,
takes /system and /reset, and streams its answers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from swiftk.kernel.cli import main

from .test_serving import tiny_chat_run

NEW = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_run(tmp_path_factory)


@pytest.fixture(scope="module")
def greedy(run: Path):
    """The hf generator's greedy answers over the run as `export.load_trained` rebuilds it."""
    from swiftk.contracts import SamplingParams
    from swiftk.kernel.export import load_trained
    from swiftk.plugins.generators.hf import HFGenerator

    trained = load_trained(run)
    generator = HFGenerator(trained.model, trained.tokenizer, system_prompt=trained.cfg.data.system_prompt)
    return lambda chats: [c.text for c in generator.generate(chats, SamplingParams(max_new_tokens=NEW))]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_batch_rows_get_the_generators_greedy_answers(run: Path, greedy, tmp_path: Path) -> None:
    rows = [{"prompt": "What is 2 plus 2?", "id": 1}, {"prompt": "Name a color."},
            {"messages": [{"role": "system", "content": "Be a pirate."}, *user("Hello?")]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for extra in ([], ["--merged"]):  # the adapter folded into the base answers alike
        out = tmp_path / f"out{len(extra)}.jsonl"
        assert main(["infer", str(run), "--prompts", str(tmp_path / "in.jsonl"), "--out", str(out),
                     "--max-new-tokens", str(NEW), *extra]) == 0
        written = [json.loads(line) for line in out.read_text().splitlines()]
        assert [{k: v for k, v in w.items() if k in rows[i]} for i, w in enumerate(written)] == rows
        assert [w["completion"] for w in written] == greedy([user(rows[0]["prompt"]), user(rows[1]["prompt"]),
                                                             rows[2]["messages"]])
        assert all(w["finish_reason"] in ("stop", "length") and 0 < w["completion_tokens"] <= NEW for w in written)


def test_a_piped_conversation_keeps_history_and_takes_system_and_reset(run: Path, greedy, monkeypatch,
                                                                        capsys) -> None:
    script = "What is 2 plus 2?\n/system Be a pirate.\nAnd 3 plus 3?\n/reset\nWhat is 2 plus 2?\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["infer", str(run), "--max-new-tokens", str(NEW)]) == 0
    out, err = capsys.readouterr()
    pirate = [{"role": "system", "content": "Be a pirate."}]
    first = greedy([user("What is 2 plus 2?")])[0]  # the run's own system prompt
    second = greedy([pirate + user("What is 2 plus 2?") + [{"role": "assistant", "content": first}]
                     + user("And 3 plus 3?")])[0]
    third = greedy([pirate + user("What is 2 plus 2?")])[0]
    assert out == f"{first}\n{second}\n{third}\n"
    assert err.startswith("swiftk infer: run ") and "(system prompt set)" in err and "(conversation reset)" in err


def test_bad_prompt_rows_and_flags_are_exit_2_before_loading(run: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "in.jsonl").write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    assert main(["infer", str(run), "--prompts", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "in.jsonl:2: a row needs \"prompt\"" in capsys.readouterr().err
    assert main(["infer", str(run), "--prompts", str(tmp_path / "in.jsonl")]) == 2
    assert main(["infer", str(run), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
