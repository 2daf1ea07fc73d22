"""DDP: a whole replica on every rank; gradients are all-reduced (averaged) during backward."""

from __future__ import annotations

import torch

from swiftk.kernel.parallel.none import OneProcess


class DDP(OneProcess):
    """``DistributedDataParallel`` around the trained model; a frozen model stays a plain copy on each rank (DDP
    has nothing to synchronise in a model without gradients)."""

    name = "ddp"

    def wrap(self, model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        cuda = device.type == "cuda"
        return DistributedDataParallel(model, device_ids=[device.index or self.info.local_rank] if cuda else None)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)  # type: ignore[no-any-return]
