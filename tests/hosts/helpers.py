"""Bad plugins, tiny runs with a plugin in a host, and the leak checks every host test ends with."""

from __future__ import annotations

import gc
import os
import re
import textwrap
from pathlib import Path
from typing import TypeVar

from swiftk.contracts.events import Event, StepEvent, of_kind, read
from swiftk.kernel.cli import main

REPO = Path(__file__).resolve().parents[2]

# A loss that behaves at every step but the one named by `at_step`, where it does ACTION.
BAD_LOSS = '''
import os, signal, time
import torch
import torch.nn.functional as F
from swiftk.contracts import LossResult, hookimpl, register_loss, supervised

@register_loss("bad")
class Bad:
    def __init__(self, at_step: int | list[int] = 3) -> None:
        self.at_step = at_step

    @hookimpl
    def swiftk_loss_compute(self, batch, outputs, step):
        if step + 1 in (self.at_step if isinstance(self.at_step, list) else [self.at_step]):
{action}
        logits, labels = supervised(batch, outputs)
        return LossResult(F.cross_entropy(logits.float(), labels, reduction="sum") / batch.num_items_in_batch)
'''


def bad_plugin(tmp_path: Path, action: str) -> Path:
    path = tmp_path / "bad_loss.py"
    path.write_text(BAD_LOSS.format(action=textwrap.indent(textwrap.dedent(action).strip(), " " * 12)))
    return path


def host_config(tmp_path: Path, source: str, loss: str = "bad", steps: int = 5, save_every: int = 2,
                table: str = "", key: str = "path") -> Path:
    """The tiny config, ``steps`` steps without eval, with ``source`` in a host and ``loss`` as the loss."""
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    text = text.replace("[train]\n", f'[train]\nloss_type = "{loss}"\n', 1)
    text = re.sub(r"(?m)^(eval_file|every) = .*$", "", text)  # no eval: these tests are about the loss
    for old, new in (("max_steps = 450", f"max_steps = {steps}"), ("save_every = 150", f"save_every = {save_every}"),
                     ('dir = "runs/tiny_sft"', f'dir = "{tmp_path / "run"}"'), ("batch_size = 64", "batch_size = 8")):
        assert old in text, old
        text = text.replace(old, new)
    plugin = f'[[plugins]]\n{key} = "{source}"\nisolation = "process"\n{table}\n'
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "host.toml"
    path.write_text(plugin + text)
    return path


def run(config: Path, *extra: str) -> int:
    return main(["run", str(config), "--set", 'log.progress="none"', *extra])


E = TypeVar("E", bound=Event)


def events(run_dir: Path, kind: type[E]) -> list[E]:
    return of_kind(read(run_dir / "metrics.jsonl"), kind)


def steps(run_dir: Path) -> dict[int, float]:
    return {r.step: r.loss for r in events(run_dir, StepEvent)}


def host_processes() -> list[int]:
    """Live plugin hosts spawned by this process (whatever state they are in)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"swiftk.hosts" in cmdline and str(os.getpid()).encode() in cmdline:
            found.append(int(entry.name))
    return found


def shared_segments() -> list[str]:
    """memfd segments this process still holds (as fds or mappings) and swiftk names under /dev/shm."""
    gc.collect()
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own fd, already closed
            continue
        if "swiftk" in link:
            held.append(link)
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if "memfd:swiftk" in line]
    named = [p.name for p in Path("/dev/shm").glob("*swiftk*")]
    return held + maps + named


def assert_clean() -> None:
    assert host_processes() == [], "a plugin host outlived its run"
    assert shared_segments() == [], "a shared segment outlived its run"
