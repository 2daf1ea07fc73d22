"""Many processes: process-group setup and teardown, and the agreements ranks make with collectives. What the
loop asks to wrap, backward, step and checkpoint is a parallel engine (``kernel.parallel``: none, DDP, FSDP2,
DeepSpeed ZeRO).

    setup()      join (a rank that never joins is named), init_process_group (gloo for CPU tensors, nccl for CUDA)
    agreements   sum/mean of metrics, "any rank asked to stop", "did any rank's plugin fail", same config/code
    shutdown()   barrier + destroy_process_group on every path (ZeRO-3 aborts at exit without them)

A process started by ``swiftk run`` with ``num_processes > 1`` is relaunched by ``kernel.launch``; one started by
torchrun or the DeepSpeed launcher is recognised from its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from swiftk.kernel.errors import SwiftkError


class DistributedError(SwiftkError):
    """The ranks cannot work together (a rank never joined, died, or differs in config or plugin code)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def where(self, rank: int) -> str:
        """``rank 3 (node_rank 1, local rank 1)``: where to look for a rank's log."""
        per_node = max(self.local_world_size, 1)
        return f"rank {rank} (node_rank {rank // per_node}, local rank {rank % per_node})"


def from_env() -> DistInfo:
    """Rank and world size as torchrun / the DeepSpeed launcher set them (defaults: one process)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1))),
    )


def launched() -> bool:
    """Started by a launcher (torchrun, the DeepSpeed launcher, ``swiftk run``'s own relaunch)?"""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------------------------------ setup and teardown


STORE: dist.Store | None = None  # the rendezvous store, once this rank has joined


def store_publish(key: str, value: str) -> None:
    assert STORE is not None
    STORE.set(key, value)


def store_fetch(key: str, timeout_s: float) -> str:
    """``key``'s value, waiting up to ``timeout_s`` for another rank to set it."""
    assert STORE is not None
    try:
        STORE.wait([key], timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistStoreError):
        raise DistributedError(f"no rank set {key} within {timeout_s:g} s") from None
    return bytes(STORE.get(key)).decode()


def setup(options: Any, device: str) -> DistInfo:
    """Join the other ranks and start the process group (``backend_spec``); a no-op outside a launcher."""
    info = from_env()
    if not launched() or active():
        return info
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(info.local_rank)
    global STORE
    store = STORE = join(info, options.join_timeout_s)
    dist.init_process_group(backend_spec(cuda), store=dist.PrefixStore("swiftk/pg", store), rank=info.rank,
                            world_size=info.world_size, timeout=timedelta(seconds=options.timeout_s))
    return info


def backend_spec(cuda: bool) -> str:
    """The process group's backend per device type. The ranks' agreements (stops, failures, metrics) all-reduce
    CPU tensors even on GPUs, and NCCL has no CPU backend: gloo carries those, NCCL the model's CUDA tensors."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def join(info: DistInfo, timeout_s: float) -> dist.Store:
    """Every rank checks in at the rendezvous store; after ``timeout_s`` the ranks still missing are named.

    Under torchrun the store is the agent's; under another launcher rank 0 hosts it (as ``env://`` would)."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(addr, port, info.world_size, is_master=info.is_main and not agent_store,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except (RuntimeError, dist.DistStoreError) as exc:
        raise DistributedError(f"rank {info.rank} cannot reach the rendezvous at {addr}:{port}: {first_line(exc)}. "
                               f"Is the port in use or blocked? Set [distributed] master_port.") from None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    keys = [f"swiftk/joined/{attempt}/{rank}" for rank in range(info.world_size)]
    store.set(keys[info.rank], str(os.getpid()))
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except (RuntimeError, dist.DistStoreError):
        missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
        raise DistributedError(
            f"{', '.join(info.where(r) for r in missing)} did not join within {timeout_s:g} s "
            f"([distributed] join_timeout_s). Check that every node was started with the same config and its own "
            f"node_rank, and look at the missing rank's log.") from None
    return store


def shutdown(clean: bool) -> None:
    """Leave the process group. After a clean run every rank waits for the others first (a ZeRO-3 rank that
    exits early aborts its peers); after an error, no barrier: a peer may be gone."""
    if not active():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ agreements


def sum_across_ranks(value: int | float) -> float:
    """Sum a scalar over all ranks (identity in a single process)."""
    if not active():
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that reported it (plugins' per-rank metrics)."""
    if not active():
        return values
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    keys = dict.fromkeys(k for g in gathered for k in g)
    return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}


def any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over the ranks: a stop asked for on one rank (a signal, early stopping) stops them all
    at the same step."""
    if not active():
        return list(flags)
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


@contextlib.contextmanager
def agreed(what: str, step: int) -> Iterator[None]:
    """Run the block on every rank, then agree on whether it failed anywhere: a rank whose plugin raised tells
    the others before re-raising, so no rank waits forever in the next collective for one that left."""
    try:
        yield
    except BaseException:
        outcome(True, what, step)
        raise
    outcome(False, what, step)


def outcome(failed: bool, what: str, step: int) -> None:
    if not active():
        return
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32)
    flags[dist.get_rank()] = int(failed)
    dist.all_reduce(flags)
    bad = [rank for rank, flag in enumerate(flags.tolist()) if flag]
    if bad and not failed:
        info = from_env()
        raise DistributedError(f"{', '.join(info.where(r) for r in bad)} failed in {what} at step {step + 1}; "
                               f"every rank stops (see that rank's error above).")


def gather_problems(problems: list[str]) -> list[str]:
    """This rank's config and plugin problems, then every other rank's, named by rank: a problem that only one
    node has (a missing file, a plugin not installed there) stops every rank with the same message."""
    if not active():
        return problems
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    info = from_env()
    others = [f"{info.where(rank)}: {p}" for rank, theirs in enumerate(gathered) if rank != info.rank
              for p in theirs if p not in problems]
    return problems + others


def check_same(config: dict[str, Any], code_hashes: dict[str, str]) -> None:
    """Every rank runs the same config (but for node_rank) and the same plugin code; raise naming what differs."""
    if not active():
        return
    config = {**config, "distributed": {**config.get("distributed", {}), "node_rank": None}}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (digest, code_hashes))
    info, problems = from_env(), []
    for rank, (other_digest, other_code) in enumerate(gathered):
        if other_digest != gathered[0][0]:
            problems.append(f"{info.where(rank)} runs another config than rank 0 (hash {other_digest} vs "
                            f"{gathered[0][0]}): start every node with the same file and --set values")
        for name in sorted(set(other_code) | set(gathered[0][1])):
            if other_code.get(name) != gathered[0][1].get(name):
                problems.append(f"{info.where(rank)}: plugin '{name}' has code {other_code.get(name)} where rank 0 "
                                f"has {gathered[0][1].get(name)}: install the same plugin files on every node")
    if problems:
        raise DistributedError("the ranks differ:\n  " + "\n  ".join(problems))


def lost_peer(exc: BaseException, step: int | None = None) -> DistributedError | None:
    """A collective that failed because another rank is gone, as a one-line error (None: not that)."""
    text = str(exc)
    if not (active() and isinstance(exc, RuntimeError) and any(m in text for m in LOST_PEER)):
        return None
    return DistributedError(f"rank {dist.get_rank()} lost contact with another rank"
                            + (f" at step {step}" if step is not None else "") + f" ({first_line(exc)[:160]}); "
                            f"the launcher names the rank that failed first, and the last checkpoint resumes.")


LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out", "timed out",
             "NCCL communicator was aborted", "Socket Timeout")


def barrier() -> None:
    if active():
        dist.barrier()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------ saving


def save_gathered(model: torch.nn.Module, tokenizer: Any, out_dir: Path, weights: dict[str, torch.Tensor]) -> Path:
    """The final model (or PEFT adapter) folder of a sharded run, from the gathered ``weights`` (rank 0)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=weights)  # type: ignore[operator]
    tokenizer.save_pretrained(out_dir)
    return out_dir


def config_problems(options: Any) -> list[str]:
    """What can be known about [distributed] before anything starts: how this process was started, and what the
    chosen engine needs (DeepSpeed installed, its JSON readable)."""
    from swiftk.kernel.parallel import engine_class

    problems = []
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not launched():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        problems.append(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} not: this process "
                        f"would train alone. Start it through torchrun or the DeepSpeed launcher, or set "
                        f"[distributed] num_processes and let `swiftk run` launch the ranks")
    return problems + engine_class(options.backend).problems(options)
