"""``countdown``: 1.0 when a completion's arithmetic expression uses only the given numbers (each at most once)
and equals the target; else 0.0.

The Countdown numbers game, the verifiable task of TinyZero (Pan et al. 2025) and of many GRPO recipes. The
reference is JSON, ``{"numbers": [3, 7, 12], "target": 25}``. The answer is the content of the last
``<answer>...</answer>``, else the text after the last ``Answer:``, else the completion's last line; an ``= 25``
at its end is dropped. It is parsed (never evaluated as Python: only numbers, + - * /, unary minus and
parentheses are accepted) and computed in exact fractions, so ``7/2*2`` is 7 and a division by zero is wrong.
A row without a reference scores NaN.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from fractions import Fraction

from swiftk.contracts import hookimpl, register_reward

OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
             ast.Div: lambda a, b: a / b}
MAX_CHARS = 200  # longer "expressions" are not answers to a four-number puzzle


def answer_of(completion: str) -> str:
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    lines = re.findall(r"answer\s*:\s*(.*)", completion, re.IGNORECASE)
    text = lines[-1] if lines else (completion.strip().splitlines() or [""])[-1]
    return text.split("=")[0].strip().rstrip(".").strip()


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """The value of ``expression`` and the numbers it uses; ValueError when it is not plain arithmetic."""
    if len(expression) > MAX_CHARS:
        raise ValueError("too long")
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](walk(node.left), walk(node.right))  # ZeroDivisionError: wrong
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"not arithmetic: {type(node).__name__}")

    return walk(ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")), used


def solves(completion: str, numbers: list[int], target: int) -> bool:
    try:
        value, used = evaluate(answer_of(completion))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    return value == target and not Counter(used) - Counter(numbers)


@register_reward("countdown")
class Countdown:
    """1.0 / 0.0: the answer reaches the target with the given numbers."""

    @hookimpl
    def swiftk_reward_compute(self, completions: list[str], references: list[str | None]) -> dict[str, list[float]]:
        scores = []
        for completion, reference in zip(completions, references, strict=True):
            if reference is None:
                scores.append(float("nan"))
                continue
            puzzle = json.loads(reference)
            scores.append(float(solves(completion, list(puzzle["numbers"]), int(puzzle["target"]))))
        return {"countdown": scores}
