"""What a plugin host costs: a small call, a 64 MiB tensor, and a training step with the loss in a host.

    .venv/bin/python bench/host_overhead.py [--calls 2000] [--steps 30] [--rounds 2]

Prints one JSON line:
- ``inproc_hook_us``: a trivial hook through the kernel's plugin manager, in-process;
- ``host_rtt_us``: the same hook served by a host (encode, a round trip on the session's Unix socket, decode),
  median; ``socket_rtt_us``: a bare round trip of a 5-byte packet on a SOCK_SEQPACKET socketpair between two
  processes, the transport's floor on this machine; ``zmq_rtt_us``: the same through a zmq PAIR socket (the
  transport calls used before);
- ``tensor64m_shm_ms``: a 64 MiB float32 tensor to a host (copied into a shared segment, mapped read-only
  there, one element read back), median; ``tensor64m_kept_ms``: the same tensor sent again, kept in its segment
  from the second call (nothing copied); ``tensor64m_zmq_ms``: the same bytes sent through zmq to a process
  that wraps them in a tensor and answers; ``memcpy64m_ms``: an in-process 64 MiB copy;
- ``head_loss_kept_ms`` / ``head_loss_copied_ms``: a cross-entropy loss in a host on 512 tokens' hidden states
  and a frozen LM head of SmolLM2's shape (49 152 x 576, 113 MB), forward and backward, median: with the head
  kept in its shared segment (copied once) and copied in at every call (as before it was kept); and the same
  loss in-process, ``head_loss_inproc_ms``;
- ``remote_loss_step_ratio``: median step time of the tiny-model SFT run with the loss in a host divided by
  the same run in-process, median over ``--rounds``: in each round the two runs train in processes of their own,
  a step of one then a step of the other (``lockstep.py``: the VM's drift in speed cancels out of the ratio);
  ``per_round_remote_loss_step_ratio``, and ``remote_loss_other_cores``, what other processes kept busy.
Goals (issue 24): host_rtt_us <= 60, tensor64m_shm_ms <= 1.5 x memcpy64m_ms, remote_loss_step_ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from swiftk.contracts import Batch, LossResult, ModelOutputs, StepState, events, hookimpl, token_cross_entropy
from swiftk.hosts.group import HostGroup, HostSpec, Policy
from swiftk.kernel.plugins import new_manager

sys.path.insert(0, str(Path(__file__).parent))
import lockstep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLUGIN = '''
from swiftk.contracts import LossResult, hookimpl, token_cross_entropy

@hookimpl
def swiftk_step_end(state, metrics):
    return None

@hookimpl
def swiftk_eval_batch(batch, outputs, state):
    float(outputs.logits[0, 0, 0])  # touches the mapping: the bytes are there, zero-copy

@hookimpl
def swiftk_loss_compute(batch, outputs):
    return LossResult(token_cross_entropy(outputs, batch.labels) / batch.num_items_in_batch)
'''
SOCKET_ECHO = "import socket, sys\ns = socket.socket(fileno=int(sys.argv[1]))\nwhile True:\n    s.send(s.recv(64))\n"
ECHO = '''
import sys, zmq, torch
s = zmq.Context().socket(zmq.PAIR); s.connect(sys.argv[1])
while True:
    frame = s.recv(copy=False)
    t = torch.frombuffer(frame.buffer, dtype=torch.float32)
    s.send(str(float(t[0])).encode())
'''


class StepEnd:
    @hookimpl
    def swiftk_step_end(self, state: StepState, metrics: dict[str, float]) -> None:
        return None


def median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def host_figures(calls: int, tmp: Path) -> dict[str, float]:
    state = StepState(0, 1, 0, 0.0, 0, 0.0, str(tmp))
    manager = new_manager()
    manager.register(StepEnd())
    inproc = median_us(lambda: manager.hook.swiftk_step_end(state=state, metrics={"loss": 1.0}), calls)

    (tmp / "plugin.py").write_text(PLUGIN)
    hosts = HostGroup([HostSpec("process:bench", [str(tmp / "plugin.py")], ["bench"])], {"bench": Policy()})
    assert hosts.start() == []
    remote = new_manager()
    remote.register(hosts.module_proxies[0][1])
    try:
        rtt = median_us(lambda: remote.hook.swiftk_step_end(state=state, metrics={"loss": 1.0}), calls)
        logits = torch.randn(16, 1024, 1024)  # 64 MiB
        ids = torch.zeros(1, 1, dtype=torch.long)
        batch = Batch(ids, ids, None, 1)
        outputs = ModelOutputs(logits)
        # A new tensor object each call (fresh logits) is copied in; the same one sent again is kept.
        shm = median_us(lambda: remote.hook.swiftk_eval_batch(
            batch=batch, outputs=ModelOutputs(logits.view_as(logits)), state=state), 30) / 1e3
        kept_ms = median_us(lambda: remote.hook.swiftk_eval_batch(batch=batch, outputs=outputs, state=state),
                            30) / 1e3
        head_loss = head_loss_ms(remote, state)
    finally:
        hosts.close()

    target = torch.empty_like(logits)
    memcpy = median_us(lambda: target.copy_(logits), 30) / 1e3

    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    endpoint = f"ipc://@swiftk-bench-{os.getpid()}"
    sock.bind(endpoint)
    echo = subprocess.Popen([sys.executable, "-c", ECHO, endpoint])
    try:
        sock.send(logits.numpy(), copy=False)
        sock.recv()  # warm: the echo process has imported torch
        through_zmq = median_us(lambda: (sock.send(logits.numpy(), copy=False), sock.recv()), 30) / 1e3
        small = torch.ones(1).numpy()
        zmq_rtt = median_us(lambda: (sock.send(small), sock.recv()), calls)  # the transport's floor
    finally:
        echo.kill()
        echo.wait()
        sock.close(linger=0)
        context.term()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    echo = subprocess.Popen([sys.executable, "-c", SOCKET_ECHO, str(child.fileno())], pass_fds=(child.fileno(),))
    child.close()
    try:
        socket_rtt = median_us(lambda: (parent.send(b"\x00ping"), parent.recv(64)), calls)
    finally:
        echo.kill()
        echo.wait()
        parent.close()
    return {"inproc_hook_us": round(inproc, 2), "host_rtt_us": round(rtt, 1), "socket_rtt_us": round(socket_rtt, 1),
            "zmq_rtt_us": round(zmq_rtt, 1),
            "tensor64m_shm_ms": round(shm, 2),
            "tensor64m_zmq_ms": round(through_zmq, 2), "memcpy64m_ms": round(memcpy, 2),
            "shm_vs_memcpy": round(shm / memcpy, 2), "tensor64m_kept_ms": round(kept_ms, 2), **head_loss}


def head_loss_ms(remote: Any, state: StepState) -> dict[str, float]:
    """A loss in the host on hidden states and SmolLM2's frozen head: kept between calls, copied every call."""
    g = torch.Generator().manual_seed(0)
    head = torch.randn(49152, 576, generator=g) * 0.02
    hidden = torch.randn(1, 512, 576, generator=g)
    labels = torch.randint(0, 49152, (1, 512), generator=g)
    batch = Batch(labels, labels, None, 511)

    def loss(where: Any, weight: torch.Tensor = head) -> None:
        outputs = ModelOutputs(hidden=hidden.clone().requires_grad_(), head=weight)
        where(outputs).loss.backward()

    in_host = lambda o: remote.hook.swiftk_loss_compute(batch=batch, outputs=o, step=0, state=state)  # noqa: E731
    in_process = lambda o: LossResult(token_cross_entropy(o, labels) / 511)  # noqa: E731
    figures = {"head_loss_kept_ms": median_us(lambda: loss(in_host), 12) / 1e3}
    # a new view of the head each call is a new tensor: copied in every call, as before the head was kept
    figures["head_loss_copied_ms"] = median_us(lambda: loss(in_host, head.view_as(head)), 12) / 1e3
    figures["head_loss_inproc_ms"] = median_us(lambda: loss(in_process), 12) / 1e3
    return {k: round(v, 1) for k, v in figures.items()}


