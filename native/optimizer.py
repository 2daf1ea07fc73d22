"""A ``torch.optim.Optimizer`` whose update is one call into a native optimizer plugin.

The native side defines three functions (see native/README.md): ``defaults()`` (hyperparameters),
``init_state(param, hyper)`` (the per-parameter state tensors, float32) and ``step(params, grads, state, steps,
hyper)``, which updates every parameter of a group in one call. This class owns what torch expects of an
optimizer around that: param groups (weight decay and learning rate per group, changed by schedulers),
``zero_grad``, and ``state_dict``/``load_state_dict``, so checkpoints and resume work as for torch's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from swiftk.native.load import NativePlugin, hyper


class NativeOptimizer(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], plugin: NativePlugin, **config: Any) -> None:
        self.plugin = plugin
        defaults = hyper(plugin.defaults(), config, f"optimizer '{plugin.info.name}'")
        self.hyper_keys = tuple(defaults)  # torch adds keys of its own to self.defaults (e.g. on load)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        settings = {key: float(group[key]) for key in self.hyper_keys}
        params, grads, steps = [], [], []
        states: dict[str, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"optimizer '{self.plugin.info.name}' does not support sparse gradients")
            if not p.is_contiguous():
                raise RuntimeError(f"optimizer '{self.plugin.info.name}' needs contiguous parameters; got one of "
                                   f"shape {tuple(p.shape)} with strides {p.stride()}")
            state = self.state[p]
            if not state:
                state.update(self.plugin.module.init_state(p.detach(), settings))
                state["step"] = 0
            state["step"] += 1
            params.append(p)
            grads.append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
            steps.append(float(state["step"]))
            for key, value in state.items():
                if key != "step":
                    states.setdefault(key, []).append(value)
        if not params:
            return
        uneven = [key for key, values in states.items() if len(values) != len(params)]
        if uneven:
            raise RuntimeError(f"optimizer '{self.plugin.info.name}': init_state gave some parameters the state "
                               f"{uneven} and others not; give every parameter the same keys (empty tensors where "
                               f"one does not apply)")
        self.plugin.module.step(params, grads, states, steps, settings)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that state keeps its saved dtype: torch casts floating-point state to each
        parameter's dtype, which would round a bfloat16 parameter's float32 moments to bfloat16."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in zip(ids, params, strict=True):
            for key, value in saved.get(index, {}).items():
                if torch.is_tensor(value):
                    self.state[param][key] = value.to(device=param.device, copy=True)
