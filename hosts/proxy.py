"""The stand-in the kernel registers for a plugin that runs in a host: same hooks, same argument names, so
pluggy (and the step loop) cannot tell it from a local plugin. It applies the plugin's failure policy.

What it forwards comes from the hookspecs' markers (``hookspecs.remote_hooks``): a hook marked ``@remote`` may
run in a host, any other is refused. A ``differentiable`` hook (a loss) returns its value and the gradient
with respect to the tensors it was sent; ``RemoteLoss`` puts that into the autograd graph, so
``loss.backward()`` flows into the model as if the loss were local.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from swiftk.contracts import hookspecs
from swiftk.contracts.checks import ContractViolation, checked_loss
from swiftk.contracts.errors import HostDeadError, PluginError
from swiftk.contracts.markers import HookTraits, hookimpl
from swiftk.contracts.types import LossResult
from swiftk.hosts import messages as m
from swiftk.hosts.supervisor import EventSink, Host


@dataclass(frozen=True)
class Policy:
    """What a failed call does to the run: ``fail`` (raise), ``skip`` (no result; a loss contributes no
    gradient), ``retry`` (once more, restarting a dead host, then fail) or ``fallback`` (return ``fallback``).
    After ``max_failures`` failures within ``window_s`` the plugin is quarantined: it is not called again and
    every later call gets the policy's outcome."""

    on_failure: str = "fail"
    fallback: Any = None
    deadline_s: float = 30.0
    max_failures: int = 3
    window_s: float = 300.0


class RemoteLoss(torch.autograd.Function):
    """A loss computed elsewhere: forward returns its value, backward the gradients the host computed."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, grads: list[torch.Tensor | None], *inputs: torch.Tensor
                ) -> torch.Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = [None if g is None else g * grad_output for g in ctx.grads]
        return (None, None, *grads)


class RemotePlugin:
    """Forwards hook calls to ``instance`` in ``host``; subclassed per plugin with one method per hook, and the
    traits of those hooks."""

    traits: dict[str, HookTraits] = {}

    def __init__(self, host: Host, instance: int, label: str, policy: Policy, code_hash: str,
                 events: EventSink, source: str = "") -> None:
        self.host, self.instance, self.label, self.policy = host, instance, label, policy
        self.code_hash, self.events, self.source = code_hash, events, source
        self.failures: deque[float] = deque()
        self.quarantined: PluginError | None = None
        self.last_failure: PluginError | None = None  # why the latest call failed, when its policy answered for it

    def __repr__(self) -> str:
        return f"<{self.label} in host pid {self.host.pid}>"

    def invoke(self, hook: str, kwargs: dict[str, Any]) -> Any:
        self.last_failure = self.quarantined
        if self.quarantined is not None:
            return self.outcome(hook, kwargs, self.quarantined)
        attempts = 2 if self.policy.on_failure == "retry" else 1
        error: PluginError | None = None
        for attempt in range(attempts):
            try:
                return self.forward(hook, kwargs)
            except PluginError as exc:
                error = exc
                self.failed(hook, exc, counts=attempt == 0)  # a call and its retry are one failure
                if self.quarantined is not None:
                    break
        assert error is not None
        self.last_failure = error
        return self.outcome(hook, kwargs, error)

    def forward(self, hook: str, kwargs: dict[str, Any]) -> Any:
        differentiate = self.traits[hook].differentiable and torch.is_grad_enabled()
        call = self.host.call(self.instance, hook, kwargs, self.policy.deadline_s, differentiate)
        if not differentiate:
            return call.result
        try:  # arrives detached (its gradient beside it); the host checked it is finite
            result = checked_loss(call.result, requires_grad=False, finite=False)
        except ContractViolation as exc:
            raise PluginError(self.label, hook, str(exc)) from None
        if not call.grad_inputs:
            raise PluginError(self.label, hook, "was given no tensor that requires grad")
        loss = RemoteLoss.apply(result.loss, call.grads, *call.grad_inputs)  # type: ignore[no-untyped-call]
        return LossResult(loss, result.metrics)

    def failed(self, hook: str, error: PluginError, counts: bool = True) -> None:
        now = time.monotonic()
        if counts:
            self.failures.append(now)
        while self.failures and now - self.failures[0] > self.policy.window_s:
            self.failures.popleft()
        kind = "host_dead" if isinstance(error, HostDeadError) else "error"
        self.events("plugin_failed", {"plugin": self.label, "hook": hook, "kind": kind, "error": str(error),
                                      "policy": self.policy.on_failure})
        if len(self.failures) >= self.policy.max_failures:
            self.quarantined = PluginError(self.label, hook, f"is quarantined after {len(self.failures)} failures "
                                           f"within {self.policy.window_s:g} s; last: {error}")
            self.events("plugin_quarantined", {"plugin": self.label, "hook": hook, "failures": len(self.failures),
                                               "policy": self.policy.on_failure})

    def outcome(self, hook: str, kwargs: dict[str, Any], error: PluginError) -> Any:
        """The policy's answer to a call that failed (or was not made: quarantine)."""
        policy = self.policy.on_failure
        if policy in ("fail", "retry"):
            raise error
        value = self.policy.fallback if policy == "fallback" else None
        if self.traits[hook].differentiable:  # a loss that cannot be computed contributes nothing to the update
            outputs = kwargs.get("outputs")
            device = outputs.device if outputs is not None else torch.device("cpu")
            loss = torch.tensor(float(value or 0.0), device=device, requires_grad=True)
            return LossResult(loss, {"loss_skipped": 1.0})
        return value


