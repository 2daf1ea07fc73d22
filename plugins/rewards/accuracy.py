"""``accuracy``: 1.0 when a completion's final answer equals its row's reference answer, else 0.0.

The verifiable-answer reward of RL on maths (DeepSeek-R1, Guo et al. 2025, section 2.2.2; the GSM8K and MATH
recipes of TRL and open-r1). Each side's answer is extracted by the first extractor that finds one:

    boxed        the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced
    answer_tag   the content of the last ``<answer>...</answer>``
    answer_line  the rest of the line after the last ``Answer:`` (any case)
    hashes       the rest of the line after GSM8K's ``####``
    last_number  the last number in the text (``-1,234.5``, ``3/4``)
    text         the whole text, stripped

(a reference is never reduced to its last number: ``\\frac{1}{2}`` would become ``2``). Then, cheapest first:
equal after normalising (spaces, ``$``, a final period, thousands separators, case) -> 1.0; both plain numbers
(integers, decimals, ``a/b``) -> equal as exact fractions, or within 1e-6 relative when one is a decimal;
else math-verify compares them symbolically (LaTeX, fractions, sets, intervals) in a worker process the reward
kills after ``timeout_s`` (``judge.py``: a pathological answer cannot hang the run; it scores 0.0). A row
without a reference scores NaN (not applicable).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from swiftk.contracts import hookimpl, register_reward
from swiftk.plugins.rewards.judge import MathJudge

NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
PLAIN_NUMBER = re.compile(rf"^(?:{NUMBER})$")


def _boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    begin = text.index("{", start) + 1
    depth = 1
    for end in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[begin:end]
    return None  # unbalanced: the completion was cut off


def _last(pattern: str, text: str, flags: int = 0) -> str | None:
    found = re.findall(pattern, text, flags)
    return found[-1] if found else None


EXTRACT: dict[str, Callable[[str], str | None]] = {  # in the default order
    "boxed": _boxed,
    "answer_tag": lambda text: _last(r"<answer>(.*?)</answer>", text, re.DOTALL),
    "answer_line": lambda text: _last(r"answer\s*:[ \t]*(.*)", text, re.IGNORECASE),
    "hashes": lambda text: _last(r"####[ \t]*(.*)", text),
    "last_number": lambda text: _last(NUMBER, text),
    "text": lambda text: text,
}
EXTRACTORS = tuple(EXTRACT)


def extract(text: str, extractors: tuple[str, ...]) -> str | None:
    """The answer the first matching extractor finds in ``text`` (None: none found one)."""
    for name in extractors:
        found = EXTRACT[name](text)
        if found is not None and found.strip():
            inner = _boxed(found)  # <answer>\boxed{3}</answer>
            return (inner if inner is not None else found).strip()
    return None


def normalise(answer: str) -> str:
    answer = answer.strip().strip("$").strip().rstrip(".").strip()
    answer = re.sub(r"^\\text\{(.*)\}$", r"\1", answer)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return " ".join(answer.split()).lower()


def numbers_equal(a: str, b: str) -> bool:
    try:
        x, y = Fraction(a.replace(",", "")), Fraction(b.replace(",", ""))
    except ZeroDivisionError:
        return False
    if x == y:
        return True
    decimal = "." in a or "." in b  # 0.333333 for 1/3: a rounded decimal
    return decimal and abs(x - y) <= Fraction(1, 10**6) * max(Fraction(1), abs(y))


@register_reward("accuracy")
class Accuracy:
    """1.0 / 0.0: the completion's extracted answer equals the reference's; NaN without a reference."""

    def __init__(self, extract: list[str] | None = None, reference_extract: list[str] | None = None,
                 math_verify: bool = True, timeout_s: float = 5.0, max_answer_chars: int = 1000) -> None:
        completion = EXTRACTORS if extract is None else tuple(extract)
        reference = tuple(e for e in EXTRACTORS if e != "last_number") if reference_extract is None \
            else tuple(reference_extract)
        for key, names in (("extract", completion), ("reference_extract", reference)):
            unknown = [name for name in names if name not in EXTRACTORS]
            if unknown or not names:
                raise ValueError(f"accuracy: {key} = {list(names)}: unknown or no extractor; expected a list of "
                                 f"{', '.join(EXTRACTORS)}")
        if timeout_s <= 0 or max_answer_chars <= 0:
            raise ValueError(f"accuracy: timeout_s and max_answer_chars must be > 0, got {timeout_s}, "
                             f"{max_answer_chars}")
        self.extract, self.reference_extract = completion, reference
        self.max_answer_chars = max_answer_chars
        self.judge = MathJudge(timeout_s) if math_verify else None

    def score(self, completion: str, reference: str | None) -> float:
        if reference is None:
            return float("nan")
        gold = extract(reference, self.reference_extract)
        answer = extract(completion, self.extract)
        if gold is None:
            return float("nan")
        if answer is None:
            return 0.0
        a, b = normalise(answer), normalise(gold)
        if a == b:
            return 1.0
        if PLAIN_NUMBER.match(a) and PLAIN_NUMBER.match(b):
            return float(numbers_equal(a, b))
        if self.judge is None or len(answer) > self.max_answer_chars:
            return 0.0
        return float(self.judge.equal(gold, answer) is True)

    @hookimpl
    def swiftk_reward_compute(self, completions: list[str], references: list[str | None]) -> dict[str, list[float]]:
        return {"accuracy": [self.score(c, r) for c, r in zip(completions, references, strict=True)]}

    @hookimpl
    def swiftk_run_end(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the math-verify worker; a later comparison starts a new one."""
        if self.judge is not None:
            self.judge.close()
