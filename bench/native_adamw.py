"""native_adamw against torch's AdamW (per-tensor loop, foreach, fused), and the native loss against
F.cross_entropy.

    .venv/bin/python bench/native_adamw.py [--rounds 3] [--sizes 10,100] [--ce-rows 8192 --ce-vocab 49152]

Prints one JSON line:
- per size (``10M``, ``100M`` parameters, in transformer-shaped tensors: attention and MLP matrices of a few
  decoder layers, their norms, and an embedding): the median optimizer step time in ms of
  ``native_adamw`` and of ``torch.optim.AdamW`` with ``foreach=False`` (``loop``), ``foreach=True`` and
  ``fused=True``, and the speedups ``speedup_vs_fused`` = fused / native, ``speedup_vs_foreach`` and
  ``speedup_vs_loop``;
- ``ce``: forward + backward of ``native_cross_entropy`` and of ``F.cross_entropy`` (mean over rows) on float32
  ``[ce_rows, ce_vocab]`` logits, ms, their ratio ``speedup_vs_torch``, and the peak extra memory of each
  (the RSS high-water mark above the logits during forward + backward, in a fresh subprocess: the gradient
  of the logits is part of both).
Goals: speedup_vs_fused >= 1.0 and speedup_vs_loop >= 2 at both sizes.

Every optimizer updates the same parameters with the same gradients; each is warmed up, then timed over
interleaved rounds (the order rotates), and the median step is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from swiftk.native import NativeOptimizer, builtin, native_loss


def transformer_shapes(millions: int) -> list[tuple[int, ...]]:
    """Decoder-layer shaped tensors totalling about ``millions`` M parameters."""
    hidden = 512 if millions <= 20 else 1024
    inter = int(hidden * 8 / 3) // 64 * 64
    layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    per_layer = sum(torch.Size(s).numel() for s in layer)
    embedding = (4096, hidden)
    layers = max(1, round((millions * 1e6 - torch.Size(embedding).numel()) / per_layer))
    return [embedding] + layer * layers + [(hidden,)]


def optimizers(params: list[torch.nn.Parameter]) -> dict[str, torch.optim.Optimizer]:
    groups = lambda: [{"params": params, "weight_decay": 0.01}]  # noqa: E731
    return {
        "native": NativeOptimizer(groups(), builtin("adamw"), lr=1e-4),
        "fused": torch.optim.AdamW(groups(), lr=1e-4, fused=True),
        "foreach": torch.optim.AdamW(groups(), lr=1e-4, foreach=True),
        "loop": torch.optim.AdamW(groups(), lr=1e-4, foreach=False),
    }


def time_steps(step: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_optimizers(millions: int, rounds: int) -> dict[str, float]:
    shapes = transformer_shapes(millions)
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    opts = optimizers(params)
    for opt in opts.values():  # allocate the state, fault the pages in
        opt.step()
        opt.step()
    steps = 20 if millions <= 20 else 5
    samples: dict[str, list[float]] = {name: [] for name in opts}
    names = list(opts)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(time_steps(opts[name].step, steps))
    ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    return {
        "params": sum(p.numel() for p in params), "tensors": len(params),
        **{f"{name}_ms": round(value, 3) for name, value in ms.items()},
        "speedup_vs_fused": round(ms["fused"] / ms["native"], 3),
        "speedup_vs_foreach": round(ms["foreach"] / ms["native"], 3),
        "speedup_vs_loop": round(ms["loop"] / ms["native"], 3),
    }


def bench_ce(rows: int, vocab: int, rounds: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=generator).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    plugin = builtin("fused_ce")
    settings = {"gamma": 0.0, "alpha": 1.0, "ignore_index": -100.0}

    def torch_ce() -> None:
        F.cross_entropy(logits, labels).backward()
        logits.grad = None

    def native_ce() -> None:
        native_loss(plugin, logits, labels, settings).mean().backward()
        logits.grad = None

    runs = {"torch": torch_ce, "native": native_ce}
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            samples[name].append(time_steps(runs[name], 1))
    ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    memory = {name: peak_extra_bytes(name, rows, vocab) for name in runs}
    return {"rows": rows, "vocab": vocab, "torch_ms": round(ms["torch"], 1), "native_ms": round(ms["native"], 1),
            "speedup_vs_torch": round(ms["torch"] / ms["native"], 3),
            "torch_peak_extra_bytes": memory["torch"], "native_peak_extra_bytes": memory["native"]}


# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of this (large) process would report ours.
MEMORY_SCRIPT = """
import re, sys, torch, torch.nn.functional as F
from swiftk.native import builtin, native_loss
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
name, rows, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
plugin = builtin("fused_ce", progress=None)
logits = torch.randn(rows, vocab).requires_grad_()
labels = torch.randint(0, vocab, (rows,))
base = hwm()
if name == "torch":
    F.cross_entropy(logits, labels).backward()
else:
    native_loss(plugin, logits, labels, {"gamma": 0.0, "alpha": 1.0, "ignore_index": -100.0}).mean().backward()
print(hwm() - base)
"""


def peak_extra_bytes(name: str, rows: int, vocab: int) -> int:
    """RSS high-water mark above the logits during forward + backward, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, name, str(rows), str(vocab)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="10,100", help="parameter counts in millions, comma-separated")
    parser.add_argument("--ce-rows", type=int, default=8192)
    parser.add_argument("--ce-vocab", type=int, default=49152)
    args = parser.parse_args()
    builtin("adamw")
    builtin("fused_ce")
    result: dict[str, object] = {"bench": "native_adamw", "threads": torch.get_num_threads(),
                                 "cpu": torch.backends.cpu.get_cpu_capability()}
    for millions in (int(s) for s in args.sizes.split(",")):
        print(f"optimizers at {millions}M parameters ...", file=sys.stderr)
        result[f"{millions}M"] = bench_optimizers(millions, args.rounds)
    print("cross-entropy ...", file=sys.stderr)
    result["ce"] = bench_ce(args.ce_rows, args.ce_vocab, args.rounds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
