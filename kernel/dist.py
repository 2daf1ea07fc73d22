"""Many processes on PyTorch's and DeepSpeed's engines: process-group setup and teardown, the agreements ranks
make with collectives, and ``Parallel``, the one object the loop asks to wrap, backward, step and checkpoint.

    setup()      join (a rank that never joins is named), init_process_group (gloo for CPU tensors, nccl for CUDA)
    Parallel     single process | DDP | FSDP2 (fully_shard per decoder layer) | DeepSpeed ZeRO-2/3
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
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
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


# ------------------------------------------------------------------------------------------ the engines


@dataclass
class Parallel:
    """How the model trains across ranks. The default is one process: every call is the plain PyTorch one."""

    backend: str = "single"  # "single" | "ddp" | "fsdp" | "deepspeed"
    info: DistInfo = field(default_factory=DistInfo)
    options: Any = None  # the [distributed] table
    engine: Any = None  # the DeepSpeed engine
    micro_steps: int = 0

    @property
    def sharded(self) -> bool:
        """Parameters live in pieces across ranks: forward passes (eval, generation) run on every rank."""
        return self.backend == "fsdp" or (self.backend == "deepspeed" and self.zero_stage == 3)

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage()) if self.engine is not None else 0

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        """DDP or FSDP2 around the model (before the optimizer is built: FSDP2 replaces the parameters)."""
        if self.backend == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            cuda = device.type == "cuda"
            return DistributedDataParallel(model, device_ids=[device.index or self.info.local_rank] if cuda else None)
        if self.backend == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            bf16 = precision == "bf16"
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                          reduce_dtype=torch.float32 if bf16 else None)
            reshard = self.options.fsdp_reshard_after_forward
            for layer in decoder_layers(model):
                fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard)
            fully_shard(model, mp_policy=policy, reshard_after_forward=reshard)
        return model

    def wrap_frozen(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        """A frozen model beside the trained one (a preference stage's reference): FSDP2 shards it like the
        trained model, so that no rank holds a whole copy; DDP and DeepSpeed keep a plain copy on each rank (DDP
        has nothing to synchronise in a model without gradients, and a ZeRO engine needs an optimizer)."""
        return self.wrap(model, device, precision) if self.backend == "fsdp" else model

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: Any) -> torch.nn.Module:
        """DeepSpeed: ``deepspeed.initialize`` with the plugin-built optimizer (our scheduler keeps stepping it)."""
        if self.backend != "deepspeed":
            return model
        import deepspeed

        config = deepspeed_config(self.options, train, self.info.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                    dist_init_required=False)
        return self.engine  # type: ignore[no-any-return]

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model itself (for generation, saving, the reference of a preference stage)."""
        return getattr(model, "module", model) if self.backend in ("ddp", "deepspeed") else model

    # --- one optimizer step

    def backward(self, loss: torch.Tensor) -> None:
        """The loss is already divided by the step's global token count; DDP, FSDP and DeepSpeed average
        gradients over ranks, so it is scaled back by the world size to give the global sum's gradient."""
        if self.info.world_size > 1:
            loss = loss * self.info.world_size
        if self.engine is None:
            loss.backward()
            return
        self.engine.backward(loss, scale_wrt_gas=False)
        self.micro_steps += 1
        if self.micro_steps % self.engine.gradient_accumulation_steps():
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
        """Clip and return the global gradient norm; None under DeepSpeed, which clips inside its step."""
        if self.engine is not None:
            return None
        grads = [p.grad for p in params if p.grad is not None]
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        elif grads:
            norm = torch.nn.utils.get_total_norm(grads)
        else:
            return 0.0
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: float | None) -> float:
        """The optimizer step; returns the step's gradient norm (under DeepSpeed, the one its step measured)."""
        if self.engine is None:
            optimizer.step()
            return grad_norm or 0.0
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients gone before the next step. DeepSpeed's step already zeroed them, and the plugin-built
        optimizer it wraps holds ZeRO's own fp32 partitions, whose gradient buffers must stay (with optimizer
        offload, ZeRO copies each step's gradients into them)."""
        if self.engine is None:
            optimizer.zero_grad(set_to_none=True)

    # --- checkpoints

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole, on CPU. A collective for sharded models; rank 0's copy is the one to write."""
        base = self.unwrap(model)
        names = [n for n, p in base.named_parameters() if p.requires_grad]
        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(base, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {n: full[n] for n in names if n in full}
        if self.sharded:
            import deepspeed

            params = [p for p in base.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(params):
                return {n: p.detach().cpu().clone() for n, p in base.named_parameters() if p.requires_grad}
        return {n: p.detach().cpu() for n, p in base.named_parameters() if p.requires_grad}

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """FSDP: the optimizer state gathered whole (a collective); DeepSpeed keeps its own (``save_shards``)."""
        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(model, optimizer,  # type: ignore[no-any-return]
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.engine is not None:
            return {}
        return optimizer.state_dict()

    def save_shards(self, folder: Path) -> None:
        """What each rank writes itself: its RNG state, and DeepSpeed's ZeRO partitions (``deepspeed/``)."""
        from swiftk.kernel.checkpoint import rng_state

        folder.mkdir(parents=True, exist_ok=True)
        if self.info.world_size > 1:
            torch.save(rng_state(), folder / f"rng.rank-{self.info.rank}.pt")
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
             optimizer_state: dict[str, Any], path: Path) -> None:
        """Restore weights and optimizer state written by the same backend at the same world size."""
        from swiftk.kernel.tuners import load_trainable

        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            full = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(model, weights, options=full)
            set_optimizer_state_dict(model, optimizer, optimizer_state, options=full)
        elif self.engine is not None:
            self.engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False,
                                        load_lr_scheduler_states=False)
        else:
            load_trainable(self.unwrap(model), weights)
            optimizer.load_state_dict(optimizer_state)

    def load_rng(self, path: Path) -> dict[str, Any] | None:
        """This rank's RNG state from a multi-process checkpoint (None: use the shared one)."""
        own = path / f"rng.rank-{self.info.rank}.pt"
        return torch.load(own, weights_only=False) if own.is_file() else None


def save_gathered(model: torch.nn.Module, tokenizer: Any, out_dir: Path, weights: dict[str, torch.Tensor]) -> Path:
    """The final model (or PEFT adapter) folder of a sharded run, from the gathered ``weights`` (rank 0)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=weights)  # type: ignore[operator]
    tokenizer.save_pretrained(out_dir)
    return out_dir


def create(options: Any, info: DistInfo) -> Parallel:
    """The engine ``[distributed] backend`` names, when several processes run; else the single-process one."""
    if not active():
        return Parallel("single", info, options)
    return Parallel(options.backend, info, options)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the classes transformers marks ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DistributedError(f"[distributed] backend = 'fsdp': no decoder layers found in {type(model).__name__} "
                               f"(no _no_split_modules); use backend = 'ddp'")
    return layers


def deepspeed_config(options: Any, train: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: ``deepspeed_config``'s JSON if given, with the batch and clipping from [train]
    (one source of truth); else built from ``zero_stage`` and the offload switches. Precision stays ours
    (autocast over fp32 master weights), so DeepSpeed's own bf16/fp16 stay off unless the JSON turns them on."""
    config: dict[str, Any] = {}
    if options.deepspeed_config:
        config = json.loads(Path(options.deepspeed_config).read_text(encoding="utf-8"))
    zero = config.setdefault("zero_optimization", {})
    if options.zero_stage is not None or "stage" not in zero:
        zero["stage"] = options.zero_stage or 2
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if options.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config.update({
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
    })
    config.setdefault("zero_allow_untested_optimizer", True)  # the optimizer is a plugin's
    config.setdefault("zero_force_ds_cpu_optimizer", False)  # offload with a torch optimizer: slower, but allowed
    config.setdefault("steps_per_print", sys.maxsize)
    return config


def config_problems(options: Any) -> list[str]:
    """What can be known about [distributed] before anything starts."""
    problems = []
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not launched():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        problems.append(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} not: this process "
                        f"would train alone. Start it through torchrun or the DeepSpeed launcher, or set "
                        f"[distributed] num_processes and let `swiftk run` launch the ranks")
    if options.backend == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            problems.append(f"[distributed] backend: 'deepspeed' but DeepSpeed is not installed here ({exc}); "
                            f"install it with `DS_BUILD_OPS=0 pip install 'swiftk[deepspeed]'`, or use "
                            f"backend = 'ddp' or 'fsdp'")
        if options.deepspeed_config:
            path = Path(options.deepspeed_config)
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except OSError:
                problems.append(f"[distributed] deepspeed_config: {path} does not exist")
            except json.JSONDecodeError as exc:
                problems.append(f"[distributed] deepspeed_config: {path}:{exc.lineno}: not valid JSON: {exc.msg}")
    return problems
