"""What the tenant sandbox costs over a plain plugin host: a small call, a 64 MiB tensor, the start, a training step.

    .venv/bin/python bench/sandbox_overhead.py [--calls 2000] [--starts 5] [--steps 30] [--rounds 2]

Needs what the sandbox needs (root on Linux, pyseccomp). Prints one JSON line:
- ``host_rtt_us`` / ``sandbox_rtt_us``: the same small hook call (``swiftk_step_end``) served by a plain host
  (isolation = "process") and by a tenant's sandboxed host (own uid, namespaces, seccomp, Landlock, rlimits,
  cgroups), median over interleaved blocks of calls; ``sandbox_rtt_ratio`` is their ratio;
- ``host_tensor64m_ms`` / ``sandbox_tensor64m_ms``: a 64 MiB float32 tensor handed to each (shared memory,
  mapped read-only) and one element read back;
- ``host_start_s`` / ``sandbox_start_s``: spawn to a finished handshake (torch imported, the plugin loaded), median;
- ``sandbox_step_ratio``: median step time of the tiny-model SFT run with a sandboxed step-end plugin (called
  every step) divided by the same run without it (interleaved rounds).
Goals: sandbox_rtt_us <= 1.1 x host_rtt_us, sandbox_start_s <= 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from host_overhead import PLUGIN, interleaved, median_us, tiny_config  # bench/ is on sys.path when run

from swiftk.contracts import Batch, ModelOutputs, StepState
from swiftk.hosts import tenants
from swiftk.hosts.group import HostGroup, HostSpec, Policy
from swiftk.kernel.plugins import new_manager

REPO = Path(__file__).resolve().parents[1]


def specs(tmp: Path) -> dict[str, HostSpec]:
    plugin = tmp / "plugin.py"
    plugin.write_text(PLUGIN)
    layers, missing, _ = tenants.plan(None)
    if missing:
        raise SystemExit(tenants.unavailable_message(missing, None))
    tenant = tenants.Tenant("bench", tenants.tenant_uid("bench", 61000, set()), str(tmp / "scratch"))
    return {"host": HostSpec("process:bench", [str(plugin)], ["bench"]),
            "sandbox": HostSpec("sandbox:bench/bench", [str(plugin)], ["bench"], tenant.memory_mb, tenant,
                                tuple(layers))}


def started(spec: HostSpec) -> tuple[HostGroup, float]:
    group = HostGroup([spec], {"bench": Policy()})
    begin = time.perf_counter()
    problems = group.start()
    elapsed = time.perf_counter() - begin
    if problems:
        group.close()
        raise SystemExit("; ".join(problems))
    return group, elapsed


def call_figures(calls: int, starts: int, tmp: Path) -> dict[str, float]:
    state = StepState(0, 1, 0, 0.0, 0, 0.0, str(tmp))
    ids = torch.zeros(1, 1, dtype=torch.long)
    batch, logits = Batch(ids, ids, None, 1), torch.randn(16, 1024, 1024)  # 64 MiB of logits
    figures: dict[str, float] = {}
    kinds = specs(tmp)
    for kind, spec in kinds.items():
        times = []
        for _ in range(starts):
            group, elapsed = started(spec)
            group.close()
            times.append(elapsed)
        figures[f"{kind}_start_s"] = round(statistics.median(times), 3)
    groups = {kind: started(spec)[0] for kind, spec in kinds.items()}
    try:
        managers = {}
        for kind, group in groups.items():
            managers[kind] = new_manager()
            managers[kind].register(group.module_proxies[0][1])
        rtts: dict[str, list[float]] = {kind: [] for kind in groups}
        for _ in range(20):  # interleaved blocks: both see the same machine load (it drifts on a shared VM)
            for kind, manager in managers.items():
                rtts[kind].append(median_us(lambda m=manager: m.hook.swiftk_step_end(state=state, metrics={}),
                                            max(calls // 20, 1)))
        for kind, manager in managers.items():
            figures[f"{kind}_rtt_us"] = round(statistics.median(rtts[kind]), 1)
            figures[f"{kind}_tensor64m_ms"] = round(median_us(  # a new tensor object each call, as fresh logits:
                lambda m=manager: m.hook.swiftk_eval_batch(  # copied each call (the same one would be kept)
                    batch=batch, outputs=ModelOutputs(logits.view_as(logits)), state=state), 30) / 1e3, 2)
    finally:
        for group in groups.values():
            group.close()
    figures["sandbox_rtt_ratio"] = round(figures["sandbox_rtt_us"] / figures["host_rtt_us"], 3)
    return figures


def step_ratio(steps: int, rounds: int, tmp: Path) -> dict[str, float]:
    text = tiny_config(steps, tmp)
    plain, sandboxed = tmp / "plain.toml", tmp / "sandboxed.toml"
    plain.write_text(text)
    sandboxed.write_text(f'[tenants.bench]\nplugins = ["{tmp / "plugin.py"}"]\nscratch = "{tmp / "scratch"}"\n\n'
                         + text)
    median = interleaved({"plain": plain, "sandboxed": sandboxed}, rounds)
    plain_s, sandboxed_s = median["plain"], median["sandboxed"]
    return {"plain_step_ms": round(plain_s * 1e3, 1), "sandboxed_step_ms": round(sandboxed_s * 1e3, 1),
            "sandbox_step_ratio": round(sandboxed_s / plain_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="swiftk-bench-") as tmp:
        Path(tmp).chmod(0o755)
        figures = call_figures(args.calls, args.starts, Path(tmp))
        figures.update(step_ratio(args.steps, args.rounds, Path(tmp)))
    figures["torch_threads"] = torch.get_num_threads()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
