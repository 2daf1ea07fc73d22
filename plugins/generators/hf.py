"""The in-process generator: ``model.generate`` over the live model and tokenizer the trainer holds.

Batched with left padding (generation appends on the right) and the KV cache; prompts are tokenized as in
training (chat messages through the tokenizer's template, raw text with the tokenizer's special tokens); it
stops at EOS and at the template's end of turn, and at stop strings. Log-probabilities are those of the
model's raw logits (before temperature, top-k/p), as a re-forward of prompt + completion computes them.
``score`` (the ``Scorer`` capability) runs that re-forward on given continuations: left-padded batches, the LM
head and a float32 log-softmax at the continuations' positions only, and one sequence for the pairs that differ
only in their last token (a multiple-choice question's one-token options). ``VisionGenerator`` is the same engine
for a vision-language model: chats whose messages hold images go through the model's processor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, TextIteratorStreamer

from swiftk.contracts import Adapter, Completion, Message, SamplingParams, Scored, register_generator
from swiftk.contracts.generation import FinishReason

Autocast = Callable[[], AbstractContextManager[Any]]
Pair = tuple[list[int], list[int]]  # a score request: (context ids, continuation ids)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message], system_prompt: str | None) -> str:
    """Messages up to the assistant's turn, as training renders them (``[data] system_prompt`` included)."""
    if system_prompt and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | list[Message]], templated: bool,
                   system_prompt: str | None) -> tuple[list[str], bool]:
    """The prompts as text, and whether the tokenizer adds its special tokens (raw text not yet templated only)."""
    texts = [p for p in prompts if isinstance(p, str)]
    if len(texts) == len(prompts):
        return texts, not templated
    if texts:
        raise TypeError("generate: prompts must be all strings or all chats (lists of messages), not a mix")
    if tokenizer.chat_template is None:
        raise ValueError("generate: chat prompts need a tokenizer with a chat template; this one has none")
    chats = [p for p in prompts if not isinstance(p, str)]
    return [render_prompt(tokenizer, chat, system_prompt) for chat in chats], False


def fit_requests(requests: Sequence[Pair], max_len: int | None) -> list[Pair]:
    """The score requests as lists, each cut from the left to ``max_len`` tokens (None: no limit); the continuation
    is kept whole. Raises ValueError for an empty context or continuation, or a continuation that fills ``max_len``."""
    fitted = []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError(f"score: request {i} has an empty {'context' if not context else 'continuation'}; "
                             "both need at least one token (lm-eval puts the EOS token in an empty context)")
        if max_len is not None and len(continuation) >= max_len:
            raise ValueError(f"score: request {i}'s continuation has {len(continuation)} tokens; the model takes "
                             f"{max_len} in all, and at least one must be context")
        if max_len is not None:
            context = context[max(0, len(context) + len(continuation) - max_len) :]
        fitted.append((context, continuation))
    return fitted


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End of sequence, and end of a chat turn where the template has one distinct from EOS."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id and end_of_turn not in ids:
        ids.append(end_of_turn)
    return ids


