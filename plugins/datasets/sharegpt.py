"""ShareGPT conversations (shared ChatGPT logs, the Vicuna training data) and the datasets in its layout.

Upstream layout: one JSON list (``ShareGPT_V3_unfiltered_cleaned_split.json``) or JSON lines, a conversation
each, speakers ``human`` / ``gpt`` (also ``user``, ``assistant``, ``chatgpt``, ``bard``, ``bing``) and ``system``;
some variants carry the system prompt in a top-level ``system`` field::

    {"id": "QWJhYvA_0", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}

Ours (``kernel/data.py``, messages; loss on every assistant turn)::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

Cleaned as the Vicuna recipe does: answers before the first human turn and a trailing unanswered human turn are
dropped, and consecutive turns of one speaker are joined. Skipped: an unknown speaker, an empty answer, a system
turn after the conversation started, or no answer left.
"""

from __future__ import annotations

from swiftk.plugins.datasets.registry import Record, SkipRow, register_dataset

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


def to_messages(row: Record) -> Record:
    """{"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...], "system": str (optional)}"""
    turns = row["conversations"]
    messages: list[dict[str, str]] = []
    if str(row.get("system") or "").strip():
        messages.append({"role": "system", "content": str(row["system"]).strip()})
    for turn in turns:
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise SkipRow(f"unknown speaker '{turn['from']}'")
        content = str(turn["value"] or "").strip()
        if role == "system" and any(m["role"] != "system" for m in messages):
            raise SkipRow("a system turn after the conversation started")
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            continue  # an answer to nothing (the log started mid-conversation)
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    while messages and messages[-1]["role"] == "user":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipRow("no answered human turn")
    if any(m["role"] == "assistant" and not m["content"] for m in messages):
        raise SkipRow("an empty answer")
    return {"messages": messages}


register_dataset(
    "sharegpt", hub_id="anon8231489123/ShareGPT_Vicuna_unfiltered", aliases=("sharegpt-vicuna",),
    converters={"sft": to_messages}, files={"train": ("ShareGPT_V3_unfiltered_cleaned_split.json", "*.json")},
    description="~94k ChatGPT conversations shared by users (Vicuna's SFT data)",
)
