"""Built-in rewards for the RL stages (GRPO, PPO): ``swiftk_reward_compute`` plugins, one file each.

``accuracy`` (the final answer equals the reference, math-verify for symbolic answers), ``format`` (the
completion matches a regular expression, by default R1's ``<think>...</think><answer>...</answer>``), ``length``
(DAPO's soft overlong punishment), ``code`` (the generated Python passes the reference tests, each program in
its own sandboxed child; ``execution.py``), ``exact_match`` (the stripped completion equals the reference) and
``countdown`` (an arithmetic expression reaches the target with the given numbers). Each returns
``{name: [one float per completion]}``, NaN where a row cannot be judged (no reference).
"""

from swiftk.plugins.rewards import accuracy, code, countdown, exact, format, length

__all__ = ["accuracy", "code", "countdown", "exact", "format", "length"]
