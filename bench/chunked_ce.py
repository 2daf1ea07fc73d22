"""Chunked linear + cross-entropy (``swiftk.contracts.chunked``) against ``F.cross_entropy`` on full logits.

    .venv/bin/python bench/chunked_ce.py [--tokens 2048] [--hidden 576] [--vocab 49152] [--labelled 0.5]
                                         [--dtype bf16] [--reps 5] [--tp 1] [--compile]

One loss step, forward and backward, at SmolLM2-135M's shape by default: hidden states ``[N, H]`` (a leaf that
requires grad, as the decoder's output is) and the LM head's weight ``[V, H]`` (trainable with ``--train-head``,
else frozen as under LoRA), ``--labelled`` of the N tokens scored (the rest prompt). Both ways compute the same
sum over the scored tokens:

  full      logits = h @ W.T ([N, V], in --dtype), F.cross_entropy(logits.float(), labels, ignore_index, sum)
            (what a causal LM's forward and swiftk's loss did before chunking)
  chunked   linear_cross_entropy(h[scored], W, labels[scored]): one chunk of logits at a time, gradients
            computed in forward; in the dtype swiftk's kernel picks (``kernel.heads.matmul_dtype``): --dtype,
            except float32 for a 16-bit type this CPU only emulates (reported as chunked_dtype)

With ``--compile`` a third way, ``compiled``, is the chunked loss with its per-chunk maths under
``torch.compile`` (``contracts.chunked.compile_chunks``, what ``[train] compile = true`` turns on); its first step
(the warm-up, where it compiles) is not timed, and its peak includes the compiler's own memory.

With ``--tp N`` both ways run on N processes (gloo), the head split by vocabulary rows as tensor parallelism
splits it (a DTensor, ``Shard(0)``): ``full`` is what tp did before, each rank's logits gathered whole
(``contracts.chunked.head_logits``) and scored by ``F.cross_entropy``; ``chunked`` the vocabulary-parallel
chunked loss (each rank scores its rows; three numbers per token exchanged). Figures are rank 0's; the tests
check that the two agree (``tests/contracts/test_chunked.py``).

Each way runs in a fresh subprocess: its peak memory is the process's peak RSS above what it held with the
inputs allocated (what the step adds). Times: median of --reps steps after one warm-up. The gradients are
compared in float32 (max relative difference of dh and dW), whatever --dtype times.

stdout: one JSON line; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout: swiftk is this repository

IGNORE_INDEX = -100


def inputs(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(dtype)
    weight.requires_grad_(args.train_head)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    labels[torch.rand(args.tokens, generator=g) >= args.labelled] = IGNORE_INDEX
    return hidden, weight, labels


def step(way: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from swiftk.contracts.chunked import head_logits, linear_cross_entropy

    if way == "full":
        logits = head_logits(hidden, weight)  # [N, V] (a split head's slices gathered whole)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        scored = labels != IGNORE_INDEX
        loss = linear_cross_entropy(hidden[scored], weight, labels[scored])
    loss.backward()
    return loss.detach()


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    from swiftk.kernel.heads import matmul_dtype

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return matmul_dtype(torch.device("cpu"), dtype) if args.way in ("chunked", "compiled") else dtype


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One way, in this process: its added peak memory, then its step time."""
    torch.set_num_threads(args.threads)
    if args.way == "compiled":
        from swiftk.contracts.chunked import compile_chunks

        compile_chunks({}, lambda line: print(line, file=sys.stderr))
    hidden, weight, labels = inputs(args, dtype_of(args))
    if args.tp > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        dist.init_process_group("gloo")
        trained = weight.requires_grad
        weight = distribute_tensor(weight.detach(), init_device_mesh("cpu", (args.tp,)), [Shard(0)])
        weight.requires_grad_(trained)
    held = rss_bytes()
    step(args.way, hidden, weight, labels)  # the first step: the peak, from the kernel's own high-water mark
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.reps):
        hidden.grad = weight.grad = None
        started = time.perf_counter()
        step(args.way, hidden, weight, labels)
        times.append(time.perf_counter() - started)
    return {"peak_mb": (peak - held) / 2**20, "step_ms": statistics.median(times) * 1e3,
            "dtype": str(hidden.dtype).removeprefix("torch.")}


def gradients(args: argparse.Namespace) -> dict[str, float]:
    """Max relative difference of the two ways' gradients and loss, in float32."""
    from swiftk.contracts.chunked import linear_cross_entropy

    hidden, weight, labels = inputs(args, torch.float32)
    weight.requires_grad_(True)
    scored = labels != IGNORE_INDEX
    full = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    want = torch.autograd.grad(full, (hidden, weight))
    loss = linear_cross_entropy(hidden[scored], weight, labels[scored])
    got = torch.autograd.grad(loss, (hidden, weight))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    return {"grad_hidden_rel": rel(got[0], want[0]), "grad_head_rel": rel(got[1], want[1]),
            "loss_rel": float((loss - full).detach().abs() / full.detach().abs())}


def run_way(way: str, passed: list[str], ranks: int) -> dict[str, Any]:
    """One way in fresh processes (``ranks`` of them, a gloo group, for --tp): rank 0's figures."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, *passed, "--way", way], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(ranks)]
    outs = [proc.communicate() for proc in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        if proc.returncode:
            raise SystemExit(f"{way} failed:\n{err}")
    figures: dict[str, Any] = json.loads(outs[0][0].strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="N: tokens in the micro-batch (8 x 256)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--labelled", type=float, default=0.5, help="share of the tokens that are scored")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="of h, W and the matmuls")
    parser.add_argument("--train-head", action="store_true", help="the head's weight is trained (full fine-tuning)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tp", type=int, default=1, help="processes the head is split over (by vocabulary rows)")
    parser.add_argument("--compile", action="store_true", help="also time the chunked loss compiled")
    parser.add_argument("--way", choices=["full", "chunked", "compiled"], help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    if args.way:
        print(json.dumps(child(args)))
        return
    passed = [a for a in sys.argv[1:]]
    figures: dict[str, Any] = {}
    for way in ("full", "chunked", *(("compiled",) if args.compile else ())):
        figures[way] = run_way(way, [a for a in passed if a != "--compile"], args.tp)
        print(f"{way}: {figures[way]}", file=sys.stderr)
    result = {
        "bench": "chunked_ce", "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
        "labelled": args.labelled, "dtype": args.dtype, "chunked_dtype": figures["chunked"]["dtype"],
        "train_head": args.train_head, "threads": args.threads, "tp": args.tp,
        "full_peak_mb": round(figures["full"]["peak_mb"], 1),
        "chunked_peak_mb": round(figures["chunked"]["peak_mb"], 1),
        "peak_ratio": round(figures["chunked"]["peak_mb"] / figures["full"]["peak_mb"], 3),
        "full_step_ms": round(figures["full"]["step_ms"], 1),
        "chunked_step_ms": round(figures["chunked"]["step_ms"], 1),
        "time_ratio": round(figures["chunked"]["step_ms"] / figures["full"]["step_ms"], 3),
        **({"compiled_peak_mb": round(figures["compiled"]["peak_mb"], 1),
            "compiled_step_ms": round(figures["compiled"]["step_ms"], 1),
            "compiled_vs_chunked_time": round(figures["compiled"]["step_ms"] / figures["chunked"]["step_ms"], 3)}
           if args.compile else {}),
        **{k: float(f"{v:.3g}") for k, v in gradients(args).items()},
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