@register_generator("hf")
class HFGenerator:
    """Generates with the model the trainer holds. It shares the live weights, so a weights sync records the
    version (and copies in the tensors it is given)."""

    shares_weights = True  # the kernel's weight sync sends it the version only

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, *, system_prompt: str | None = None,
                 batch_size: int = 8, autocast: Autocast | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.batch_size, self.autocast = system_prompt, batch_size, autocast
        self.stops = stop_ids(tokenizer)
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def generate(self, prompts: Sequence[str] | Sequence[list[Message]], sampling: SamplingParams, *,
                 templated: bool = False) -> list[Completion]:
        per_batch = max(1, self.batch_size // sampling.n)  # a batch holds batch_size sequences
        completions: list[Completion] = []
        with self._generating(), _seeded(sampling.seed, self.model):
            for first, enc in self._inputs(prompts, templated, per_batch, sampling.n):
                completions += self._batch(enc, first, sampling)
        return completions

    def stream(self, prompt: str | list[Message], sampling: SamplingParams, *,
               templated: bool = False) -> Iterator[str]:
        """The text of one completion as it is generated, cut before a stop string."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        hold = max((len(s) for s in sampling.stop), default=1) - 1  # may be the start of a stop string
        failed: list[BaseException] = []

        def work(enc: dict[str, torch.Tensor]) -> None:
            try:
                self._run(enc, sampling, streamer=streamer)
            except BaseException as exc:  # the consumer would wait for text for ever
                failed.append(exc)
                streamer.end()  # type: ignore[no-untyped-call]

        with self._generating(), _seeded(sampling.seed, self.model):
            _, enc = next(self._inputs([prompt], templated, 1, 1))
            worker = threading.Thread(target=work, args=(enc,), name="swiftk-hf-stream")
            worker.start()
            text, sent = "", 0
            for piece in streamer:
                text += piece
                cut = _first_stop(text, sampling.stop)
                end = cut if cut is not None else len(text) - hold
                if end > sent:
                    yield text[sent:end]
                    sent = end
                if cut is not None:
                    for _ in streamer:  # the worker stops at the stop string too: let it finish
                        pass
                    break
            worker.join()
            if failed:
                raise failed[0]
            if _first_stop(text, sampling.stop) is None and len(text) > sent:
                yield text[sent:]

    def score(self, requests: Sequence[Pair]) -> list[Scored]:
        """log p(continuation | context) of each (context ids, continuation ids) pair, in request order; a pair
        past ``max_position_embeddings`` loses context on the left. Pairs that differ only in their continuation's
        last token (the one-token options of a multiple-choice question) share one sequence: it is run once, and
        each pair reads its own last token's log-prob there. Longest sequences first, ``batch_size`` per forward."""
        fitted = fit_requests(requests, getattr(self.model.config, "max_position_embeddings", None))
        shared: dict[tuple[int, ...], list[int]] = {}  # context + continuation[:-1] -> the pairs it serves
        for i, (context, continuation) in enumerate(fitted):
            shared.setdefault(tuple(context + continuation[:-1]), []).append(i)
        sequences = sorted(shared, key=len, reverse=True)
        scored: dict[int, Scored] = {}
        with self._generating():
            for start in range(0, len(sequences), self.batch_size):
                batch = sequences[start : start + self.batch_size]
                scored.update(self._score_batch(batch, [[(i, fitted[i][1]) for i in shared[s]] for s in batch]))
        return [scored[i] for i in range(len(fitted))]

    def load_weights(self, version: int, tensors: Mapping[str, torch.Tensor] | None = None,
                     adapter: Adapter | None = None) -> int:
        """Copy ``tensors`` (by state-dict name) and the adapter's into the live model; serve ``version``."""
        live = self.model.state_dict(keep_vars=True)
        unknown = sorted(set(tensors or {}) - set(live))
        if unknown:
            raise KeyError(f"load_weights: the model has no tensors named {', '.join(unknown[:5])}")
        with torch.no_grad():
            for name, tensor in (tensors or {}).items():
                live[name].copy_(tensor)
            if adapter is not None:
                if not hasattr(self.model, "peft_config"):
                    raise ValueError("load_weights: an adapter needs a PEFT model; this one has no adapters")
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.model, dict(adapter.tensors), adapter_name=adapter.name)
        self._version = version
        return version

    def close(self) -> None:
        """Nothing to release: the model and tokenizer belong to the run."""

    # ------------------------------------------------------------------------------------------- internals

    @contextmanager
    def _generating(self) -> Iterator[None]:
        was_training, side, pad = self.model.training, self.tokenizer.padding_side, self.tokenizer.pad_token
        self.model.eval()
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if pad is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        try:
            with torch.no_grad():
                yield
        finally:
            self.tokenizer.padding_side, self.tokenizer.pad_token = side, pad
            self.model.train(was_training)

    def _inputs(self, prompts: Sequence[str | list[Message]], templated: bool, per_batch: int,
                n: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """The model's inputs for ``prompts``, ``per_batch`` prompts at a time (``n`` rows each), each with the index
        of its first prompt."""
        texts, special = render_prompts(self.tokenizer, prompts, templated, self.system_prompt)
        for first in range(0, len(texts), per_batch):
            yield first, self._encode(texts[first : first + per_batch], special, n)

    def _encode(self, texts: list[str], special: bool, n: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)
        device = next(self.model.parameters()).device
        return {k: v.repeat_interleave(n, dim=0).to(device) for k, v in enc.items()}  # n rows per prompt

    def _run(self, enc: dict[str, torch.Tensor], sampling: SamplingParams, **extra: Any) -> Any:
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": not sampling.greedy,
                                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.stops}
        if not sampling.greedy:
            kwargs |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
        if sampling.stop:
            kwargs |= {"stop_strings": list(sampling.stop), "tokenizer": self.tokenizer}
        device = enc["input_ids"].device
        # no_grad is per thread: a streaming worker needs its own
        with torch.no_grad(), self.autocast() if self.autocast else torch.autocast(device.type, enabled=False):
            return self.model.generate(**enc, **kwargs, **extra)

    def _batch(self, enc: dict[str, torch.Tensor], first: int, sampling: SamplingParams) -> list[Completion]:
        out = self._run(enc, sampling, return_dict_in_generate=True, output_logits=sampling.logprobs)
        new = out.sequences[:, enc["input_ids"].shape[1] :]  # [B * n, S]
        logprobs = None
        if sampling.logprobs:  # raw logits, step by step: [B * n, V] each
            logprobs = torch.stack([F.log_softmax(step.float(), -1).gather(1, new[:, i, None])[:, 0]
                                    for i, step in enumerate(out.logits)], 1).tolist()  # [B * n, S]
        return [self._completion(row, None if logprobs is None else logprobs[r], first + r // sampling.n, sampling)
                for r, row in enumerate(new.tolist())]

    def _score_batch(self, sequences: list[tuple[int, ...]], readers: list[list[tuple[int, list[int]]]]
                     ) -> dict[int, Scored]:
        """One forward over ``sequences`` (left-padded, so every continuation ends at the last position and only the
        last ``keep`` positions go through the LM head); each reader ``(pair index, continuation)`` of a sequence
        takes the log-probs of its continuation's tokens from the sequence's last ``len(continuation)`` positions."""
        device = next(self.model.parameters()).device
        width = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0  # masked out anyway
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)  # [B, T], left-padded
        mask = torch.zeros_like(ids)
        for r, sequence in enumerate(sequences):
            ids[r, width - len(sequence) :], mask[r, width - len(sequence) :] = torch.tensor(sequence), 1
        keep = max(len(continuation) for pairs in readers for _, continuation in pairs)
        with self.autocast() if self.autocast else torch.autocast(device.type, enabled=False):
            logits = self._last_logits(ids.to(device), mask.to(device), keep)  # [B, keep, V]
        rows, positions, targets, owners = [], [], [], []  # one entry per continuation token, over the batch
        for r, pairs in enumerate(readers):
            for i, continuation in pairs:
                rows += [r] * len(continuation)
                positions += range(keep - len(continuation), keep)  # the logits at t predict token t + 1
                targets += continuation
                owners.append((i, len(continuation)))
        picked = logits[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]  # [N, V]
        del logits
        logps = F.log_softmax(picked.float(), -1)  # [N, V]
        target = torch.tensor(targets, device=device)[:, None]  # [N, 1]
        chosen = logps.gather(1, target)[:, 0].double().cpu()  # [N]
        greedy = (logps.argmax(-1) == target[:, 0]).cpu()  # [N]
        scored, start = {}, 0
        for i, count in owners:
            scored[i] = Scored(float(chosen[start : start + count].sum()), bool(greedy[start : start + count].all()),
                               count)
            start += count
        return scored

    def _last_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """The logits of the last ``keep`` positions of left-padded ``ids`` (positions counted from each row's
        first real token); only those go through the LM head where the model takes ``logits_to_keep``."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        except TypeError:  # a model without logits_to_keep: every position's logits, then the last ones
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -keep:]

    def _completion(self, ids: list[int], logprobs: list[float] | None, index: int,
                    sampling: SamplingParams) -> Completion:
        end = next((i + 1 for i, t in enumerate(ids) if t in self.stops), None)
        reason: FinishReason = "length" if end is None else "stop"
        ids = ids[:end]
        pad = self.tokenizer.pad_token_id
        if sampling.stop and (hit := self._stop_token(ids, sampling.stop)) is not None:
            ids, reason = ids[:hit], "stop"
        elif sampling.stop and end is None and ids and ids[-1] == pad:
            while ids and ids[-1] == pad:  # generate stopped on a stop string begun in the prompt: padding follows
                ids.pop()
            reason = "stop"
        text = self._decode(ids)
        text = text[: _first_stop(text, sampling.stop)]
        return Completion(text, ids, None if logprobs is None else logprobs[: len(ids)], reason, index)

    def _stop_token(self, ids: list[int], stops: tuple[str, ...]) -> int | None:
        """How many tokens it takes for the text to contain a stop string (binary search), or None."""
        def contains(k: int) -> bool:
            return _first_stop(self._decode(ids[:k]), stops) is not None

        if not contains(len(ids)):
            return None
        low, high = 1, len(ids)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if contains(mid) else (mid + 1, high)
        return low

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


class VisionGenerator(HFGenerator):
    """The in-process generator of a vision-language model. A chat's messages may hold image parts (``image``,
    ``image_url``, ``video``, as training rows and OpenAI clients write them): each chat goes through the model's
    processor as the vlm stage's eval prompts do (``kernel.vlm.VisionTokenize.prompt``), its images becoming their
    tokens and pixels, batched left-padded. Raw text, scoring and everything after the prompt are ``HFGenerator``'s.
    Not registered as an engine: ``kernel.served`` builds it for a model whose folder has a vision part."""

    def __init__(self, model: Any, processor: Any, *, system_prompt: str | None = None, batch_size: int = 8,
                 autocast: Autocast | None = None, base: Path | None = None) -> None:
        from swiftk.kernel.config import DataConfig
        from swiftk.kernel.vlm import VisionTokenize

        super().__init__(model, processor.tokenizer, system_prompt=system_prompt, batch_size=batch_size,
                         autocast=autocast)
        self.processor = processor
        # No data file: [data] holds the system prompt only. ``base``: where relative image paths start (None: here).
        data = DataConfig.model_construct(system_prompt=system_prompt)
        self.prompter = VisionTokenize(processor, data, "messages", base)

    def prompt_length(self, chat: list[Message]) -> int:
        """The tokens of a chat prompt, each image's tokens included; an image it cannot read is an ``ImageError``
        (a ``DataError``) naming it."""
        return len(self.prompter.prompt("messages", chat).input_ids)

    def _inputs(self, prompts: Sequence[str | list[Message]], templated: bool, per_batch: int,
                n: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        if any(isinstance(p, str) for p in prompts):  # raw text (or a mix, which the text path refuses)
            yield from super()._inputs(prompts, templated, per_batch, n)
            return
        from swiftk.kernel.vlm import prompt_batch

        samples = [self.prompter.prompt(f"prompt {i + 1}", chat) for i, chat in enumerate(prompts)
                   if not isinstance(chat, str)]
        device = next(self.model.parameters()).device
        for first in range(0, len(samples), per_batch):
            rows = [sample for sample in samples[first : first + per_batch] for _ in range(n)]  # n rows per prompt
            yield first, {k: v.to(device) for k, v in prompt_batch(rows, self.tokenizer.pad_token_id).items()}


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


@contextmanager
def _seeded(seed: int | None, model: Any) -> Iterator[None]:
    """Sample from ``seed`` without moving the run's own random state."""
    if seed is None:
        yield
        return
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
