"""Alpaca-style instructions (Taori et al. 2023, Stanford Alpaca), and the datasets that copied its layout.

Upstream layout: ``alpaca_data.json`` (a JSON list; the GitHub release) or ``data/train-*.parquet`` (the hub),
one instruction each, ``input`` empty when the instruction stands alone (the hub adds a ``text`` field, ignored)::

    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}

Ours (``kernel/data.py``, messages): the instruction, then a blank line and the input if any, as the user turn;
the output as the assistant turn::

    {"messages": [{"role": "user", "content": "Translate to French.\\n\\nGood morning"},
                  {"role": "assistant", "content": "Bonjour"}]}

Skipped: an empty instruction or output.
"""

from __future__ import annotations

from swiftk.plugins.datasets.registry import Record, SkipRow, register_dataset


def to_messages(row: Record) -> Record:
    """{"instruction": str, "input": str (may be empty), "output": str}"""
    if "instruction" not in row or "output" not in row:
        raise KeyError("instruction" if "instruction" not in row else "output")
    instruction, extra, output = (str(row.get(key) or "").strip() for key in ("instruction", "input", "output"))
    if not instruction or not output:
        raise SkipRow("empty instruction or output")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}


FILES = {"train": ("alpaca_data.json", "alpaca_data_cleaned.json", "alpaca_gpt4_data.json")}

register_dataset("alpaca", hub_id="tatsu-lab/alpaca", converters={"sft": to_messages}, files=FILES,
                 description="52k instructions with text-davinci-003 answers")
register_dataset("alpaca-cleaned", hub_id="yahma/alpaca-cleaned", converters={"sft": to_messages}, files=FILES,
                 description="alpaca with hallucinated and empty answers fixed")
register_dataset("alpaca-gpt4", hub_id="vicgalle/alpaca-gpt4", aliases=("AI-ModelScope/alpaca-gpt4-data-en",),
                 converters={"sft": to_messages}, files=FILES, description="alpaca's instructions, GPT-4 answers")
