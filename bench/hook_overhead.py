"""What a hook costs: a call through swiftk's plugin manager vs a direct method call, and its share of a step.

    .venv/bin/python bench/hook_overhead.py [--calls 200000] [--steps 20]

Prints one JSON line: per-call nanoseconds direct and through pluggy (with 1 and with 5 plugins registered),
the overhead per call, the hook calls the kernel makes per optimizer step, the step time of the tiny Llama
(batch 8 x 256 tokens, bf16 autocast) and the hooks' share of it. Goal: <= 2 us per call, <= 0.5 % of a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from swiftk.contracts import Batch, LossResult, ModelOutputs, StepState, hookimpl
from swiftk.kernel.plugins import new_manager


class StepMetric:
    @hookimpl
    def swiftk_step_end(self, state: StepState, metrics: dict[str, float]) -> dict[str, float] | None:
        return None


class ConstantLoss:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        return LossResult(self.loss)


def per_call_ns(fn, calls: int, repeats: int = 5) -> float:
    """Median over repeats of the mean time of one call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(times)


def hook_costs(calls: int) -> dict[str, float]:
    state = StepState(step=1, max_steps=10, epoch=0, lr=1e-3, tokens_seen=0, elapsed_s=0.0, run_dir="/tmp")
    metrics = {"loss": 1.0, "lr": 1e-3}
    metric = StepMetric()
    one = new_manager()
    one.register(metric)
    five = new_manager()
    for _ in range(5):
        five.register(StepMetric())
    ids = torch.zeros(1, 4, dtype=torch.long)
    batch, outputs = Batch(ids, ids, None, 4), ModelOutputs(torch.zeros(1, 4, 3))
    loss = ConstantLoss(torch.zeros(()))
    lossy = new_manager()
    lossy.register(loss)
    return {
        "direct_ns": per_call_ns(lambda: metric.swiftk_step_end(state=state, metrics=metrics), calls),
        "pluggy_1_plugin_ns": per_call_ns(lambda: one.hook.swiftk_step_end(state=state, metrics=metrics), calls),
        "pluggy_5_plugins_ns": per_call_ns(lambda: five.hook.swiftk_step_end(state=state, metrics=metrics), calls),
        "loss_direct_ns": per_call_ns(lambda: loss.swiftk_loss_compute(batch=batch, outputs=outputs), calls),
        "loss_pluggy_ns": per_call_ns(
            lambda: lossy.hook.swiftk_loss_compute(batch=batch, outputs=outputs, step=1, state=state), calls),
    }


def tiny_step_ms(steps: int) -> float:
    """Median step time of the tiny Llama the kernel benchmark uses, trained by a plain loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=103,
                                         tie_word_embeddings=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 103, (8, 256))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    costs = hook_costs(args.calls)
    step_ms = tiny_step_ms(args.steps)
    overhead = costs["pluggy_1_plugin_ns"] - costs["direct_ns"]
    # Per optimizer step the kernel makes 2 calls per micro-batch (batch_start, loss_compute) and 2 per step
    # (step_end, metrics_logged); grad_accum = 1 here.
    calls_per_step = 4
    share = calls_per_step * costs["pluggy_1_plugin_ns"] / (step_ms * 1e6) * 100
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    print(json.dumps({
        **{k: round(v, 1) for k, v in costs.items()},
        "overhead_ns_per_call": round(overhead, 1),
        "hook_calls_per_step": calls_per_step,
        "tiny_step_ms": round(step_ms, 2),
        "hooks_share_of_step_pct": round(share, 5),
    }))


if __name__ == "__main__":
    main()
