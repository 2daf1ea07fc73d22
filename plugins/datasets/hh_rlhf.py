"""Anthropic hh-rlhf (Bai et al. 2022, "Training a Helpful and Harmless Assistant with RLHF").

Upstream layout: ``{harmless-base,helpful-base,helpful-online,helpful-rejection-sampled}/{train,test}.jsonl.gz``,
one pair per line, each side a whole transcript; the two sides share every turn but the last answer::

    {"chosen":   "\\n\\nHuman: How do I boil an egg?\\n\\nAssistant: Put it in boiling water for 9 minutes.",
     "rejected": "\\n\\nHuman: How do I boil an egg?\\n\\nAssistant: Eggs are laid by hens."}

Ours (``stages/pairs.py``, conversational pairs): the shared turns as the prompt's messages, each last answer as
a one-message completion, so multi-turn context is rendered with the model's chat template::

    {"prompt": [{"role": "user", "content": "How do I boil an egg?"}],
     "chosen": [{"role": "assistant", "content": "Put it in boiling water for 9 minutes."}],
     "rejected": [{"role": "assistant", "content": "Eggs are laid by hens."}]}

Skipped (counted in the manifest): sides that do not share their prompt, an empty last answer, identical sides.
"""

from __future__ import annotations

import re

from swiftk.plugins.datasets.registry import Record, SkipRow, register_dataset

TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


def messages(transcript: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> user/assistant messages; consecutive turns of one speaker are
    joined (a few transcripts have two Human turns in a row, which strict chat templates reject)."""
    if transcript.startswith(("Human:", "Assistant:")):
        transcript = "\n\n" + transcript
    head, *rest = TURN.split(transcript)
    if head.strip():
        raise SkipRow("text before the first Human: turn")
    turns: list[dict[str, str]] = []
    for speaker, text in zip(rest[::2], rest[1::2], strict=True):
        role, content = ROLES[speaker], text.strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content}".strip()
        else:
            turns.append({"role": role, "content": content})
    return turns


def to_pair(row: Record) -> Record:
    """{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "<same transcript, another last answer>"}"""
    chosen, rejected = messages(row["chosen"]), messages(row["rejected"])
    if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
        raise SkipRow("a transcript does not end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise SkipRow("chosen and rejected do not share their prompt")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise SkipRow("empty last answer")
    if chosen[-1] == rejected[-1]:
        raise SkipRow("identical chosen and rejected")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


register_dataset(
    "hh-rlhf", hub_id="Anthropic/hh-rlhf", aliases=("hh_rlhf", "AI-ModelScope/hh-rlhf"),
    converters={"preference": to_pair, "kto": to_pair},
    description="human preference pairs on helpful and harmless assistant dialogues (160k train, 8.5k test)",
)
