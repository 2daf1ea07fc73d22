"""The loss contract, checked in one place: wherever a ``swiftk_loss_compute`` result is taken (the kernel's
step loop, a plugin host where the loss ran, the proxy that receives it, the plugin test kit), it goes through
``checked_loss``, so every caller enforces the same rules with the same words."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from swiftk.contracts.types import LossResult

FIX_TYPE = "return LossResult(loss) (None only defers to another loss plugin)"
FIX_SHAPE = "reduce it: .sum() / batch.num_items_in_batch for a token loss (or .mean())"
FIX_GRAD = ("compute it from outputs.logits with differentiable torch ops (no .item(), .detach(), torch.tensor(...) "
            "or torch.no_grad())")
FIX_FINITE = "guard logs and divisions: log_softmax instead of log(softmax), max(n, 1) denominators"
FIX_METRICS = "return a dict of plain floats (float(...), or tensor.item() for a tensor); keys must be str"


class ContractViolation(ValueError):
    """A hook's result breaks its contract: ``str(exc)`` says how (``returned shape [4]; expected a 0-dim
    loss``), ``fix`` what the plugin author should do. Callers wrap it in the error of their side."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


def checked_loss(result: object, *, requires_grad: bool = True, finite: bool = True) -> LossResult:
    """``result`` as the contract promises it: a ``LossResult`` whose loss is a 0-dim floating-point tensor that
    requires grad and is finite, with metrics ``{str: float}`` (numbers and one-element tensors are converted).

    ``requires_grad=False`` where the loss arrives detached (from a host, which sends its gradient beside it);
    ``finite=False`` where the caller checks the step's summed loss itself (no device sync per micro-batch).
    :raises ContractViolation: the first rule ``result`` breaks."""
    if not isinstance(result, LossResult):
        got = "None" if result is None else type(result).__name__
        raise ContractViolation(f"returned {got}; expected a LossResult", FIX_TYPE)
    loss = result.loss
    if not isinstance(loss, torch.Tensor):
        raise ContractViolation(f"returned a LossResult whose loss is {type(loss).__name__}; expected a 0-dim "
                                f"tensor", FIX_TYPE)
    if loss.dim() != 0:
        raise ContractViolation(f"returned shape {list(loss.shape)}; expected a 0-dim loss", FIX_SHAPE)
    if not loss.is_floating_point():
        raise ContractViolation(f"returned a {loss.dtype} loss; expected a floating-point 0-dim loss", FIX_GRAD)
    if requires_grad and not loss.requires_grad:
        raise ContractViolation("returned a loss that does not require grad (computed under torch.no_grad() or "
                                "from detached tensors?)", FIX_GRAD)
    if finite and not math.isfinite(value := float(loss.detach())):
        raise ContractViolation(f"returned a non-finite loss ({value})", FIX_FINITE)
    return LossResult(loss, float_metrics(result.metrics))


def float_metrics(metrics: object) -> dict[str, float]:
    """``metrics`` as ``{str: float}``; a bool, a string or a many-element tensor is a ``ContractViolation``."""
    if not isinstance(metrics, Mapping):
        raise ContractViolation(f"returned metrics of type {type(metrics).__name__}; expected a dict[str, float]",
                                FIX_METRICS)
    floats: dict[str, float] = {}
    for key, value in metrics.items():
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not isinstance(key, str) or not (number or isinstance(value, torch.Tensor) and value.numel() == 1):
            raise ContractViolation(f"returned metric {key!r}: {type(value).__name__}, not a float", FIX_METRICS)
        floats[key] = float(value)
    return floats
