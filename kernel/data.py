"""Datasets: read rows, turn them into (input_ids, labels) with the chat template, pack, and batch.

Formats (``[data] format``, detected from the first row when "auto"):
  messages           {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
                     loss on assistant turns only (their content and end-of-turn token)
  prompt_completion  {"prompt": str | messages, "completion": str | messages}; loss on the completion only
  text               {"text": str}; loss on every token
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from transformers import PreTrainedTokenizerBase

from swiftk.contracts import IGNORE_INDEX, Batch
from swiftk.kernel.config import DataConfig
from swiftk.kernel.errors import DataError

FIELDS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set on packed rows: restarts at 0 per document

    def as_dict(self) -> dict[str, list[int]]:
        row = {"input_ids": self.input_ids, "labels": self.labels}
        return row if self.position_ids is None else {**row, "position_ids": self.position_ids}


# ------------------------------------------------------------------------------------------ reading


def read_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows with their origin ("file:line" for JSONL, "file[#i]" otherwise), so errors can point at them."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {path} does not exist; check [data] train_file / eval_file.")
    if p.is_dir():
        import datasets

        try:
            dataset = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path} is a folder but not a saved HF dataset (datasets.save_to_disk): {exc}") from exc
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        return [(f"{path}[#{i}]", dict(row)) for i, row in enumerate(dataset)]
    if p.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file: {exc}") from None
        return [(f"{path}[#{i}]", row) for i, row in enumerate(table.to_pylist())]
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json dataset must be a list of objects; use .jsonl for one per line.")
        return [(f"{path}[#{i}]", row) for i, row in enumerate(data)]
    rows = []
    with p.open("rb") as handle:
        for number, line in iter_lines(handle, path):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
    return rows


def transformed(
    rows: list[tuple[str, dict[str, Any]]], transform: Callable[[dict[str, Any]], dict[str, Any] | None] | None
) -> list[tuple[str, dict[str, Any]]]:
    """Rows after a ``swiftk_data_row`` transform; a None from the transform keeps the row as it is."""
    if transform is None:
        return rows
    return [(where, new if (new := transform(row)) is not None else row) for where, row in rows]


def iter_lines(handle: Any, path: str) -> Iterator[tuple[int, str]]:
    """Numbered lines of a binary file, each decoded on its own so that bad UTF-8 is reported by line."""
    for number, raw in enumerate(handle, start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None


def detect_format(rows: list[tuple[str, dict[str, Any]]], requested: str) -> str:
    if requested != "auto":
        return requested
    where, first = rows[0]
    for name, fields in FIELDS.items():
        if isinstance(first, dict) and all(f in first for f in fields):
            return name
    keys = ", ".join(first) if isinstance(first, dict) else type(first).__name__
    raise DataError(
        f"{where}: cannot tell the data format from the keys ({keys}); expected 'messages', 'prompt' + "
        f"'completion', or 'text' — or set [data] format."
    )


# ------------------------------------------------------------------------------------------ tokenizing


class Tokenize:
    """Turns one row into segments of text, each trained on or not, and tokenizes them piecewise.

    Tokenizing each segment on its own keeps label boundaries exact, whatever the tokenizer merges.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, fmt: str) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.fmt = fmt
        if cfg.chat_template:
            template = cfg.chat_template
            if template.endswith(".jinja") and Path(template).is_file():
                template = Path(template).read_text(encoding="utf-8")
            tokenizer.chat_template = template

    def __call__(self, where: str, row: dict[str, Any]) -> Sample:
        missing = [f for f in FIELDS[self.fmt] if not isinstance(row, dict) or f not in row]
        if missing:
            raise DataError(f"{where}: row has no {', '.join(repr(m) for m in missing)} field ({self.fmt} format).")
        try:
            segments, templated = self.segments(row)
        except (TypeError, KeyError, ValueError, AttributeError, jinja2.TemplateError) as exc:
            raise DataError(f"{where}: cannot render the row ({self.fmt} format): {type(exc).__name__}: {exc}") \
                from None
        return self.encode(segments, templated)

    def encode(self, segments: list[tuple[str, bool]], templated: bool) -> Sample:
        """The segments tokenized one by one; labels only on the trained ones."""
        ids: list[int] = []
        labels: list[int] = []
        for index, (text, trained) in enumerate(segments):
            # A chat template writes its own special tokens; raw text gets the tokenizer's (BOS) and an EOS.
            piece = self.tokenizer(text, add_special_tokens=index == 0 and not templated)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if not templated and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
            labels.append(self.tokenizer.eos_token_id)
        return Sample(ids, labels)

    def render(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        """The chat template's text of ``messages``."""
        return str(self.tokenizer.apply_chat_template(messages, **kwargs))

    def segments(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], bool]:
        """(text, trained) pieces of the row, and whether they came from the chat template."""
        if self.fmt == "text":
            return [(str(row["text"]), True)], False
        if self.fmt == "prompt_completion":
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str) and isinstance(completion, str):
                return [(prompt, False), (completion, True)], False
            return self.chat_segments(as_messages(prompt, "user") + as_messages(completion, "assistant")), True
        return self.chat_segments(row["messages"]), True

    def chat_segments(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        if self.tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; set [data] chat_template")
        if self.cfg.system_prompt and messages and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
        render = self.render
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = str(render(messages[:i], tokenize=False, add_generation_prompt=True))
            full = str(render(messages[: i + 1], tokenize=False))
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the chat template does not render turns as prefixes of each other")
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        if not segments:
            raise ValueError("no assistant turn to train on")
        return [(text, trained) for text, trained in segments if text]


def as_messages(value: Any, role: str) -> list[dict[str, Any]]:
    """A string as one message of ``role``; a list of messages as it is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def truncate(sample: Sample, max_length: int, policy: str) -> Sample | None:
    """Apply the truncation policy; None when the sample is dropped or has nothing left to learn."""
    if len(sample.input_ids) > max_length:
        if policy == "drop":
            return None
        cut = slice(0, max_length) if policy == "right" else slice(-max_length, None)
        sample = Sample(sample.input_ids[cut], sample.labels[cut])
    if all(label == IGNORE_INDEX for label in sample.labels[1:]):
        return None
    return sample


def pack(samples: list[Sample], max_length: int) -> list[Sample]:
    """First-fit-decreasing packing into rows of at most ``max_length`` tokens; documents are never split.

    Position ids restart at 0 for each document, which transformers turns into a block-diagonal causal mask
    (documents do not attend to each other), and each document's first token is not predicted from the
    previous document.
    """
    bins: list[list[Sample]] = []
    space: list[int] = []
    for sample in sorted(samples, key=lambda s: len(s.input_ids), reverse=True):
        size = len(sample.input_ids)
        slot = next((i for i, free in enumerate(space) if free >= size), None)
        if slot is None:
            bins.append([])
            space.append(max_length)
            slot = len(bins) - 1
        bins[slot].append(sample)
        space[slot] -= size
    packed = []
    for docs in bins:
        ids = [t for d in docs for t in d.input_ids]
        labels = [label for d in docs for label in [IGNORE_INDEX, *d.labels[1:]]]
        positions = [p for d in docs for p in range(len(d.input_ids))]
        packed.append(Sample(ids, labels, positions))
    return packed


def build_dataset(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    transform: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> list[Sample]:
    """Read, transform (``swiftk_data_row`` plugins), tokenize, truncate and optionally pack a data file."""
    return samples_from_rows(path, load_rows(path, transform), tokenizer, cfg)


def load_rows(
    path: str, transform: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """A data file's rows after the ``swiftk_data_row`` transform; an empty file is a DataError."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path} holds no rows; a dataset needs at least one example.")
    return transformed(rows, transform)


def samples_from_rows(
    path: str, rows: list[tuple[str, dict[str, Any]]], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> list[Sample]:
    """Tokenize, truncate and optionally pack rows read from ``path``."""
    tokenize = Tokenize(tokenizer, cfg, detect_format(rows, cfg.format))
    full = [tokenize(where, row) for where, row in rows]
    kept = [s for s in (truncate(s, cfg.max_length, cfg.truncation) for s in full) if s is not None]
    if not kept:
        longest = max(len(s.input_ids) for s in full)
        raise DataError(
            f"{path}: none of the {len(full)} samples fits [data] max_length = {cfg.max_length} with a token "
            f"left to train on (truncation = '{cfg.truncation}'; the longest sample has {longest} tokens). "
            f"Raise max_length or use shorter samples."
        )
    return pack(kept, cfg.max_length) if cfg.packing else kept


# ------------------------------------------------------------------------------------------ batching


class Loader:
    """Deterministic, resumable micro-batches: epoch e is ``randperm(seed + e)``, cut into micro-batches.

    The position (epoch, micro-batch index) is all the state there is, so a resumed run sees exactly the
    batches the uninterrupted run would have seen. Rank r of w takes every w-th index of each epoch.
    """

    def __init__(
        self, samples: list[Sample], batch_size: int, collate: Callable[[list[Sample]], Batch], seed: int,
        shuffle: bool = True, rank: int = 0, world_size: int = 1,
    ) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.next_index = 0  # micro-batches of the current epoch already handed out

    @property
    def batches_per_epoch(self) -> int:
        per_rank = len(self.samples) // self.world_size or 1
        return -(-per_rank // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        n = len(self.samples)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        per_rank = n // self.world_size or 1
        return order[self.rank :: self.world_size][:per_rank]  # equal counts keep ranks in step

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = self.order(self.epoch)
            while self.next_index < self.batches_per_epoch:
                start = self.next_index * self.batch_size
                self.next_index += 1
                yield self.collate([self.samples[i] for i in order[start : start + self.batch_size]])
            self.epoch += 1
            self.next_index = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_index": self.next_index, "seed": self.seed, "size": len(self.samples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != len(self.samples) or state["seed"] != self.seed:
            raise DataError(
                f"the checkpoint was made on {state['size']} samples with seed {state['seed']}; this run has "
                f"{len(self.samples)} with seed {self.seed}. An exact resume needs the same data and seed."
            )
        self.epoch, self.next_index = state["epoch"], state["next_index"]


def collate(samples: list[Sample], pad_id: int) -> Batch:
    """Right-pad to the longest sample; ``num_items_in_batch`` is filled in by the step loop."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    packed = samples[0].position_ids is not None
    positions = torch.zeros((len(samples), width), dtype=torch.long) if packed else None
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
        if positions is not None and s.position_ids is not None:
            positions[row, :n] = torch.tensor(s.position_ids)
            positions[row, n:] = torch.arange(width - n)  # padding as one more (ignored) document
    if packed:  # no mask (position ids separate the documents), so the real tokens are counted here
        return Batch(ids, labels, None, 0, position_ids=positions, real_tokens=int(mask.sum()))
    return Batch(ids, labels, mask, 0)
