"""How fast an edit reaches a running training, and what a swap costs the step loop.

    .venv/bin/python bench/reload_latency.py [--edits 20] [--host-edits 5]

Trains the tiny model with a loss from a watched plugin file, rewrites the file ``--edits`` times while it
runs (in-process), then ``--host-edits`` times with the loss in a plugin host. Prints one JSON line:
- ``reload_ms_median``: save -> new code imported, checked and built, ready to swap (in-process);
- ``swap_ms_median``: what the step boundary spends on the probe and the swap (in-process);
- ``host_reload_ms_median``: save -> a fresh host with the new code started and built;
- ``host_swap_stall_ms``: extra time the loop spends at a host plugin's swap: the swap itself, plus the
  first step on the new host minus the median step.
Goals: ``reload_ms_median`` <= 300, ``host_swap_stall_ms`` <= 50.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from swiftk.contracts import events
from swiftk.kernel.cli import main as swiftk

REPO = Path(__file__).resolve().parents[1]
LOSS = '''
import torch.nn.functional as F
from swiftk.contracts import LossResult, hookimpl, register_loss, supervised

@register_loss("live")
class Live:
    @hookimpl
    def swiftk_loss_compute(self, batch, outputs):
        logits, labels = supervised(batch, outputs)
        return LossResult(FACTOR * F.cross_entropy(logits.float(), labels, reduction="sum")
                          / batch.num_items_in_batch)
'''


def run_with_edits(tmp: Path, isolation: str, edits: int, gap_s: float) -> list[events.Event]:
    (tmp / "live.py").write_text(LOSS.replace("FACTOR", "1.0"))
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    text = re.sub(r"(?m)^(eval_file|every) = .*$", "", text)
    steps = int((edits + 2) * gap_s / 0.015) + 40  # outlasts the edits (a step takes 20-30 ms)
    for key, value in (("max_steps", str(steps)), ("save_every", "100000"), ("dir", f'"{tmp / "run"}"'),
                       ("batch_size", "8")):
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
    text = text.replace("[train]\n", '[train]\nloss_type = "live"\n', 1)
    config = tmp / "c.toml"
    config.write_text(f'[[plugins]]\npath = "{tmp / "live.py"}"\nisolation = "{isolation}"\nwatch = true\n\n{text}')
    done = threading.Event()

    def editor() -> None:
        while not (tmp / "run" / "metrics.jsonl").exists() or \
                not any(r.step >= 3 for r in events.read(tmp / "run" / "metrics.jsonl")):
            time.sleep(0.01)
        for i in range(edits):
            (tmp / "live.py").write_text(LOSS.replace("FACTOR", f"1.0 + {i + 1} * 1e-3"))
            time.sleep(gap_s)
        done.set()

    thread = threading.Thread(target=editor, daemon=True)
    thread.start()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line only
        assert swiftk(["run", str(config), "--overwrite", "--set", 'log.progress="none"']) == 0
    thread.join()
    return events.read(tmp / "run" / "metrics.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--host-edits", type=int, default=5)
    args = parser.parse_args()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="swiftk-reload-") as tmp:
        lines = run_with_edits(Path(tmp), "inline", args.edits, 0.6)
        reloads = events.of_kind(lines, events.PluginReloadedEvent)
        figures["reloads"] = len(reloads)
        figures["reload_ms_median"] = statistics.median(r.ready_ms for r in reloads)
        figures["swap_ms_median"] = statistics.median(r.swap_ms for r in reloads)
    with tempfile.TemporaryDirectory(prefix="swiftk-reload-") as tmp:
        lines = run_with_edits(Path(tmp), "process", args.host_edits, 2.5)
        reloads = events.of_kind(lines, events.PluginReloadedEvent)
        steps = {r.step: r.tokens / r.tokens_per_s * 1e3 for r in events.steps(lines)}
        typical = statistics.median(steps.values())
        stalls = [r.swap_ms + max(0.0, steps.get(r.step + 1, typical) - typical) for r in reloads]
        figures["host_reloads"] = len(reloads)
        figures["host_reload_ms_median"] = statistics.median(r.ready_ms for r in reloads)
        figures["host_swap_stall_ms"] = round(statistics.median(stalls), 1)
        figures["host_swap_stalls_ms"] = [round(stall, 1) for stall in stalls]  # each, in order
        figures["step_ms_median"] = round(typical, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(main())
