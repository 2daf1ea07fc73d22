"""Hosts forward what the hookspecs' markers say, nothing else: a new remote hook needs only its marker."""

from __future__ import annotations

import inspect

import pytest

from swiftk.contracts import hookspecs
from swiftk.contracts.errors import PluginError
from swiftk.contracts.markers import hookspec, remote
from swiftk.hosts import messages as m
from swiftk.hosts.proxy import Policy, local_only, make_proxy


def info(name: str) -> m.HookInfo:
    """The hook as a host reports an implementation of it that takes every argument."""
    return m.HookInfo(name, list(inspect.signature(getattr(hookspecs, name)).parameters), False, False)


def proxy_for(names: list[str]):  # the host is never called here
    return make_proxy(None, 1, "loss:probe", [info(n) for n in names], False, Policy(), "", lambda e, f: None)


def forwarded(proxy) -> set[str]:
    return {name for name in dir(type(proxy)) if name.startswith("swiftk_")}


def test_the_forwarded_hooks_are_exactly_those_marked_remote() -> None:
    marked = set(hookspecs.remote_hooks())
    unmarked = set(hookspecs.hook_names()) - marked
    assert unmarked == {"swiftk_model_loaded", "swiftk_optimizer_build", "swiftk_scheduler_build"}
    assert {i.name for i in map(info, hookspecs.hook_names()) if not local_only([i])} == marked
    assert forwarded(proxy_for(sorted(marked))) == marked
    assert {n for n, t in hookspecs.remote_hooks().items() if t.differentiable} == {"swiftk_loss_compute"}
    for name in unmarked:
        with pytest.raises(PluginError, match="not marked @remote"):
            proxy_for([name])


def test_a_new_spec_is_forwarded_once_marked_and_only_then(monkeypatch: pytest.MonkeyPatch) -> None:
    def swiftk_probe_event(state):  # a spec added to the contract, not marked
        """A new hook."""

    monkeypatch.setattr(hookspecs, "swiftk_probe_event", hookspec(swiftk_probe_event), raising=False)
    assert "swiftk_probe_event" not in hookspecs.remote_hooks()
    assert local_only([info("swiftk_probe_event")])  # refused at a host's start, with a message
    with pytest.raises(PluginError, match="not marked @remote"):
        proxy_for(["swiftk_probe_event"])
    remote()(swiftk_probe_event)  # its marker is all it takes
    assert local_only([info("swiftk_probe_event")]) == []
    proxy = proxy_for(["swiftk_probe_event", "swiftk_loss_compute"])
    assert forwarded(proxy) == {"swiftk_probe_event", "swiftk_loss_compute"}
    assert not proxy.traits["swiftk_probe_event"].differentiable and proxy.traits["swiftk_loss_compute"].differentiable
