"""The run's plugin hosts: start them together, learn what each provides, build proxies, shut them down."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import zmq

from swiftk.contracts.errors import PluginError
from swiftk.hosts import messages as m
from swiftk.hosts.proxy import Policy, RemotePlugin, local_only, make_proxy
from swiftk.hosts.settings import HostSettings
from swiftk.hosts.shared import GuestHost
from swiftk.hosts.supervisor import EventSink, Host, HostSpec, HostStartError, SharedSlot, console

INLINE_ONLY = {"optimizer", "scheduler"}  # they update the kernel's tensors in place


@dataclass
class Provider:
    host: Host
    source: m.SourceInfo
    policy: Policy


@dataclass
class HostGroup:
    """Every host of a run, and the proxies built from them (registered by the kernel like any plugin)."""

    specs: list[HostSpec]
    policies: dict[str, Policy]  # by source name
    settings: HostSettings = field(default_factory=HostSettings)
    hosts: list[Host] = field(default_factory=list)
    providers: dict[tuple[str, str], Provider] = field(default_factory=dict)
    proxies: dict[tuple[str, str], RemotePlugin] = field(default_factory=dict)
    module_proxies: list[tuple[str, RemotePlugin]] = field(default_factory=list)
    sink: EventSink = console
    next_instance: int = 1

    def __post_init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.retiring: list[threading.Thread] = []

    def events(self, event: str, fields: dict[str, Any]) -> None:
        self.sink(event, fields)

    def start(self) -> list[str]:
        """Spawn every host, then shake hands with each (they import torch in parallel); one problem per failure."""
        problems = []
        self.hosts = [(GuestHost if spec.shared is not None and spec.shared.local_rank > 0 else Host)(
            spec, self.settings, self.context, self.events) for spec in self.specs]
        for host in self.hosts:
            try:
                host.spawn()
            except Exception as exc:  # its sandbox could not be prepared (folders, cgroups)
                host.closed = True
                problems.append(f"plugins: host '{host.spec.label}' did not start: {exc}")
        for host in self.hosts:
            if host.closed:
                continue
            try:
                hello = host.handshake()
            except Exception as exc:
                host.kill("failed to start")
                host.closed = True
                problems.append(f"plugins: host '{host.spec.label}' did not start: {exc}")
                continue
            for index, source in enumerate(hello.sources):
                if source.error:
                    problems.append(f"plugins: {source.source!r} failed to load in its host: {source.error}")
                    continue
                policy = self.policies[source.name]
                for reg in source.registrations:
                    other = self.providers.get((reg.kind, reg.name))
                    if other is not None:
                        problems.append(f"plugins: {reg.kind} '{reg.name}' is registered by {other.source.source} "
                                        f"and by {source.source}, both in hosts; rename one of them")
                    self.providers[(reg.kind, reg.name)] = Provider(host, source, policy)
                module_problems = local_only(source.module_hooks)
                if source.module_hooks and not module_problems:
                    try:
                        proxy = make_proxy(host, -(index + 1), f"module:{source.name}", source.module_hooks,
                                           False, policy, source.code_hash, host.events, source.source)
                        self.module_proxies.append((source.name, proxy))
                    except PluginError as exc:
                        module_problems.append(str(exc))
                problems += [f"plugins: {source.source!r}: {p}" for p in module_problems]
        return problems

    def provides(self, kind: str, name: str) -> bool:
        return (kind, name) in self.providers

    def build(self, kind: str, name: str, config: dict[str, Any]) -> list[str]:
        """Build ``kind:name`` in its host with ``config``; the problems its host found, if any."""
        provider = self.providers[(kind, name)]
        if kind in INLINE_ONLY:
            return [f"{kind} '{name}' is in a plugin host (isolation = \"process\"), but {kind}s update the "
                    f"kernel's tensors in place and must run inline; remove isolation from its [[plugins]] table"]
        instance, self.next_instance = self.next_instance, self.next_instance + 1
        try:
            reply = provider.host.build(m.BuildRequest(instance, kind, name, config))
        except Exception as exc:
            return [f"its host failed while building it: {exc}"]
        problems = reply.problems + local_only(reply.hooks)
        if problems:
            return [f"(in its host) {p}" for p in problems]
        try:
            self.proxies[(kind, name)] = make_proxy(provider.host, instance, f"{kind}:{name}", reply.hooks,
                                                    reply.stateful, provider.policy, provider.source.code_hash,
                                                    provider.host.events, provider.source.source)
        except PluginError as exc:
            return [str(exc)]
        return []

    def replace(self, old: Host, new: Host) -> None:
        """``new`` serves from now on (a hot reload); ``old`` is shut down in the background."""
        self.hosts[self.hosts.index(old)] = new
        retiring = threading.Thread(target=old.shutdown, name="swiftk-retire-host", daemon=True)
        retiring.start()
        self.retiring.append(retiring)

    def close(self) -> None:
        for retiring in self.retiring:
            retiring.join()
        for host in self.hosts:
            try:
                host.shutdown()
            except Exception as exc:  # keep closing the others
                console("host_shutdown_failed", {"host": host.spec.label, "error": repr(exc)})
        self.context.destroy(linger=0)  # every socket of every host, even one a failed start left open


__all__ = ["HostGroup", "HostSettings", "HostSpec", "HostStartError", "Policy", "SharedSlot"]
