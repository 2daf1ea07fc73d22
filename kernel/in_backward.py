"""Optimizer steps inside backward (``[train] optimizer_in_backward = true``).

Backward produces the gradients of a transformer's last layer first and its embeddings last. Here each parameter is
updated, and its gradient freed, as soon as autograd has accumulated it (``register_post_accumulate_grad_hook``),
so the whole model's gradients are never held at once: their memory (as much as the weights, for a full fine-tune
or GaLore) drops to about one parameter's. The idea is GaLore's "per-layer weight updates" (Zhao et al. 2024,
sec. 4.3), which torchtune calls ``optimizer_in_bwd``.

The update itself is the configured optimizer's own ``step()``: called in a hook, it finds one gradient (every
other is None, either not computed yet or already used and freed) and updates that parameter only. Its state,
its checkpoint and the LR schedule are those of the optimizer, unchanged.

What it costs, and config.py refuses:
- no clipping: the norm of the whole gradient is known only after every parameter has been updated;
- one backward per step (grad_accum = 1): a gradient that is still accumulating cannot be applied;
- one process: under DDP, FSDP or DeepSpeed the gradient is complete only after their collectives.
A parameter whose gradient is not finite is not updated; the loop then stops the run and says how many were.
"""

from __future__ import annotations

import torch


class InBackward:
    """Hooks that step ``optimizer`` for each of ``params`` as soon as its gradient is accumulated."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.armed = False
        self.norm_sq = torch.zeros(())
        self.updated = 0
        self.not_finite: list[torch.nn.Parameter] = []
        self.handles = [p.register_post_accumulate_grad_hook(self.update) for p in params]

    def arm(self) -> None:
        """Before the step's backward: the hooks update from now on, and the step's counters start at 0."""
        self.armed, self.updated, self.not_finite = True, 0, []
        self.norm_sq = torch.zeros(())

    def update(self, param: torch.Tensor) -> None:
        if not self.armed or param.grad is None:  # a backward outside a training step leaves its gradient be
            return
        square = param.grad.detach().float().square().sum()
        self.norm_sq = self.norm_sq.to(square.device) + square
        if bool(torch.isfinite(square)):
            self.optimizer.step()  # every other gradient is None: this parameter alone is updated
            self.updated += 1
        else:
            self.not_finite.append(param)  # type: ignore[arg-type]
        param.grad = None

    def finish(self) -> float:
        """After backward: the norm of the step's whole gradient (as clip_grad_norm would have reported it)."""
        self.armed = False
        return float(self.norm_sq.sqrt())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
