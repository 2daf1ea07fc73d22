"""``[device]``: parallel training asked for the ms-swift way, a method and a GPU count, and written onto the
``[distributed]`` table that the launcher and the engines read (so a config written for either runs the same):

    [device]                            [distributed]
    parallel_method = "ddp"         ->  backend = "ddp"
    parallel_method = "fsdp2"       ->  backend = "fsdp"
    parallel_method = "zero3"       ->  backend = "deepspeed", zero_stage = 3
    parallel_method = "tp"          ->  backend = "tp" (tensor parallel over every GPU)
    parallel_method = "pp"          ->  backend = "pp" (a pipeline stage per GPU)
    parallel_method = "none"        ->  num_processes = 1
    num_gpus = 4                    ->  num_processes = 4 (on a machine without CUDA: 4 CPU processes on gloo)

Setting a ``[distributed]`` key to another value than ``[device]`` asks for is an error naming both. This module
imports no torch itself; the CUDA check imports it when it runs.
"""

from __future__ import annotations

import difflib
import functools
import sys
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# parallel_method -> the [distributed] values it stands for (the engine names are kernel.parallel.ENGINES')
METHODS: dict[str, dict[str, Any]] = {
    "none": {"num_processes": 1},
    "single": {"num_processes": 1},
    "ddp": {"backend": "ddp"},
    "fsdp": {"backend": "fsdp"},
    "fsdp2": {"backend": "fsdp"},
    "deepspeed": {"backend": "deepspeed"},
    "zero2": {"backend": "deepspeed", "zero_stage": 2},
    "zero3": {"backend": "deepspeed", "zero_stage": 3},
    "zero2_offload": {"backend": "deepspeed", "zero_stage": 2, "offload_optimizer": True},
    "zero3_offload": {"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_param": True},
    "tp": {"backend": "tp"},
    "pp": {"backend": "pp"},
}
NOT_BUILT = {"megatron": "Megatron-Core tensor + pipeline parallelism"}


class DeviceConfig(BaseModel):
    """[device] how many GPUs and which parallel method (ms-swift's spelling of [distributed])."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    parallel_method: str | None = Field(
        None, description="'none' (one process), 'ddp', 'fsdp2' (or 'fsdp'), 'deepspeed', 'zero2', 'zero3', "
        "'zero2_offload', 'zero3_offload', 'tp' or 'pp'; sets [distributed] backend (and zero_stage, offload)")
    num_gpus: int | None = Field(
        None, ge=1, description="processes on this machine, one per GPU (sets [distributed] num_processes); "
        "without CUDA, that many CPU processes on gloo")

    @field_validator("parallel_method")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().lower()
        if name in NOT_BUILT:
            raise ValueError(f"'{value}' ({NOT_BUILT[name]}) is not built yet; use one of {choices()}")
        if name not in METHODS:
            close = difflib.get_close_matches(name, METHODS, n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown parallel method '{value}'{hint} (choose from {choices()})")
        return name


def choices() -> str:
    return ", ".join(repr(name) for name in METHODS)


def apply_device(cfg: Any) -> list[str]:
    """Write ``cfg.device`` onto ``cfg.distributed`` (in place) and return [] or, leaving ``cfg`` as it was, the
    problems: a [distributed] key set to another value, more GPUs than this machine has. Running it twice is
    harmless: the second time [distributed] already holds what [device] asks for."""
    device: DeviceConfig = cfg.device
    values, problems = distributed_values(device)
    problems += conflicts(cfg.distributed, values, device)
    problems += gpu_problems(device, cfg.model.device)
    if problems or not values:
        return problems
    merged = {**cfg.distributed.model_dump(exclude_unset=True), **values}
    try:
        cfg.distributed = type(cfg.distributed).model_validate(merged)
    except ValidationError as exc:
        asked = ", ".join(f"{k} = {show(v)}" for k, v in device.model_dump(exclude_none=True).items())
        return [f"[device] {asked}: together with [distributed]: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()]
    cpu_note(device, cfg.model.device)
    return []


def distributed_values(device: DeviceConfig) -> tuple[dict[str, Any], list[str]]:
    """The [distributed] values ``[device]`` asks for."""
    values = dict(METHODS[device.parallel_method]) if device.parallel_method else {}
    if device.num_gpus is None:
        return values, []
    if values.get("num_processes", device.num_gpus) != device.num_gpus:
        return {}, [f"[device] parallel_method = '{device.parallel_method}' runs one process but num_gpus = "
                    f"{device.num_gpus}: use 'ddp', 'fsdp2', 'tp', 'pp' or a ZeRO stage ('zero2', 'zero3'), or "
                    f"num_gpus = 1"]
    return {**values, "num_processes": device.num_gpus}, []


def conflicts(distributed: BaseModel, values: dict[str, Any], device: DeviceConfig) -> list[str]:
    """[distributed] keys the file (or --set) gave another value than [device] asks for."""
    return [f"[device] {source(key, device)} asks for [distributed] {key} = {show(value)}, but [distributed] "
            f"{key} = {show(getattr(distributed, key))}: set one of the two"
            for key, value in values.items()
            if key in distributed.model_fields_set and getattr(distributed, key) != value]


def source(key: str, device: DeviceConfig) -> str:
    """The [device] setting behind a [distributed] key, as ``name = value``."""
    if key == "num_processes" and device.num_gpus is not None:
        return f"num_gpus = {device.num_gpus}"
    return f"parallel_method = '{device.parallel_method}'"


def show(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def gpu_problems(device: DeviceConfig, model_device: str) -> list[str]:
    """More GPUs asked for than this machine has (a machine without CUDA runs CPU processes instead)."""
    if device.num_gpus is None or model_device == "cpu":
        return []
    names = cuda_devices()
    if not names or device.num_gpus <= len(names):
        return []
    found = f"{len(names)} CUDA device{'s' if len(names) != 1 else ''} ({', '.join(dict.fromkeys(names))})"
    return [f"[device] num_gpus = {device.num_gpus}: this machine has {found}; set num_gpus <= {len(names)}"]


def cuda_devices() -> list[str]:
    """The names of the CUDA devices this process sees ([] without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def cpu_note(device: DeviceConfig, model_device: str) -> None:
    """Say once, in the process that launches the ranks, that GPUs asked for run as CPU processes here."""
    from swiftk.kernel.dist import launched

    if device.num_gpus is None or device.num_gpus < 2 or launched():
        return
    if model_device == "cpu":
        say_once(f"swiftk: [model] device = 'cpu': running {device.num_gpus} CPU processes (gloo) for [device] "
                 f"num_gpus = {device.num_gpus}")
    elif not cuda_devices():
        say_once(f"swiftk: no CUDA device: running {device.num_gpus} CPU processes (gloo) for [device] "
                 f"num_gpus = {device.num_gpus}")


@functools.cache
def say_once(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # stderr: `swiftk run --print-config` prints TOML on stdout
