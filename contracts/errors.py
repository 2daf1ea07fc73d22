"""Typed plugin failures, shared by the kernel and plugin hosts."""

from __future__ import annotations


class PluginError(Exception):
    """One call into a plugin failed (it raised, or returned something the contract forbids).

    The plugin (and its host, if any) lives on; the hook's failure policy decides what the run does next.
    """

    def __init__(self, plugin: str, hook: str, message: str) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(f"plugin '{plugin}' (hook {hook}) {message}")


class HostDeadError(PluginError):
    """The process hosting a plugin is gone (crashed, killed, or silent past its heartbeat deadline)."""
