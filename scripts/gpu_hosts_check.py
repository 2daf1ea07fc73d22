"""The CUDA paths of plugin hosts, for a lent GPU machine (called by scripts/gpu_check.sh).

A loss in a host on CUDA tensors (sent as CUDA IPC handles to kernel-owned staging buffers, gradients back in
output buffers the kernel allocated) must match the same loss in-process; a host that writes to its CUDA input
changes only the staging copy; each buffer's handle is sent once. Prints PASS/FAIL lines, then one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import swiftk.plugins  # noqa: F401  (registers the built-in losses)
from swiftk.contracts import Batch, ModelOutputs, StepState, lookup
from swiftk.hosts.group import HostGroup, HostSpec, Policy

WRITER = '''
import torch
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_eval_batch(batch, outputs, state):
    outputs.logits.fill_(7.0)  # a misbehaving host: writes to what it was given
    torch.cuda.synchronize()


@hookimpl
def swiftk_reward_compute(completions):
    return {"big": torch.full((8, 1024, 1024), 3.0, device="cuda")}  # 32 MiB back: the output slots must grow
'''
failed = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failed.append(name)


def main() -> int:
    device = torch.device("cuda")
    print("device", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="swiftk-gpu-"))
    (tmp / "writer.py").write_text(WRITER)
    hosts = HostGroup([HostSpec("process:ce", ["swiftk.plugins.losses.cross_entropy"], ["ce"]),
                       HostSpec("process:writer", [str(tmp / "writer.py")], ["writer"])],
                      {"ce": Policy(), "writer": Policy()})
    problems = hosts.start()
    check("hosts_start", not problems, str(problems or "two hosts up"))
    check("build_remote_loss", not hosts.build("loss", "cross_entropy", {}), "cross_entropy built in its host")
    remote = hosts.proxies[("loss", "cross_entropy")]
    local = lookup("loss", "cross_entropy").build()
    figures: dict[str, float] = {}
    try:
        torch.manual_seed(0)
        ids = torch.randint(0, 1000, (8, 256), device=device)
        batch = Batch(ids, ids.clone(), torch.ones_like(ids), int(ids[:, 1:].numel()))
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(8, 256, 1000, device=device, dtype=dtype, requires_grad=True)
            out = remote.swiftk_loss_compute(batch, ModelOutputs(logits))
            out.loss.backward()
            grad_remote, logits.grad = logits.grad.clone(), None
            ref = local.swiftk_loss_compute(batch=batch, outputs=ModelOutputs(logits))
            ref.loss.backward()
            diff = float((grad_remote.float() - logits.grad.float()).abs().max())
            value, expected = float(out.loss.detach()), float(ref.loss.detach())
            same = abs(value - expected) <= 1e-5 * abs(expected) and diff <= 1e-6
            check(f"remote_loss_cuda_{dtype}", same and out.loss.device.type == "cuda",
                  f"loss {value:.6f} vs {expected:.6f}, max grad diff {diff:.2e}")
        host = remote.host
        before = len(host.cuda_handles)
        for _ in range(20):
            remote.swiftk_loss_compute(batch, ModelOutputs(logits)).loss.backward()
        check("ipc_handles_cached", len(host.cuda_handles) == before, f"{before} buffers, none added in 20 calls")

        writer = hosts.module_proxies[0][1]
        state = StepState(0, 1, 0, 0.0, 0, 0.0, str(tmp))
        kept = torch.randn(4, 8, 16, device=device)
        snapshot = kept.clone()
        writer.swiftk_eval_batch(batch, ModelOutputs(kept), state)
        check("input_intact", torch.equal(kept, snapshot), "the host wrote to its staging copy, not the kernel's")

        got = writer.swiftk_reward_compute(["a"])["big"]
        check("cuda_result_grows_output", got.is_cuda and got.shape == (8, 1024, 1024) and bool((got == 3).all()),
              f"a 32 MiB CUDA result came back ({got.device}, all 3.0: {bool((got == 3).all())})")

        big = torch.randn(16, 1024, 1024, device=device)  # 64 MiB
        target = torch.empty_like(big)
        times, copies = [], []
        for _ in range(20):
            torch.cuda.synchronize()
            start = time.perf_counter()
            writer.swiftk_eval_batch(batch, ModelOutputs(big), state)
            times.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            start = time.perf_counter()
            target.copy_(big)
            torch.cuda.synchronize()
            copies.append(time.perf_counter() - start)
        figures = {"cuda_tensor64m_ipc_ms": round(statistics.median(times) * 1e3, 3),
                   "cuda_memcpy64m_ms": round(statistics.median(copies) * 1e3, 3)}
    finally:
        hosts.close()
    print(json.dumps({**figures, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
