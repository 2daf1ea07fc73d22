"""Tokens/s of the tiny model trained by one process and by DDP, from the same script, one JSON line on stdout.

    .venv/bin/python bench/ddp_scaling.py [--steps 40] [--warmup 10] [--device cpu|cuda] [--processes 1 2]

Runs, each a real `swiftk run` in a subprocess on the same config (tiny Llama of configs/tiny_sft.toml, bf16,
global batch 64 x 32 tokens, its addition data):
  plain   one process, no process group (the baseline)
  world1  DDP at world size 1 under torchrun (gloo on CPU, nccl on CUDA): the cost of the machinery itself
  ddpN    N processes with DDP (N from --processes, > 1), the global batch split between them
tokens/s is the median of the per-step figures after --warmup steps (global tokens over the step's wall time,
as metrics.jsonl records them). On CPU each of N processes gets cores/N threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from swiftk.contracts import events

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
[model]
model_id = "data/tiny_tokenizer"
init = "random"
architecture = {{ model_type = "llama", hidden_size = 256, intermediate_size = 688, num_hidden_layers = 4, \
num_attention_heads = 4, num_key_value_heads = 4, max_position_embeddings = 128, tie_word_embeddings = false }}
device = "{device}"
[data]
train_file = "data/synthetic/addition_train.jsonl"
max_length = 32
[train]
tuner_strategy = "full"
lr = 1e-3
scheduler = "constant"
batch_size = {batch}
max_steps = {steps}
seed = 0
precision = "bf16"
[output]
dir = "{out}"
save_final = false
[log]
progress = "none"
[distributed]
backend = "ddp"
num_processes = {processes}
"""


def run(name: str, tmp: Path, args: argparse.Namespace, processes: int, launcher: list[str]) -> dict[str, float]:
    out = tmp / name
    cfg = tmp / f"{name}.toml"
    cfg.write_text(CONFIG.format(device=args.device, batch=args.global_batch // processes, steps=args.steps,
                                 out=out, processes=processes))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    started = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "swiftk", "run", str(cfg)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{name}: swiftk run failed ({done.returncode})")
    steps = events.steps(events.read(out / "metrics.jsonl"))[args.warmup:]
    print(f"{name}: {len(steps)} steps timed, wall {wall:.1f} s", file=sys.stderr)
    return {"tok_s": statistics.median(r.tokens_per_s for r in steps), "wall_s": wall, "loss": steps[-1].loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["plain"] = run("plain", Path(tmp), args, 1, python)
        results["world1"] = run("world1", Path(tmp), args, 1, torchrun)
        for n in (n for n in args.processes if n > 1):
            results[f"ddp{n}"] = run(f"ddp{n}", Path(tmp), args, n, python)
    line: dict[str, object] = {f"{name}_tok_s": round(r["tok_s"], 1) for name, r in results.items()}
    line["world1_vs_plain"] = round(results["world1"]["tok_s"] / results["plain"]["tok_s"], 3)
    for n in (n for n in args.processes if n > 1):
        line[f"ddp{n}_vs_plain"] = round(results[f"ddp{n}"]["tok_s"] / results["plain"]["tok_s"], 3)
    line.update({f"{name}_wall_s": round(r["wall_s"], 1) for name, r in results.items()})
    line.update({"steps": args.steps, "warmup": args.warmup, "global_batch": args.global_batch,
                 "device": args.device, "cpus": os.cpu_count(), "torch": torch.__version__})
    if args.device.startswith("cuda") and torch.cuda.is_available():
        line["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
