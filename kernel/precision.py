"""``[train] precision`` and ``[model] dtype`` set to "auto": bfloat16 where this device computes it natively,
float32 where it would only emulate it.

An AVX2-only CPU (no AVX512-BF16, no AMX: the AMD EPYC VMs we measured) runs bf16 matmuls through a float32
emulation: the tiny config trains at 130 tokens/s under bf16 autocast against 1500 in float32, and SmolLM2's
head backward took 80 s in bf16 against 0.28 s. Where bf16 is native (CUDA from Ampere on, Sapphire Rapids'
AMX, AVX512-BF16) it is the faster and smaller choice. "auto" picks per device; "bf16" and "fp32" stay as
asked for anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` (bfloat16 or float16) matmuls natively."""
    mkldnn = torch.ops.mkldnn
    return bool(mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (not by emulation)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return native_half(torch.bfloat16)
    return False


def compute(precision: str, device: torch.device) -> str:
    """``[train] precision`` as run on ``device``: "bf16" or "fp32"."""
    return compute_when(precision, native_bf16(device))


def compute_when(precision: str, bf16: bool) -> str:
    """``[train] precision`` on a device that computes bfloat16 natively (``bf16``) or not."""
    if precision == "auto":
        return "bf16" if bf16 else "fp32"
    return precision


def storage(dtype: str, device: torch.device, full_weights: bool = False) -> str:
    """``[model] dtype`` as loaded on ``device``: "auto" is bfloat16 where bf16 is native, float32 elsewhere, and
    float32 always for a tuner that trains every weight (``full_weights``: it needs float32 master weights)."""
    return storage_when(dtype, native_bf16(device), full_weights)


def storage_when(dtype: str, bf16: bool, full_weights: bool = False) -> str:
    """``[model] dtype`` on a device that computes bfloat16 natively (``bf16``) or not."""
    if dtype == "auto":
        return "bfloat16" if bf16 and not full_weights else "float32"
    return dtype


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``[model] dtype`` as a torch dtype on ``device``."""
    return DTYPES[storage(dtype, device)]


def resolved(cfg: Any, device: torch.device, full_weights: bool) -> Any:
    """The run's config with "auto" replaced by what ``device`` gets (what the run folder's config.toml records,
    and what a resume compares)."""
    train = cfg.train.model_copy(update={"precision": compute(cfg.train.precision, device)})
    model = cfg.model.model_copy(update={"dtype": storage(cfg.model.dtype, device, full_weights)})
    return cfg.model_copy(update={"train": train, "model": model})


def describe(asked: str, precision: str, device: torch.device) -> str:
    """The console's word on the run's precision, e.g. "fp32 (auto: this CPU has no native bfloat16 ...)"."""
    if native_bf16(device) or device.type != "cpu":
        return precision if asked != "auto" else f"{precision} (auto)"
    emulated = "this CPU has no native bfloat16 (no AVX512-BF16 or AMX)"
    if precision == "bf16":
        return f"bf16 ({emulated}: its matmuls are emulated, several times slower than fp32; precision = 'auto' " \
               f"picks fp32 here)"
    return f"fp32 (auto: {emulated})" if asked == "auto" else "fp32"
