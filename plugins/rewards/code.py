"""``code``: 1.0 when the generated Python passes its row's tests, run in a sandbox, else 0.0.

The execution reward of code RL (CodeRL, Le et al. 2022; DeepSeek-R1's code tasks; HumanEval's functional
correctness, Chen et al. 2021): a program is scored by running it, not by reading it. Per completion:

    code     = the last ```python (or ```py, or bare ```) fenced block of the completion, else all of it
    program  = code                      when it defines the function the prompt declares (the prompt's
                                         imports are put first: a restated ``List[int]`` needs them)
               prompt + code             otherwise, when the prompt is Python: HumanEval style, the prompt is
                                         the signature and docstring and the completion the body
    program += "\\n" + reference          the tests, e.g. HumanEval's ``test`` + ``check(entry_point)``

and the program passes when it exits 0 after its last line, within ``timeout_s`` wall-clock seconds,
``cpu_seconds`` of CPU and ``memory_mb`` of memory. Every program runs in its own confined child (see
``execution.py``: namespaces, a uid of its own, seccomp without fork or exec, Landlock, rlimits), ``workers``
at a time; nothing of it runs in this process. A row without a reference (no tests) scores NaN.

Run this reward in the kernel's process or a plain plugin host as root: a sandboxed host cannot start children.
"""

from __future__ import annotations

import ast
import math
import re

from swiftk.contracts import hookimpl, register_reward
from swiftk.plugins.rewards.execution import Executor, Limits, Outcome

FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced code block (Python or unlabelled), else the whole completion."""
    blocks = FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def declared(prompt: str) -> tuple[str | None, list[str], bool]:
    """(the function the prompt declares last, the prompt's top-level import lines, whether it is Python)."""
    tree = None
    for candidate in (prompt, prompt.rstrip() + "\n    pass\n"):  # a bare signature is Python awaiting a body
        try:
            tree = ast.parse(candidate)
            break
        except (SyntaxError, ValueError):
            continue
    if tree is None:
        match = re.findall(r"\bdef\s+([A-Za-z_]\w*)\s*\(", prompt)
        return (match[-1] if match else None), [], False
    functions = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lines = prompt.splitlines()
    imports = [ast.get_source_segment(prompt, node) or lines[node.lineno - 1] for node in tree.body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    return (functions[-1] if functions else None), imports, True


def build_program(prompt: str, completion: str, tests: str) -> str:
    code = extract_code(completion)
    name, imports, is_python = declared(prompt)
    if name is not None and re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE):
        code = "\n".join([*imports, code])
    elif is_python:
        code = prompt + code
    return f"{code}\n{tests}\n"


@register_reward("code")
class Code:
    """1.0 / 0.0: the completion's code, with its prompt when needed, passes the reference tests in a sandbox."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, cpu_seconds: int | None = None,
                 workers: int = 2, file_size_mb: int = 16, require: list[str] | None = None,
                 allow_unsandboxed: bool = False) -> None:
        try:
            limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, file_size_mb=file_size_mb,
                            cpu_seconds=math.ceil(timeout_s) if cpu_seconds is None else cpu_seconds)
        except ValueError as exc:
            raise ValueError(f"code: {exc}") from None
        if workers < 1:
            raise ValueError(f"code: workers must be >= 1, got {workers}")
        self.executor = Executor(limits, workers, require, allow_unsandboxed)  # SandboxUnavailable: says why
        self.last_outcomes: list[Outcome] = []  # the latest batch's outcomes, for tests and debugging

    @hookimpl
    def swiftk_reward_compute(self, prompts: list[str], completions: list[str],
                              references: list[str | None]) -> dict[str, list[float]]:
        rows = [i for i, reference in enumerate(references) if reference is not None]
        programs = [build_program(prompts[i], completions[i], references[i] or "") for i in rows]
        outcomes = self.executor.run(programs)
        self.last_outcomes = outcomes
        scores = [float("nan")] * len(completions)
        for i, outcome in zip(rows, outcomes, strict=True):
            scores[i] = float(outcome.passed)
        return {"code": scores}

    @hookimpl
    def swiftk_run_end(self) -> None:
        self.close()

    def close(self) -> None:
        """Remove the sandbox's folder; a later batch makes a new one."""
        self.executor.close()
