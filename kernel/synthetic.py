"""Verifiable synthetic tasks for smoke-testing training end to end.

Every row is a ``{"prompt": ..., "completion": ...}`` pair whose completion can be
recomputed from the prompt, so an evaluation can score exact matches without a
reference model. Rows only use digits, lowercase a-z, ``+``, ``=`` and space, which a
char-level tokenizer over printable ASCII covers.

All randomness flows through a ``random.Random(seed)`` instance owned by the caller of
each function, never the global RNG, so the same seed always gives the same rows.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

Row = dict[str, str]


def _operand(rng: random.Random, max_digits: int) -> int:
    # Draw the digit count first, then the value: a uniform draw over 0..10**max_digits
    # would make almost every operand max_digits long and starve the short cases.
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def addition_rows(n: int, seed: int, max_digits: int = 3) -> list[Row]:
    """``n`` rows like ``{"prompt": "12+345=", "completion": "357"}``."""
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = _operand(rng, max_digits), _operand(rng, max_digits)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def reversal_rows(n: int, seed: int, min_len: int = 3, max_len: int = 8) -> list[Row]:
    """``n`` rows like ``{"prompt": "reverse abcde=", "completion": "edcba"}``."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(min_len, max_len)))
        rows.append({"prompt": f"reverse {word}=", "completion": word[::-1]})
    return rows


TASKS: dict[str, Callable[..., list[Row]]] = {
    "addition": addition_rows,
    "reversal": reversal_rows,
}


def _unique_by_prompt(rows: Iterable[Row]) -> list[Row]:
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            unique.append(row)
    return unique


def make_splits(
    task: str, n_train: int, n_eval: int, seed: int, **task_kwargs: int
) -> tuple[list[Row], list[Row]]:
    """Deterministic ``(train, eval)`` lists with no prompt shared between or within them.

    ``task_kwargs`` go to the task generator (e.g. ``max_digits=2`` for addition).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    generate = TASKS[task]
    need = n_train + n_eval
    # Each generator consumes its RNG row by row, so a longer draw with the same seed
    # extends a shorter one: oversampling more keeps the earlier rows and the result
    # stays deterministic. Duplicates are dropped so eval scores measure generalisation.
    size = max(2 * need, 16)
    while True:
        unique = _unique_by_prompt(generate(size, seed, **task_kwargs))
        if len(unique) >= need:
            break
        if size >= 64 * need:
            raise ValueError(f"task {task!r} cannot produce {need} distinct prompts with {task_kwargs}")
        size *= 2
    # Eval comes first so that changing n_train never changes the eval set.
    return unique[n_eval:need], unique[:n_eval]


def write_jsonl(rows: Iterable[Mapping[str, object]], path: str | Path) -> None:
    """Write one JSON object per line (utf-8, each line newline-terminated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def wrong_answer(rng: random.Random, answer: str) -> str:
    """A plausible wrong answer: one digit changed, or off by a small amount; never the right one."""
    while True:
        if rng.random() < 0.5:
            i = rng.randrange(len(answer))
            digit = rng.choice([d for d in string.digits if d != answer[i]])
            wrong = answer[:i] + digit + answer[i + 1:]
            if len(wrong) > 1 and wrong[0] == "0":
                continue
        else:
            wrong = str(max(0, int(answer) + rng.choice([-10, -2, -1, 1, 2, 10])))
        if wrong != answer:
            return wrong


def preference_rows(rows: Iterable[Row], seed: int) -> list[dict[str, str]]:
    """Pairs for the alignment stages from a verifiable task: the right answer chosen, a near miss rejected."""
    rng = random.Random(seed)
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": wrong_answer(rng, r["completion"])}
            for r in rows]


# ------------------------------------------------------------------------------------------ images

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("square", "circle", "triangle")


def shape_image(rng: random.Random, size: int = 32) -> tuple[Any, str, str, tuple[int, int, int, int]]:
    """One coloured shape on a light background: the PIL image, its colour, its shape, and its box
    (x0, y0, x1, y1 in pixels). Sizes and places vary so that a model must look to answer."""
    from PIL import Image, ImageDraw

    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    side = rng.randint(size // 4, size // 2)
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x0, y0, x0 + side, y0 + side)
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x0, y0 + side), (x0 + side, y0 + side), (x0 + side // 2, y0)], fill=COLOURS[colour])
    return image, colour, shape, box


def shape_rows(folder: str | Path, n: int, seed: int, task: str = "vqa", size: int = 32) -> list[dict[str, Any]]:
    """``n`` image rows in swiftk's multimodal format, their PNGs written to ``folder`` (paths relative to it):
    ``vqa`` asks the shape's colour, ``caption`` describes it ("a red circle"), ``grounding`` asks for its box
    as ``[x0, y0, x1, y1]`` in 0-99 (per cent of the side), ``pairs`` gives image + caption (CLIP-style)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        image, colour, shape, box = shape_image(rng, size)
        name = f"{seed}_{i}.png"
        image.save(out / name)
        caption = f"a {colour} {shape}"
        if task == "pairs":
            rows.append({"image": name, "caption": caption})
            continue
        question, answer = {
            "vqa": ("What colour is the shape?", colour),
            "caption": ("Describe the image.", caption),
            "grounding": (f"Where is the {shape}? Answer [x0, y0, x1, y1].",
                          "[" + ", ".join(str(min(99, v * 100 // size)) for v in box) + "]"),
        }[task]
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]})
    return rows