def tiny_config(steps: int, tmp: Path) -> str:
    """The tiny-model SFT config for ``steps`` steps into ``tmp/run``, without eval or checkpoints."""
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    text = re.sub(r"(?m)^(eval_file|every) = .*$", "", text)
    for key, value in (("max_steps", str(steps)), ("save_every", "100000"), ("dir", f'"{tmp / "run"}"')):
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    return text


def in_turns(configs: dict[str, Path], steps: int, first: int, tmp: Path) -> tuple[dict[str, float], float]:
    """One ``swiftk run`` of each config, each in its own process, their steps taken in turns
    (``lockstep.Turns``): the median step time of each (its first 5 steps dropped), and the cores other processes
    kept busy meanwhile."""
    turns = lockstep.Turns(tmp)
    runs: dict[str, subprocess.Popen[bytes]] = {}

    def finish(name: str) -> float:
        if (code := runs[name].wait()) != 0:
            raise SystemExit(f"swiftk run {configs[name]} exited with {code}")
        records = events.steps(events.read(configs[name].parent / name / "metrics.jsonl"))[5:]
        return statistics.median(r.tokens / r.tokens_per_s for r in records)

    def dead(name: str) -> str | None:
        code = runs[name].poll()
        return None if code is None else f"swiftk run {configs[name]} exited with {code}"

    path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    try:
        for name, config in configs.items():
            env = os.environ | turns.env(name, steps) | {"PYTHONPATH": os.pathsep.join(path)}
            runs[name] = subprocess.Popen(
                [sys.executable, "-m", "swiftk", "run", str(config), "--overwrite", "--set", 'log.progress="none"',
                 "--set", f'output.dir="{config.parent / name}"'], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        return turns.take(list(configs), steps, first, finish, dead)
    finally:
        turns.close()
        for run in runs.values():
            if run.poll() is None:
                run.kill()
            run.wait()


def remote_loss_ratio(steps: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """The tiny-model SFT run with its loss in a host against the same run in-process, in turns, ``rounds`` times
    with fresh processes."""
    (tmp / "turns.py").write_text(lockstep.PLUGIN, encoding="utf-8")
    text = f'[[plugins]]\npath = "{tmp / "turns.py"}"\n\n' + tiny_config(steps, tmp)
    configs = {"local": tmp / "local.toml", "remote": tmp / "remote.toml"}
    configs["local"].write_text(text)
    configs["remote"].write_text(
        '[[plugins]]\nmodule = "swiftk.plugins.losses.cross_entropy"\nisolation = "process"\n\n' + text)
    ratios, local, remote, others = [], [], [], []
    for round_ in range(rounds):
        median, busy = in_turns(configs, steps, round_, tmp)
        local.append(median["local"])
        remote.append(median["remote"])
        ratios.append(median["remote"] / median["local"])
        others.append(busy)
    return {"inproc_step_ms": round(statistics.median(local) * 1e3, 1),
            "remote_loss_step_ms": round(statistics.median(remote) * 1e3, 1),
            "remote_loss_step_ratio": round(statistics.median(ratios), 3),
            "per_round_remote_loss_step_ratio": [round(r, 3) for r in ratios],
            "remote_loss_other_cores": [round(o, 2) for o in others]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="swiftk-bench-") as tmp:
        figures = host_figures(args.calls, Path(tmp))
        figures.update(remote_loss_ratio(args.steps, args.rounds, Path(tmp)))
    figures["torch_threads"] = torch.get_num_threads()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
