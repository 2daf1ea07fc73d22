"""Tests for the synthetic task generators and the shipped data files built from them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from swiftk.kernel.synthetic import TASKS, addition_rows, make_splits, reversal_rows, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_make_data() -> ModuleType:
    # scripts/ is not a package, so load the script the same way it loads the generator.
    spec = importlib.util.spec_from_file_location("_make_data", REPO_ROOT / "scripts" / "make_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", sorted(TASKS))
def test_same_seed_same_rows_other_seed_different(task: str) -> None:
    generate = TASKS[task]
    assert generate(50, seed=3) == generate(50, seed=3)
    assert generate(50, seed=3) != generate(50, seed=4)
    # A longer draw extends a shorter one; make_splits relies on this.
    assert generate(80, seed=3)[:50] == generate(50, seed=3)


def test_every_addition_row_is_correct() -> None:
    rows = addition_rows(500, seed=0, max_digits=3)
    for row in rows:
        a, b = row["prompt"].removesuffix("=").split("+")
        assert 1 <= len(a) <= 3 and 1 <= len(b) <= 3
        assert row["completion"] == str(int(a) + int(b))
    assert set("".join(r["prompt"] + r["completion"] for r in rows)) <= set("0123456789+=")


def test_every_reversal_row_is_correct() -> None:
    rows = reversal_rows(500, seed=0, min_len=2, max_len=5)
    for row in rows:
        assert row["prompt"].startswith("reverse ") and row["prompt"].endswith("=")
        word = row["prompt"][len("reverse ") : -1]
        assert 2 <= len(word) <= 5 and word.isalpha() and word.islower()
        assert row["completion"] == word[::-1]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_splits_are_disjoint_unique_and_deterministic(task: str) -> None:
    train, eval_ = make_splits(task, n_train=300, n_eval=40, seed=1)
    assert (len(train), len(eval_)) == (300, 40)
    prompts = [r["prompt"] for r in train + eval_]
    assert len(set(prompts)) == len(prompts)
    assert (train, eval_) == make_splits(task, n_train=300, n_eval=40, seed=1)
    # Eval does not depend on the train size, so growing train never leaks into eval.
    assert make_splits(task, n_train=10, n_eval=40, seed=1)[1] == eval_


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'sorting'") as excinfo:
        make_splits("sorting", n_train=1, n_eval=1, seed=0)
    for known in TASKS:
        assert known in str(excinfo.value)


def test_write_jsonl_creates_dirs_and_ends_with_newline(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "rows.jsonl"
    write_jsonl([{"prompt": "1+1=", "completion": "2"}, {"prompt": "x", "completion": "y"}], path)
    text = path.read_text(encoding="utf-8")
    assert text == '{"prompt": "1+1=", "completion": "2"}\n{"prompt": "x", "completion": "y"}\n'


def test_shipped_data_matches_generator(tmp_path: Path) -> None:
    written = _load_make_data().main(tmp_path)
    assert written, "make_data.main wrote nothing"
    for path in written:
        shipped = REPO_ROOT / "data" / path.relative_to(tmp_path)
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: rerun scripts/make_data.py"
    shipped = {p.relative_to(REPO_ROOT / "data") for p in (REPO_ROOT / "data").glob("*/*") if p.is_file()}
    assert shipped == {p.relative_to(tmp_path) for p in written}
    for path in _load_make_data().eval_files(tmp_path / "evals"):
        shipped_file = REPO_ROOT / "plugins" / "evals" / "data" / path.name
        assert shipped_file.read_bytes() == path.read_bytes(), f"{shipped_file} is stale: rerun scripts/make_data.py"
