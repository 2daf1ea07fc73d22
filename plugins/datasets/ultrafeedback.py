"""UltraFeedback binarized (Cui et al. 2023 ratings; binarized by HuggingFaceH4 for Zephyr, Tunstall et al. 2023).

Upstream layout: ``data/{train,test}_{prefs,sft,gen}-*.parquet``; every row has the prompt, the best-rated answer
and a lower-rated one as whole conversations (message lists ending with the answer), and ``messages`` (= chosen)::

    {"prompt": "Name a prime.", "prompt_id": "9f1c...",
     "chosen": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
     "rejected": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "9"}],
     "messages": [...], "score_chosen": 8.0, "score_rejected": 3.0}

Ours: for preference and kto (``stages/pairs.py``), the shared turns as the prompt and each last answer as a
one-message completion; for sft (``kernel/data.py``, from the ``*_sft`` splits), ``{"messages": messages}``::

    {"prompt": [{"role": "user", "content": "Name a prime."}],
     "chosen": [{"role": "assistant", "content": "7"}], "rejected": [{"role": "assistant", "content": "9"}]}

Split names: ``train`` is ``train_prefs`` for preference and kto and ``train_sft`` for sft (``test`` likewise).
Skipped: sides that do not share their prompt, an empty or identical answer.
"""

from __future__ import annotations

from typing import Any

from swiftk.plugins.datasets.registry import Record, SkipRow, register_dataset


def clean(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def to_pair(row: Record) -> Record:
    """{"prompt": str, "chosen": [messages ending with the answer], "rejected": [the same, another answer]}"""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):  # the flattened variants: prompt + two answers
        pair: Record = {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
        last_chosen, last_rejected = chosen.strip(), rejected.strip()
    else:
        chosen, rejected = clean(chosen), clean(rejected)
        if not chosen or chosen[-1]["role"] != "assistant" or not rejected or rejected[-1]["role"] != "assistant":
            raise SkipRow("a conversation does not end with an assistant answer")
        if chosen[:-1] != rejected[:-1]:
            raise SkipRow("chosen and rejected do not share their prompt")
        prompt = chosen[:-1] or [{"role": "user", "content": str(row["prompt"])}]
        pair = {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}
        last_chosen, last_rejected = chosen[-1]["content"].strip(), rejected[-1]["content"].strip()
    if not last_chosen or not last_rejected:
        raise SkipRow("empty answer")
    if last_chosen == last_rejected:
        raise SkipRow("identical chosen and rejected")
    return pair


def to_messages(row: Record) -> Record:
    """{"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}"""
    messages = clean(row["messages"])
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SkipRow("no assistant answer")
    return {"messages": messages}


PREFS = {"train": "train_prefs", "test": "test_prefs"}

register_dataset(
    "ultrafeedback", hub_id="HuggingFaceH4/ultrafeedback_binarized",
    aliases=("ultrafeedback_binarized", "ultrafeedback-binarized"),
    converters={"preference": to_pair, "kto": to_pair, "sft": to_messages},
    splits={"preference": PREFS, "kto": PREFS, "sft": {"train": "train_sft", "test": "test_sft"}},
    description="64k prompts, the best-rated of 4 model answers against a random lower-rated one (Zephyr's DPO data)",
)