class StatefulRemotePlugin(RemotePlugin):
    """A remote plugin with ``state_dict``/``load_state_dict``: its state is saved in the run's checkpoints."""

    def state_dict(self) -> Any:
        """The remote state; under a policy other than ``fail``, a failure saves None instead of the state
        (the checkpoint is still written: a plugin failure never costs the run its checkpoint)."""
        if self.quarantined is not None:
            return None  # not called again, not even to save it
        try:
            return self.host.state(self.instance)
        except PluginError as exc:
            if self.policy.on_failure in ("fail", "retry"):
                raise
            self.failed("state_dict", exc)
            return None

    def load_state_dict(self, state: Any) -> None:
        if state is not None:
            self.host.state(self.instance, load=state)


def local_only(hooks: list[m.HookInfo]) -> list[str]:
    """One problem per hook of ``hooks`` that exists but is not marked ``@remote``: it cannot run in a host."""
    remote = hookspecs.remote_hooks()
    return [f"{hook.name} receives kernel objects (the model or optimizer) and cannot run in a plugin host (its "
            f"hookspec is not marked @remote); move it to a plugin without isolation" for hook in hooks
            if hook.name in hookspecs.hook_names() and hook.name not in remote]


def make_proxy(host: Host, instance: int, label: str, hooks: list[m.HookInfo], stateful: bool, policy: Policy,
               code_hash: str, events: EventSink, source: str = "") -> RemotePlugin:
    """A ``RemotePlugin`` whose class has one ``@hookimpl`` method per remote hook, with the remote argument
    names (pluggy passes a hook implementation exactly the arguments it names). A hook whose spec is not
    marked ``@remote`` is a ``PluginError``."""
    remote = hookspecs.remote_hooks()
    methods: dict[str, Any] = {hook.name: forwarding_method(hook, remote) for hook in hooks}
    methods["traits"] = {hook.name: remote[hook.name] for hook in hooks}
    base = StatefulRemotePlugin if stateful else RemotePlugin
    cls = type(f"Remote_{label.replace(':', '_')}", (base,), methods)
    proxy: RemotePlugin = cls(host, instance, label, policy, code_hash, events, source)
    return proxy


def forwarding_method(info: m.HookInfo, remote: dict[str, HookTraits]) -> Any:
    """A method named like the hook, taking exactly the remote implementation's arguments (pluggy reads the
    names from the function's code, so it is compiled here, from names checked against the hookspec)."""
    spec = getattr(hookspecs, info.name, None)
    if not info.name.startswith("swiftk_") or spec is None:
        raise PluginError("?", info.name, "is not a swiftk hook; check its spelling against swiftk.contracts.hookspecs")
    if info.name not in remote:
        raise PluginError("?", info.name, "cannot run in a plugin host: its hookspec is not marked @remote")
    allowed = set(inspect.signature(spec).parameters)
    names = list(info.argnames)
    if not set(names) <= allowed or len(set(names)) != len(names):
        raise PluginError("?", info.name, f"takes {names}, but the hook passes only {sorted(allowed)}")
    arguments = ", ".join(names)
    source = (f"def {info.name}(self{', ' if names else ''}{arguments}):\n"
              f"    return self.invoke({info.name!r}, {{{', '.join(f'{n!r}: {n}' for n in names)}}})\n")
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<swiftk proxy {info.name}>", "exec"), namespace)  # names checked above
    return hookimpl(tryfirst=info.tryfirst, trylast=info.trylast)(namespace[info.name])
