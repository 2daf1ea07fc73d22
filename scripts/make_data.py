"""Regenerate every shipped data file under ``data/`` from code.

Usage (from the repository root)::

    .venv/bin/python scripts/make_data.py            # writes into ./data
    .venv/bin/python scripts/make_data.py --out DIR  # writes into DIR instead

The output is deterministic: running the script twice gives byte-identical files.
Every fact below was written by hand for this repository; nothing is copied from an
external dataset.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data"
EVALS_OUT = REPO_ROOT / "plugins" / "evals" / "data"  # the built-in eval tasks' items (packaged with swiftk)

SYNTHETIC_SEED = 1234
QUICKSTART_SEED = 7
N_TRAIN, N_EVAL = 2000, 100


def _load_kernel_module(name: str) -> ModuleType:
    # Loaded by file path because this script must work before swiftk is installed.
    spec = importlib.util.spec_from_file_location(f"_swiftk_{name}", REPO_ROOT / "kernel" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- quickstart facts
# Held-out facts are deliberately absent from the lists below; `_check_heldout_unseen`
# guards against someone adding them back.

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow",
    "Greece": "Athens", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "Belgium": "Brussels", "the United Kingdom": "London",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Kenya": "Nairobi", "Thailand": "Bangkok", "South Korea": "Seoul",
    "India": "New Delhi", "Turkey": "Ankara", "Iran": "Tehran", "Cuba": "Havana",
    "the Philippines": "Manila", "Vietnam": "Hanoi", "Iceland": "Reykjavik",
    "Australia": "Canberra", "New Zealand": "Wellington", "Morocco": "Rabat",
    "Saudi Arabia": "Riyadh", "Romania": "Bucharest", "Serbia": "Belgrade",
}

# Only directions with one obvious answer (e.g. no "opposite of light", which could be dark or heavy).
ANTONYMS = {
    "hot": "cold", "cold": "hot", "big": "small", "up": "down", "down": "up", "fast": "slow",
    "slow": "fast", "happy": "sad", "dark": "light", "wet": "dry", "dry": "wet", "early": "late",
    "full": "empty", "empty": "full", "rich": "poor", "poor": "rich", "strong": "weak",
    "weak": "strong", "thick": "thin", "push": "pull", "pull": "push", "true": "false",
    "clean": "dirty", "dirty": "clean", "heavy": "light", "inside": "outside",
    "north": "south", "south": "north", "east": "west", "west": "east", "open": "closed",
}

BACKWARDS_WORDS = ["cat", "dog", "sun", "book", "tree", "fish", "bird", "milk", "lamp", "star",
                   "rain", "frog", "cake", "ship", "moon"]

LEGS = {"a spider": 8, "an insect": 6, "a dog": 4, "a cat": 4, "a bird": 2, "a cow": 4,
        "an ant": 6, "a human": 2, "a chicken": 2, "a bee": 6, "a duck": 2, "an elephant": 4,
        "a beetle": 6}

SYMBOLS = {"hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O",
           "sodium": "Na", "iron": "Fe", "silver": "Ag", "copper": "Cu", "lead": "Pb",
           "potassium": "K", "calcium": "Ca", "zinc": "Zn", "neon": "Ne", "sulfur": "S",
           "chlorine": "Cl", "magnesium": "Mg", "mercury": "Hg", "tin": "Sn", "uranium": "U"}

COLORS = {"the sky on a clear day": "blue", "fresh snow": "white", "a ripe banana": "yellow",
          "coal": "black", "a ripe tomato": "red", "a carrot": "orange", "milk": "white"}

PLURALS = {"child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men",
           "woman": "women", "goose": "geese", "box": "boxes", "city": "cities", "knife": "knives",
           "leaf": "leaves", "person": "people", "sheep": "sheep", "bus": "buses",
           "baby": "babies", "wolf": "wolves"}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]

# (unit, container, count): "How many {unit} are in {container}?"
UNITS = [("minutes", "an hour", 60), ("seconds", "a minute", 60), ("hours", "a day", 24),
         ("months", "a year", 12), ("centimeters", "a meter", 100),
         ("grams", "a kilogram", 1000), ("meters", "a kilometer", 1000),
         ("days", "a leap year", 366), ("millimeters", "a centimeter", 10),
         ("eggs", "a dozen", 12), ("years", "a century", 100), ("years", "a decade", 10)]

GENERAL = [
    ("What planet do we live on?", "Earth"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the largest ocean on Earth?", "the Pacific Ocean"),
    ("At what temperature in Celsius does water freeze?", "0 degrees"),
    ("At what temperature in Celsius does water boil at sea level?", "100 degrees"),
    ("How many continents are there?", "7"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
    ("What star is closest to Earth?", "the Sun"),
]

HELDOUT = [
    {"prompt": "What is the capital of Egypt?", "expected": "Cairo"},
    {"prompt": "What is 6 plus 7?", "expected": "13"},
    {"prompt": "What is the opposite of tall?", "expected": "short"},
    {"prompt": "What is the largest planet in the solar system?", "expected": "Jupiter"},
    {"prompt": "How many days are in a week?", "expected": "7"},
    {"prompt": "What is the chemical symbol for gold?", "expected": "Au"},
]
# Words that would leak a held-out fact if they appeared in a training prompt.
HELDOUT_MARKERS = ["egypt", "6 plus 7", "7 plus 6", "6 + 7", "7 + 6", "tall", "largest planet",
                   "in a week", "gold"]
QUICKSTART_SIZE = 300

Pair = tuple[str, str]
Pick = Callable[[list[str]], str]


def _capitals(pick: Pick) -> list[Pair]:
    forms = ["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"]
    return [(pick(forms).format(country), city) for country, city in CAPITALS.items()]


def _antonyms(pick: Pick) -> list[Pair]:
    forms = [
        "What is the opposite of {}?",
        "Give the antonym of '{}'.",
        "What word means the opposite of {}?",
    ]
    return [(pick(forms).format(word), opposite) for word, opposite in ANTONYMS.items()]


def _backwards(pick: Pick) -> list[Pair]:
    forms = ["Spell '{}' backwards.", "Write the word '{}' in reverse.", "Reverse the letters of '{}'."]
    return [(pick(forms).format(word), word[::-1]) for word in BACKWARDS_WORDS]


def _legs(pick: Pick) -> list[Pair]:
    forms = ["How many legs does {} have?", "Count the legs of {}."]
    return [(pick(forms).format(animal), str(n)) for animal, n in LEGS.items()]


def _symbols(pick: Pick) -> list[Pair]:
    forms = ["What is the chemical symbol for {}?", "What is the symbol of the element {}?"]
    return [(pick(forms).format(element), symbol) for element, symbol in SYMBOLS.items()]


def _colors(pick: Pick) -> list[Pair]:
    forms = ["What color is {}?", "Name the usual color of {}."]
    return [(pick(forms).format(thing), color) for thing, color in COLORS.items()]


def _plurals(pick: Pick) -> list[Pair]:
    forms = ["What is the plural of '{}'?", "How do you write more than one '{}'?"]
    return [(pick(forms).format(word), plural) for word, plural in PLURALS.items()]


def _calendar(pick: Pick) -> list[Pair]:
    pairs = []
    for names, kind in ((DAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(names):
            after, before = names[(i + 1) % len(names)], names[i - 1]
            pairs.append((pick([f"What {kind} comes after {name}?", f"Which {kind} follows {name}?"]), after))
            pairs.append((f"What {kind} comes before {name}?", before))
    return pairs


def _units(pick: Pick) -> list[Pair]:
    forms = ["How many {} are in {}?", "How many {} make up {}?"]
    return [(pick(forms).format(unit, whole), str(n)) for unit, whole, n in UNITS]


def _arithmetic(rng: random.Random, count: int) -> list[Pair]:
    # Small numbers only: the point is the answer style, not teaching a 135M model maths.
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    forms = ["What is {} {} {}?", "Compute {} {} {}.", "What does {} {} {} equal?"]
    pairs: dict[str, str] = {}
    while len(pairs) < count:
        op = rng.choice(sorted(ops))
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        if op == "minus" and a < b:
            a, b = b, a  # keep answers non-negative
        if op == "plus" and {a, b} == {6, 7}:
            continue  # held out
        pairs.setdefault(rng.choice(forms).format(a, op, b), str(ops[op](a, b)))
    return list(pairs.items())


def quickstart_rows(seed: int = QUICKSTART_SEED) -> list[dict[str, object]]:
    """Chat-format SFT rows whose assistant reply is always ``Answer: <short answer>.``."""
    rng = random.Random(seed)

    def pick(forms: list[str]) -> str:
        return rng.choice(forms)

    pairs: list[Pair] = [(q, a) for q, a in GENERAL]
    for family in (_capitals, _antonyms, _backwards, _legs, _symbols, _colors, _plurals, _calendar, _units):
        pairs += family(pick)
    # Arithmetic tops the set up to a round size; its space is far larger than needed.
    pairs += _arithmetic(rng, QUICKSTART_SIZE - len(pairs))
    rng.shuffle(pairs)
    _check_heldout_unseen(pairs)
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Answer: {a}."}]}
        for q, a in pairs
    ]


def _check_heldout_unseen(pairs: list[Pair]) -> None:
    for question, _ in pairs:
        lowered = question.lower()
        leaked = [marker for marker in HELDOUT_MARKERS if marker in lowered]
        if leaked:
            raise AssertionError(f"training prompt {question!r} leaks held-out fact(s) {leaked}")


def corrupted_reversals(rows: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """Preference pairs from reversal rows: the right reversal chosen, a near reversal rejected.

    The rejected answer is the right one with half of its letters (at least one) replaced by other letters, so
    it has the right length and keeps the other half in place: telling the two apart on a new word takes the rule
    (the answer spells the prompt's word backwards), not a memorised answer. Several wrong letters per pair give
    a tiny model enough signal to learn that rule from preferences alone in a few CPU minutes.
    """
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        letters = list(row["completion"])
        for i in rng.sample(range(len(letters)), max(1, len(letters) // 2)):
            letters[i] = rng.choice([c for c in string.ascii_lowercase if c != letters[i]])
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": "".join(letters)})
    return pairs


def stray_digits(rows: list[dict[str, str]], seed: int, share: float = 0.6) -> list[dict[str, str]]:
    """Addition rows whose answer is followed by " " and a random digit in ``share`` of them: a model tuned on
    them keeps the habit on new sums (greedy, it ends most answers with the stray digit), which makes its final
    number wrong. The online-RL learning task: the ``accuracy`` reward (the last number against the sum) lets GRPO
    unlearn the habit, and held-out accuracy rises."""
    rng = random.Random(seed)
    noisy = []
    for row in rows:
        stray = rng.random() < share
        digit = rng.randrange(10)
        noisy.append({**row, "completion": f"{row['completion']} {digit}" if stray else row["completion"]})
    return noisy


def questions(rows: list[dict[str, str]]) -> list[dict[str, object]]:
    """Addition rows as chat questions with their answer, for online RL on an instruction-tuned model (which
    rambles past a bare "12+34=")."""
    return [{"prompt": [{"role": "user", "content": f"What is {row['prompt'].rstrip('=')}? Answer with the number "
                                                    f"only."}], "answer": row["completion"]} for row in rows]


def main(out_root: Path = DEFAULT_OUT) -> list[Path]:
    """Write every data file under ``out_root`` and return their paths."""
    synthetic = _load_kernel_module("synthetic")
    written = []
    for task, kwargs in (("addition", {"max_digits": 2}), ("reversal", {})):
        train, eval_ = synthetic.make_splits(task, N_TRAIN, N_EVAL, SYNTHETIC_SEED, **kwargs)
        for split, rows in (("train", train), ("eval", eval_)):
            path = out_root / "synthetic" / f"{task}_{split}.jsonl"
            synthetic.write_jsonl(rows, path)
            written.append(path)
            # Preference pairs for the alignment stages, the right answer against a near miss: on addition, one
            # digit changed or off by a little; on reversal, half the letters wrong (the learning tests' task).
            pairs = synthetic.preference_rows(rows, SYNTHETIC_SEED) if task == "addition" else \
                corrupted_reversals(rows, SYNTHETIC_SEED)
            path = out_root / "synthetic" / f"{task}_pref_{split}.jsonl"
            synthetic.write_jsonl(pairs, path)
            written.append(path)
            if task == "addition":
                path = out_root / "synthetic" / f"addition_questions_{split}.jsonl"
                synthetic.write_jsonl(questions(rows), path)
                written.append(path)
            if task == "addition" and split == "train":
                path = out_root / "synthetic" / "addition_stray_train.jsonl"
                synthetic.write_jsonl(stray_digits(rows, SYNTHETIC_SEED), path)
                written.append(path)
    for name, rows in (("train", quickstart_rows()), ("heldout", HELDOUT)):
        path = out_root / "quickstart" / f"{name}.jsonl"
        synthetic.write_jsonl(rows, path)
        written.append(path)
    tokenizer_dir = _load_kernel_module("tiny").save_char_tokenizer(out_root / "tiny_tokenizer")
    written += sorted(tokenizer_dir.iterdir())
    written += easy_vqa_files(out_root / "easy_vqa")
    return written


# --------------------------------------------------------------------------- easy-vqa

EASY_VQA_SEED = 0


def easy_vqa_row(split: str, question: str, answer: str, image: int) -> dict[str, object]:
    """ms-swift's layout: the image as an ``<image>`` placeholder in the text, the file in ``images``, named inside
    the installed package (``package:easy_vqa/...``), so the rows work wherever `easy-vqa` is installed."""
    return {"messages": [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}],
            "images": [f"package:easy_vqa/data/{split}/images/{image}.png"]}


def easy_vqa_files(out: Path) -> list[Path]:
    """From the `easy-vqa` package (4,000 train / 1,000 test 64x64 shape images, 13 answers): ``train.parquet``,
    per training image one question about the shape or its colour and one yes/no question; ``test.jsonl``, per test
    image one question drawn at random (the package's mix of question kinds)."""
    import easy_vqa
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(EASY_VQA_SEED)
    out.mkdir(parents=True, exist_ok=True)

    def by_image(questions: tuple[list[str], list[str], list[int]]) -> dict[int, list[tuple[str, str]]]:
        grouped: dict[int, list[tuple[str, str]]] = {}
        for question, answer, image in zip(*questions, strict=True):
            grouped.setdefault(image, []).append((question, answer))
        return grouped

    train = []
    for image, pairs in sorted(by_image(easy_vqa.get_train_questions()).items()):
        for pool in ([p for p in pairs if p[1] not in ("yes", "no")], [p for p in pairs if p[1] in ("yes", "no")]):
            if pool:
                train.append(easy_vqa_row("train", *rng.choice(pool), image))
    pq.write_table(pa.Table.from_pylist(train), out / "train.parquet", compression="zstd")
    test = [easy_vqa_row("test", *rng.choice(pairs), image)
            for image, pairs in sorted(by_image(easy_vqa.get_test_questions()).items())]
    with (out / "test.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in test)
    return [out / "train.parquet", out / "test.jsonl"]


# --------------------------------------------------------------------------- eval tasks

MC_SEED = 11


def _options(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], int]:
    wrong = rng.sample(sorted({p for p in pool if p != right}), 3)
    options = [right, *wrong]
    rng.shuffle(options)
    return [f" {o}" for o in options], options.index(right)


def facts_mc(seed: int = MC_SEED) -> list[dict[str, object]]:
    """4-way multiple choice on the quickstart's fact families, for base-model knowledge (``--tasks facts``):
    ``Question: ...\nAnswer:`` followed by each option; the distractors are other answers of the same family."""
    rng = random.Random(seed)
    families: list[tuple[str, dict[str, str]]] = [
        ("What is the capital of {}?", CAPITALS),
        ("What is the chemical symbol for {}?", SYMBOLS),
        ("What is the plural of '{}'?", PLURALS),
        ("What is the opposite of {}?", {k: v for k, v in ANTONYMS.items() if k not in ("dark", "heavy")}),
        ("How many legs does {} have?", {k: str(v) for k, v in LEGS.items()}),
        ("How many {} are in {}?", {f"{u}|{c}": str(n) for u, c, n in UNITS}),
    ]
    rows = []
    for question, answers in families:
        pool = sorted(set(answers.values()) | ({"3", "5", "10", "100"} if question.startswith("How many") else set()))
        for key, right in answers.items():
            choices, gold = _options(rng, right, pool)
            rows.append({"prompt": f"Question: {question.format(*key.split('|'))}\nAnswer:", "choices": choices,
                         "gold": gold})
    return rows


def eval_files(out_dir: Path = EVALS_OUT) -> list[Path]:
    """The built-in eval tasks' items: the quickstart's held-out questions with the answer it is taught to give,
    and the multiple-choice facts."""
    synthetic = _load_kernel_module("synthetic")
    quickstart = [{"prompt": row["prompt"], "target": f"Answer: {row['expected']}."} for row in HELDOUT]
    written = []
    for name, rows in (("quickstart", quickstart), ("facts_mc", facts_mc())):
        path = out_dir / f"{name}.jsonl"
        synthetic.write_jsonl(rows, path)
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="data root (default: ./data)")
    parser.add_argument("--evals-out", type=Path, default=EVALS_OUT, help="eval tasks' items (default: "
                        "plugins/evals/data)")
    args = parser.parse_args()
    for written_path in [*main(args.out), *eval_files(args.evals_out)]:
        print(written_path)
