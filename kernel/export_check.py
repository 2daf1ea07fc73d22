"""What ``swiftk export`` measures: the text it calibrates on and holds out, and the check of every export right after
it is written (``export_report.json``).

Two kinds of held-out text, because one can hide what the other shows: GPTQ calibrated on 64 short chat rows alone
keeps the run's own task (answer perplexity +3 %) and loses general language (+45 % on prose), measured on
SmolLM2-135M; and a q4_1 GGUF of the quickstart model rounds its fine-tune away (task perplexity 4.2x) while its
prose perplexity improves.
- **task**: rows of the run's data as training tokenized them, scored on the tokens training learned (the assistant
  turn, the completion); the run's ``[data] eval_file`` when it has one, else the tail of its training file that
  calibration does not read;
- **general**: English prose from Python's own documentation (``pydoc_data.topics``, in every CPython), in chunks of
  256 tokens; held-out chunks come from its start, calibration chunks from its end.

The check reloads the export as its users would (transformers; GGUF through its ``gguf_file`` loader; a
compressed-tensors folder through compressed-tensors), computes both perplexities for it and for the unquantized
trained model, answers the run's sample prompts with both, and measures the size on disk against the model in
bf16. An export whose perplexity ratio passes its bound (``MAX_PPL_RATIO``, or ``--max-ppl-ratio``), or that does
not load, or computes NaN, fails the check.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from swiftk.contracts import IGNORE_INDEX, shifted_labels
from swiftk.kernel.config import RunConfig
from swiftk.kernel.data import Sample, Tokenize, collate, detect_format, read_rows, samples_from_rows
from swiftk.kernel.errors import DataError, SwiftkError
from swiftk.kernel.model import first_line, forward_logits

REPORT = "export_report.json"
CHUNK = 256  # tokens per general-text chunk and per calibration sequence
GENERAL_CHUNKS = 8
HELD_OUT_ROWS = 64  # at most, from the training file's tail when the run has no eval_file
# The largest perplexity ratio (export / unquantized) each export passes with: above it an export is broken, not
# merely coarse. 16-bit copies are exact up to bf16 rounding; 8-bit ones within 2-5 %; calibrated 4-bit ones (GPTQ,
# AWQ) within 15 %; rounded to nearest, 5-bit within 20 % and 4-bit (NF4, GGUF q4) within 35 % (q5_0 costs
# SmolLM2-135M 11 % on prose, NF4 and q4_0 24-25 %: what rounding costs models this small).
MAX_PPL_RATIO = {
    "merge": 1.01, "f16": 1.01, "q8_0": 1.02, "q5_0": 1.2, "q5_1": 1.2, "q4_0": 1.35, "q4_1": 1.35,
    "bnb-int8": 1.05, "bnb-nf4": 1.35, "gptq-4": 1.15, "gptq-8": 1.02, "awq-4": 1.15, "fp8": 1.02,
    "fp8-dynamic": 1.05,
}


class CheckError(SwiftkError):
    """The export was written but does not pass its check."""


class CalibrationError(SwiftkError):
    """The --calib file cannot calibrate: unreadable, or too short."""

    exit_code = 2


@dataclass
class HeldOut:
    """What the check scores and what calibration may read."""

    task: list[Sample]
    task_source: str  # where the task rows came from, or why there are none
    general: list[Sample]
    calibration_rows: list[tuple[str, dict[str, Any]]]  # training rows the task text does not include


@dataclass
class Figures:
    """One model's figures on the held-out text and prompts."""

    perplexity: dict[str, float | None] = field(default_factory=dict)  # "task", "general"
    tokens: dict[str, int] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ text


def python_docs() -> str:
    """English prose shipped with every CPython: the topics of its interactive help, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(str(topics[name]) for name in sorted(topics))


def sequence_length(model: torch.nn.Module) -> int:
    """``CHUNK`` tokens, or fewer where the model's (its language model's) context is shorter."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return min(CHUNK, int(getattr(config, "max_position_embeddings", None) or CHUNK))


