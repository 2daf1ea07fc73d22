"""The parallel engines, by name. ``[distributed] backend`` (or ``[device] parallel_method``) picks one; a new
engine is a new module here and one line in ``ENGINES``.

    none       one process: every call is the plain PyTorch one           none.py
    ddp        a replica per rank, gradients all-reduced                   ddp.py
    fsdp       FSDP2: fully_shard per decoder layer                        fsdp.py
    deepspeed  DeepSpeed ZeRO-2/3 (optimizer offload, parameter offload)   deepspeed.py
    tp         tensor parallel layers (DTensor), FSDP2 over the TP groups  tp.py
    pp         pipeline stages (torch.distributed.pipelining), GPipe/1F1B  pp.py

What every engine offers is ``swiftk.contracts.engines.ParallelEngine``; the process group itself (setup, the
ranks' agreements, teardown) is ``kernel.dist``'s. An engine's module is imported when it is chosen, so that
DeepSpeed is never imported by a run that does not use it.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any

from swiftk.kernel.parallel.config import DeviceConfig, apply_device

if TYPE_CHECKING:
    from swiftk.kernel.dist import DistInfo
    from swiftk.kernel.parallel.none import OneProcess

# name -> "module:class"
ENGINES: dict[str, str] = {
    "none": "swiftk.kernel.parallel.none:OneProcess",
    "ddp": "swiftk.kernel.parallel.ddp:DDP",
    "fsdp": "swiftk.kernel.parallel.fsdp:FSDP2",
    "deepspeed": "swiftk.kernel.parallel.deepspeed:DeepSpeedZero",
    "tp": "swiftk.kernel.parallel.tp:TensorParallel",
    "pp": "swiftk.kernel.parallel.pp:PipelineParallel",
}

__all__ = ["ENGINES", "DeviceConfig", "apply_device", "config_problems", "create", "engine_class"]


def engine_class(name: str) -> type[OneProcess]:
    """The engine registered as ``name``; an unknown name is an error listing the known ones."""
    from swiftk.kernel.dist import DistributedError

    if name not in ENGINES:
        close = difflib.get_close_matches(name, ENGINES, n=2)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise DistributedError(f"no parallel engine named '{name}'; {hint}(engines: {', '.join(ENGINES)})")
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def create(options: Any, info: DistInfo) -> OneProcess:
    """The engine ``[distributed] backend`` names when several processes run; else the one-process engine. Every
    built-in engine extends ``OneProcess``; what the kernel may rely on is ``ParallelEngine``."""
    from swiftk.kernel.dist import active

    return engine_class(options.backend if active() else "none")(info, options)


def config_problems(cfg: Any) -> list[str]:
    """What can be known before anything starts: [device] written onto [distributed] (or why it cannot be), then
    [distributed] itself (how this process was started, what the chosen engine needs)."""
    from swiftk.kernel import dist

    problems = apply_device(cfg) + dist.config_problems(cfg.distributed)
    several = cfg.distributed.num_processes * cfg.distributed.nnodes > 1
    return problems + (engine_class(cfg.distributed.backend).run_problems(cfg) if several and not problems else [])
