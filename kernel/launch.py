"""``swiftk run`` with ``[distributed] num_processes > 1`` (or ``nnodes > 1``) relaunches itself under torchrun's
elastic agent: this process becomes the agent of its node, each rank runs ``python -m swiftk run ...`` with
RANK/WORLD_SIZE/MASTER_* set, and the agent's exit is turned into one clear line (which rank failed, how, and
where to resume from).

Several machines: run the same command on each, with ``--set distributed.node_rank=N``; node 0 hosts the
rendezvous at ``master_addr:master_port`` (torchrun's static rendezvous).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from swiftk.kernel.dist import DistributedError, first_line, launched

RESUME_HINT = "continue with: swiftk run {args} --resume"


def wanted(options: Any) -> bool:
    """Relaunch: several processes or nodes asked for, and no launcher started this one."""
    return (options.num_processes > 1 or options.nnodes > 1) and not launched()


def relaunch(options: Any, args: list[str], output_dir: str) -> int:
    """Run ``swiftk <args>`` on ``num_processes`` ranks of this node; returns the exit code to leave with."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = free_port(options.master_addr) if options.master_port == 0 else options.master_port
    if options.node_rank == 0:
        check_port(options.master_addr, port)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.num_processes)))
    config = LaunchConfig(
        min_nodes=options.nnodes, max_nodes=options.nnodes, nproc_per_node=options.num_processes,
        run_id="swiftk", rdzv_backend="static", rdzv_endpoint=f"{options.master_addr}:{port}",
        rdzv_configs={"rank": options.node_rank, "timeout": int(options.join_timeout_s)},
        max_restarts=0, monitor_interval=0.2, start_method="spawn",
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",  # SIGINT: see forward_interrupt
        shutdown_timeout=int(options.timeout_s),
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    previous = signal.signal(signal.SIGINT, forward_interrupt)
    print(f"swiftk: {options.num_processes} processes on node {options.node_rank} of {options.nnodes} "
          f"({options.backend}, rendezvous {options.master_addr}:{port})", flush=True)
    resume = RESUME_HINT.format(args=" ".join(a for a in args[1:] if not a.startswith("--resume")))
    try:
        elastic_launch(config, sys.executable)(*["-m", "swiftk", *args])
    except ChildFailedError as exc:
        return failed(exc.failures, output_dir, resume)
    except SignalException as exc:
        print(f"swiftk: {exc.sigval.name}: the ranks were asked to stop after their step and save a checkpoint; "
              f"{resume}", file=sys.stderr)
        return 130
    except Exception as exc:  # the rendezvous: a node that never came, an unreachable node 0
        raise DistributedError(rendezvous_problem(exc, options, port)) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def forward_interrupt(signum: int, frame: object) -> None:
    """Ctrl-C: the terminal sent SIGINT to every rank already; a SIGINT sent to this process alone is passed on
    as SIGTERM (which a rank treats as a second stop request, never as an abort). A second one aborts."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import psutil

    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    print("\nswiftk: stopping every rank after its step (Ctrl-C again to abort now)", file=sys.stderr, flush=True)


def failed(failures: dict[int, Any], output_dir: str, resume: str) -> int:
    """One line per failed rank, the last checkpoint, and the exit code (130 if every rank was interrupted)."""
    from swiftk.kernel.checkpoint import latest_checkpoint

    codes = {f.exitcode for f in failures.values()}
    if 130 in codes and codes <= {130, -signal.SIGTERM}:  # interrupted; a rank still exiting was told to stop
        print(f"swiftk: interrupted; {resume}", file=sys.stderr)
        return 130
    ordered = sorted(failures.items(), key=lambda item: item[1].timestamp)
    (rank, first), others = ordered[0], ordered[1:]
    print(f"swiftk: rank {rank} (pid {first.pid}) {how_it_ended(first)} first; the other ranks were stopped"
          + "".join(f", rank {r} {how_it_ended(f)}" for r, f in others) + ".", file=sys.stderr)
    latest = latest_checkpoint(Path(output_dir))
    print(f"swiftk: last checkpoint: {latest or 'none'}" + (f"; {resume}" if latest else ""), file=sys.stderr)
    return 2 if codes == {2} else 1


def how_it_ended(failure: Any) -> str:
    return f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"


def free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


def check_port(addr: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((addr, port))
        except OSError as exc:
            raise DistributedError(
                f"[distributed] master_port {port} on {addr} is not free ({exc.strerror}): another run or service "
                f"holds it. Choose another port (--set distributed.master_port=N), or 0 for a free one on one "
                f"node.") from None


def rendezvous_problem(exc: Exception, options: Any, port: int) -> str:
    text = first_line(exc)
    where = f"{options.master_addr}:{port}"
    if options.node_rank == 0 and "clients joined" in text:
        return (f"not every node joined the rendezvous at {where} within {options.join_timeout_s:g} s "
                f"([distributed] join_timeout_s): {text}. Start `swiftk run` on every node with its own "
                f"--set distributed.node_rank=N (1 .. {options.nnodes - 1}).")
    return (f"node {options.node_rank} could not join the rendezvous at {where} within {options.join_timeout_s:g} s "
            f"({text}). Is node 0 started, is master_addr reachable from here and the port open?")