def chunks(ids: list[int], count: int, length: int) -> list[Sample]:
    return [Sample(ids[i * length:(i + 1) * length], ids[i * length:(i + 1) * length])
            for i in range(min(count, len(ids) // length))]


def as_scored(row: dict[str, Any]) -> dict[str, Any]:
    """A preference row scored on its chosen answer; other formats as they are."""
    if isinstance(row, dict) and "chosen" in row and "prompt" in row:
        return {"prompt": row["prompt"], "completion": row["chosen"]}
    return row


def held_out(cfg: RunConfig, tokenizer: Any, length: int = CHUNK, processor: Any = None) -> HeldOut:
    """The run's held-out task rows (or the reason there are none), the general chunks, and the calibration rows.
    With a vision-language model's ``processor``, the task rows are its examples with their images."""
    docs = tokenizer(python_docs()[:200_000], add_special_tokens=False)["input_ids"]
    general = chunks(docs, GENERAL_CHUNKS, length)
    data = cfg.data.model_copy(update={"packing": False})
    try:
        train_path: str | None = cfg.data.train_path
    except ValueError:
        train_path = None  # a named dataset the saved config no longer resolves
    try:
        train = [(where, as_scored(row)) for where, row in read_rows(train_path)] if train_path else []
        evals = [(where, as_scored(row)) for where, row in read_rows(cfg.data.eval_file)] if cfg.data.eval_file \
            else []
    except (DataError, OSError) as exc:  # moved, or relative to where the run was started: prose only
        return HeldOut([], f"none: the run's data cannot be read here ({first_line(exc)})", general, [])
    if cfg.data.eval_file:
        path, calibration, rows = cfg.data.eval_file, train, evals
        source = f"{cfg.data.eval_file} (the run's [data] eval_file)"
    else:
        keep = min(HELD_OUT_ROWS, max(1, len(train) // 10)) if len(train) > 1 else 0
        path, rows, calibration = str(train_path), train[len(train) - keep:], train[:len(train) - keep]
        source = f"the last {keep} rows of {train_path} (training read them; calibration did not)"
    try:
        if processor is not None and rows:
            from swiftk.kernel.vlm import vision_samples

            task: list[Sample] = list(vision_samples(path, rows, processor, data))
        else:
            task = samples_from_rows(path, rows, tokenizer, data) if rows else []
    except DataError as exc:
        task, source = [], f"none: {exc}"
    if not rows:
        source = "none: the run's data has no held-out rows"
    return HeldOut(task, source, general, calibration)


def calibration(held: HeldOut, cfg: RunConfig, tokenizer: Any, calib: str, samples: int,
                length: int = CHUNK) -> tuple[list[list[int]], int]:
    """Token-id sequences for GPTQ/AWQ calibration, and how many came from the run's or the file's rows. ``auto``:
    up to half from the run's training rows (those the task text does not hold), joined and cut into
    ``length``-token sequences, the rest Python's documentation from its end (all of it where the run's rows
    cannot be read or tokenized, e.g. online-RL prompts without answers); a file: its rows in any of swiftk's data
    formats (or a .txt file's text), cut the same way."""
    if calib == "auto":
        own = joined_rows(held.calibration_rows, cfg, tokenizer, (samples // 2) * length)
        docs = tokenizer(python_docs()[-400_000:], add_special_tokens=False)["input_ids"]
        first = [s.input_ids for s in chunks(own, samples // 2, length)]
        return first + [s.input_ids for s in chunks(docs, samples - len(first), length)], len(first)
    path = Path(calib)
    try:
        if path.suffix == ".txt":
            ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        else:
            rows = [(w, as_scored(r)) for w, r in read_rows(str(path))]
            ids = joined_rows(rows, cfg, tokenizer, samples * length, strict=True)
    except (DataError, OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"--calib {calib}: {first_line(exc)}") from None
    found = [s.input_ids for s in chunks(ids, samples, length)]
    if not found:
        raise CalibrationError(f"--calib {calib}: {len(ids)} tokens, fewer than one calibration sequence of {length}; "
                         f"give a larger file")
    return found, len(found)


def joined_rows(rows: list[tuple[str, dict[str, Any]]], cfg: RunConfig, tokenizer: Any, enough: int,
                strict: bool = False) -> list[int]:
    """Rows tokenized as training does, end to end (calibration reads every token, trained or not), until there
    are ``enough`` tokens. Rows whose format is not a training one give nothing, unless ``strict``."""
    if not rows:
        return []
    try:
        tokenize = Tokenize(tokenizer, cfg.data, detect_format(rows, cfg.data.format))
    except DataError:
        if strict:
            raise
        return []
    ids: list[int] = []
    for where, row in rows:
        try:
            ids += tokenize(where, row).input_ids
        except DataError:
            continue  # a row training would also have refused; calibration reads the others
        if len(ids) >= enough:
            break
    return ids


# ------------------------------------------------------------------------------------------------ measuring


@torch.no_grad()
def perplexity(model: torch.nn.Module, samples: list[Sample], pad_id: int,
               autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> tuple[float | None, int]:
    """exp(mean cross-entropy) over the labelled tokens of ``samples``, and how many tokens that was."""
    if not samples:
        return None, 0
    from swiftk.kernel.vlm import VisionSample, vision_collate

    device = next(model.parameters()).device
    batched = vision_collate if isinstance(samples[0], VisionSample) else collate  # with the images' tensors
    total, count = 0.0, 0
    for start in range(0, len(samples), 8):
        batch = batched(samples[start:start + 8], pad_id).to(device)
        with autocast():
            logits = forward_logits(model, batch)
        targets = shifted_labels(batch.labels)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return (math.exp(total / count) if count else None), count


@torch.no_grad()
def answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str], cfg: RunConfig,
            autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> list[str]:
    """Greedy answers, each prompt rendered as a user turn (as the run's samples are)."""
    from swiftk.kernel.generate import chat_prompt

    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        text = chat_prompt(tokenizer, prompt, cfg.data.system_prompt)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=tokenizer.chat_template is None).to(device)
        with autocast():
            generated = model.generate(**inputs, max_new_tokens=cfg.samples.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def measure(model: torch.nn.Module, tokenizer: Any, held: HeldOut, prompts: list[str], cfg: RunConfig,
            autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> Figures:
    figures = Figures()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    for name, samples in (("task", held.task), ("general", held.general)):
        figures.perplexity[name], figures.tokens[name] = perplexity(model, samples, pad, autocast)
    figures.answers = answers(model, tokenizer, prompts, cfg, autocast)
    return figures


def sample_prompts(cfg: RunConfig) -> tuple[list[str], list[str | None]]:
    """The run's sample prompts ([samples] prompts and prompts_file) and each one's expected answer, if given."""
    prompts: list[str] = list(cfg.samples.prompts)
    expected: list[str | None] = [None] * len(prompts)
    if cfg.samples.prompts_file and Path(cfg.samples.prompts_file).is_file():  # else: moved since; no prompts
        for _, row in read_rows(cfg.samples.prompts_file):
            if "prompt" in row:
                prompts.append(str(row["prompt"]))
                expected.append(str(row["expected"]) if row.get("expected") is not None else None)
    return prompts, expected


# ------------------------------------------------------------------------------------------------ the check


def load_export(folder: Path, gguf_file: str | None, reward: bool = False, vision: str = "") -> torch.nn.Module:
    """The export as its users load it, on the GPU where there is one. ``vision``: the stage's kind of vision
    model (``Stage.vision``), which transformers' auto class loads it."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    from swiftk.kernel.model import pack_zero_points_on_meta

    pack_zero_points_on_meta()
    if reward:
        return AutoModelForSequenceClassification.from_pretrained(folder).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if vision:
        auto = AutoModelForImageTextToText if vision == "generative" else AutoModel
        return auto.from_pretrained(folder, device_map={"": device}).eval()
    if gguf_file:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        return model.to(device).eval()
    return AutoModelForCausalLM.from_pretrained(folder, device_map={"": device}).eval()


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != REPORT)


FLOAT = {"BF16", "F16", "F32", "F64"}


def weights_breakdown(folder: Path) -> dict[str, int] | None:
    """Of a safetensors folder's tensors: the bytes of layers stored quantized (any integer or FP8 tensor among a
    module's tensors), and of those kept in 16/32-bit floats (the embedding, norms, an excluded LM head), also
    as bf16 bytes. None for a folder without safetensors (GGUF)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    modules: dict[str, list[tuple[str, int, int]]] = {}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = handle.get_slice(name)
                numel = math.prod(piece.get_shape())
                dtype = piece.get_dtype()
                width = re.match(r"[A-Z]+(\d+)", dtype)  # BF16, I32, U8, F8_E4M3...; BOOL: a byte
                bits = int(width.group(1)) if width else 8
                module = name[:name.index(".weight")] if ".weight" in name else name.rsplit(".", 1)[0]
                modules.setdefault(module, []).append((dtype, numel * bits // 8, numel * 2))
    quantized = kept = kept_bf16 = 0
    for tensors in modules.values():
        if all(dtype in FLOAT for dtype, _, _ in tensors):
            kept += sum(size for _, size, _ in tensors)
            kept_bf16 += sum(as_bf16 for _, _, as_bf16 in tensors)
        else:
            quantized += sum(size for _, size, _ in tensors)
    return {"quantized_layers_bytes": quantized, "kept_float_bytes": kept, "kept_float_as_bf16_bytes": kept_bf16}


def bf16_bytes(model: torch.nn.Module) -> int:
    """The size of the model's weights in bf16, tied tensors once: what a 16-bit export of it holds."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * 2
    return total


def report(kind: str, bound: float, reference: Figures, exported: Figures | None, held: HeldOut,
           prompts: list[str], expected: list[str | None], size: int, bf16: int, problem: str | None,
           timings: dict[str, float], breakdown: dict[str, Any] | None = None) -> dict[str, Any]:
    """export_report.json's content; ``ok`` is False when ``problem`` says why."""
    ratios: dict[str, float | None] = {}
    for name in ("task", "general"):
        ref = reference.perplexity.get(name)
        got = exported.perplexity.get(name) if exported else None
        ratios[name] = round(got / ref, 4) if ref and got is not None else None
    rows = []
    for i, prompt in enumerate(prompts):
        ref_answer = reference.answers[i] if i < len(reference.answers) else None
        got_answer = exported.answers[i] if exported and i < len(exported.answers) else None
        rows.append({"prompt": prompt, "expected": expected[i], "unquantized": ref_answer, "export": got_answer,
                     "same": ref_answer == got_answer})
    if breakdown and breakdown["quantized_layers_bytes"] and bf16 > breakdown["kept_float_as_bf16_bytes"]:
        breakdown["quantized_layers_ratio"] = round(
            breakdown["quantized_layers_bytes"] / (bf16 - breakdown["kept_float_as_bf16_bytes"]), 4)
    return {
        "ok": problem is None, "problem": problem, "kind": kind, "max_ppl_ratio": bound,
        "size_bytes": size, "bf16_bytes": bf16, "size_ratio": round(size / bf16, 4) if bf16 else None,
        "size_breakdown": breakdown,
        "perplexity": {name: {"unquantized": reference.perplexity.get(name),
                              "export": exported.perplexity.get(name) if exported else None,
                              "ratio": ratios[name], "tokens": reference.tokens.get(name)}
                       for name in ("task", "general")},
        "held_out": {"task": held.task_source,
                     "general": f"{len(held.general)} chunks of {len(held.general[0].input_ids) if held.general else 0}"
                                f" tokens of Python's documentation"},
        "answers": rows, "seconds": {k: round(v, 1) for k, v in timings.items()},
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def verdict(reference: Figures, exported: Figures, bound: float) -> str | None:
    """Why the export fails its check, or None."""
    for name, ref in reference.perplexity.items():
        got = exported.perplexity.get(name)
        if ref is None:
            continue
        if got is None or not math.isfinite(got):
            return f"the export's {name} perplexity is {got} (the unquantized model's: {ref:.4g})"
        if got / ref > bound:
            return (f"the export's {name} perplexity is {got:.4g}, {got / ref:.3f}x the unquantized model's "
                    f"{ref:.4g}: over the bound of {bound}x")
    return None
