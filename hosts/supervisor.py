"""The kernel's side of a plugin host: the handshake, requests and hook calls with deadlines, and restarts.

A ``Host`` is a ``HostProcess`` (``hosts.process``: spawn, kill, stop, backoff) that speaks the protocol of
``hosts.messages`` over its ``Channel`` (``hosts.channel``: sockets, deadlines, heartbeats) and passes tensors
through its ``Transport`` (``hosts.transport``: segments and CUDA buffers). A rank's session with a host its
node shares is a ``GuestHost`` (``hosts.shared``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from swiftk.contracts import registry
from swiftk.contracts.errors import HostDeadError, PluginError
from swiftk.contracts.markers import CONTRACT_VERSION
from swiftk.hosts import messages as m
from swiftk.hosts.codec import from_wire
from swiftk.hosts.process import SHARED_DEAD, EventSink, HostProcess, HostSpec, SharedSlot, console
from swiftk.hosts.settings import HostSettings
from swiftk.hosts.transport import MAX_OUTPUT

__all__ = ["Call", "EventSink", "Host", "HostSettings", "HostSpec", "HostStartError", "RemoteError", "SharedSlot",
           "check_grads", "console", "file_hash"]


class HostStartError(Exception):
    """A host did not start or did not complete the handshake."""


class RemoteError(PluginError):
    """The plugin raised (or broke its contract) in its host; the host lives on."""

    def __init__(self, plugin: str, hook: str, message: str, traceback: str | None) -> None:
        super().__init__(plugin, hook, message)
        self.remote_traceback = traceback


def file_hash(source: str) -> str | None:
    """The code hash of a plugin file as the kernel reads it (None for a module name: the kernel does not
    import what a host runs). Same digest as ``contracts.registry.source_hash``."""
    path = Path(source)
    if not (source.endswith(".py") or path.is_file()) or not path.is_file():
        return None
    return registry.file_hash(path)


def check_grads(label: str, hook: str, grads: list[torch.Tensor | None], inputs: list[torch.Tensor]) -> None:
    """Gradients must match their inputs one for one in shape, dtype and device (else backward would fail
    far from the cause)."""
    if len(grads) != len(inputs):
        raise PluginError(label, hook, f"returned {len(grads)} gradients for {len(inputs)} inputs")
    for grad, tensor in zip(grads, inputs, strict=True):
        if grad is not None and (grad.shape != tensor.shape or grad.dtype != tensor.dtype):
            raise PluginError(label, hook, f"returned a gradient {list(grad.shape)} {grad.dtype} for an input "
                              f"{list(tensor.shape)} {tensor.dtype}")


@dataclass
class Call:
    """What a call returned: the decoded result, the gradients, and the inputs they belong to."""

    result: Any
    grads: list[torch.Tensor | None] = field(default_factory=list)
    grad_inputs: list[torch.Tensor] = field(default_factory=list)


class Host(HostProcess):
    """One plugin host process, as the kernel sees it."""

    def __init__(self, spec: HostSpec, settings: HostSettings, context: zmq.Context[Any],
                 events: EventSink = console) -> None:
        super().__init__(spec, settings, context, events)
        self.hello: m.HelloReply | None = None
        self.builds: dict[int, m.BuildRequest] = {}
        self.call_ids = itertools.count(1)

    @property
    def cuda_handles(self) -> dict[int, tuple[list[Any], bool]]:
        """The CUDA IPC handles this host was given, by buffer (each is sent once, then cached by the host)."""
        return self.tensors.cuda_handles

    # -- start ----------------------------------------------------------------------------------------------
    def handshake(self, same_code: bool = True) -> m.HelloReply:
        """Send the hello and check the reply: same contract version, the token this kernel gave the host, and
        (``same_code``) the code hash of each file as the kernel reads it. A host started for a hot reload skips
        that check: it runs what the file holds when it imports it, which a save during its start may change, and
        the reloader records the hash the host reports."""
        end = time.monotonic() + self.settings.start_timeout_s
        channel = self.channel
        channel.send(m.encode(m.HelloRequest(CONTRACT_VERSION, self.token, self.spec.sources, self.spec.names)),
                     max(end - time.monotonic(), 0.001), "the handshake", starting=True)
        reply = channel.receive(max(end - time.monotonic(), 0.001), "the handshake", starting=True)
        if not isinstance(reply, m.HelloReply):
            raise HostStartError(f"host '{self.spec.label}' answered the handshake with {type(reply).__name__}")
        if reply.token != self.token:
            raise HostStartError(f"host '{self.spec.label}' answered with the wrong token: another process is "
                                 f"on its socket")
        if reply.contract_version != CONTRACT_VERSION:
            raise HostStartError(
                f"host '{self.spec.label}' implements contract {reply.contract_version} but this kernel "
                f"{CONTRACT_VERSION}: both must run the same swiftk (check the interpreter the host uses)")
        if [(s.source, s.name) for s in reply.sources] != list(zip(self.spec.sources, self.spec.names, strict=True)):
            raise HostStartError(f"host '{self.spec.label}' answered for other plugin sources than it was given")
        for source in reply.sources:
            expected = file_hash(source.source)
            if same_code and source.error is None and expected is not None and source.code_hash != expected:
                raise HostStartError(
                    f"host '{self.spec.label}' loaded {source.source} with code hash {source.code_hash}, but the "
                    f"file on disk hashes to {expected}: it changed while the host started; start the run again")
        self.hello = reply
        return reply

    def start(self, same_code: bool = True) -> m.HelloReply:
        self.spawn()
        try:
            return self.handshake(same_code)
        except (HostStartError, HostDeadError):
            self.kill("failed to start")
            raise

    def restart(self, reason: str) -> None:
        """Start a fresh host after a death, waiting out the backoff, and rebuild its plugins."""
        delay = self.wait_backoff()
        self.start()
        for request in self.builds.values():
            reply = self.request(request, self.settings.start_timeout_s, "rebuilding its plugins")
            if not isinstance(reply, m.BuildReply) or reply.problems:
                self.kill("its plugins no longer build")
                raise HostDeadError(self.spec.label, "restart", f"could not rebuild '{request.name}' after a "
                                    f"restart: {getattr(reply, 'problems', reply)}")
        self.events("host_restart", {"host": self.spec.label, "plugin": ",".join(self.spec.names), "pid": self.pid,
                                     "reason": reason,
                                     "attempt": self.deaths, "after_s": round(delay, 2)})

    # -- requests -------------------------------------------------------------------------------------------
    def build(self, request: m.BuildRequest) -> m.BuildReply:
        reply = self.request(request, self.settings.start_timeout_s, "building a plugin")
        if not isinstance(reply, m.BuildReply) or reply.instance != request.instance:
            self.kill("answered a build with the wrong message")
            raise HostDeadError(self.spec.label, "build", "answered a build request with the wrong message")
        if not reply.problems:
            self.builds[request.instance] = request
        return reply

    def request(self, message: m.Message, timeout_s: float, what: str) -> m.Message:
        self.ensure_running(what)
        self.channel.send(m.encode(message), timeout_s, what)
        return self.channel.receive(timeout_s, what)

    def ensure_running(self, what: str) -> None:
        if self.closed:
            raise HostDeadError(self.spec.label, what, "is shut down")
        if self.proc is None and self.spec.shared is not None:
            raise HostDeadError(self.spec.label, what, SHARED_DEAD)
        if self.proc is None:
            try:
                self.restart(f"{what} needed it")
            except (HostStartError, HostDeadError) as exc:
                self.dead_at = time.monotonic()  # kill() already counted the death
                raise HostDeadError(self.spec.label, what, f"could not be restarted: {exc}") from exc
        # Liveness is checked while waiting for the answer (process, heartbeats, deadline), not here: a call
        # to a healthy host costs one round trip and nothing else.

    def call(self, instance: int, hook: str, kwargs: dict[str, Any], deadline_s: float,
             differentiate: bool = False) -> Call:
        """Run ``hook`` on ``instance`` in the host; tensors go by reference, results come back copied."""
        label = self.plugin_label(instance)
        self.ensure_running(hook)
        for _ in range(2):  # a second time only when the output segments had to grow
            wire, grad_inputs, cuda_events = self.tensors.encode(kwargs, differentiate, label, hook,
                                                                 cpu_only=self.sandbox is not None)
            call_id = next(self.call_ids)
            self.sync_segments(hook, label)
            self.channel.send(m.encode(m.CallRequest(call_id, instance, hook, wire, cuda_events)), deadline_s, hook,
                              label, deadline=True)
            reply = self.channel.receive(deadline_s, hook, label=label, deadline=True,
                                         watch=self.cpu_watch(hook, label))
            if not isinstance(reply, m.CallReply) or reply.call_id != call_id:
                self.kill("answered out of turn")
                raise HostDeadError(label, hook, f"(host pid {self.pid}) answered call {call_id} with "
                                    f"{type(reply).__name__}; the host was killed")
            if reply.needed_bytes:
                self.grow_outputs(reply.needed_bytes, reply.needed_device, label, hook)
                continue
            if reply.error is not None:
                raise RemoteError(label, hook, f"raised {reply.error} (in its host, pid {self.pid})",
                                  reply.traceback)
            self.deaths = 0
            result, grads = self.decoded(label, hook, [reply.result, reply.grads])
            if differentiate:
                check_grads(label, hook, grads, grad_inputs)
                if self.sandbox is not None:  # a sandboxed host computes on CPU copies
                    grads = [g if g is None else g.to(t.device) for g, t in zip(grads, grad_inputs, strict=True)]
            return Call(result, grads, grad_inputs)
        raise PluginError(label, hook, "needed more output space twice in a row")

    def state(self, instance: int, load: Any = None) -> Any:
        label = self.plugin_label(instance)
        what = "load_state_dict" if load is not None else "state_dict"
        self.ensure_running(what)
        for _ in range(2):  # a second time only when the output segments had to grow
            wire, _, cuda_events = self.tensors.encode(load, False, label, what, cpu_only=self.sandbox is not None)
            self.sync_segments(what, label)
            reply = self.request(m.StateRequest(instance, wire, cuda_events), self.settings.start_timeout_s, what)
            if not isinstance(reply, m.StateReply):
                self.kill("answered a state request with the wrong message")
                raise HostDeadError(label, what, "answered a state request with the wrong message")
            if reply.needed_bytes:
                self.grow_outputs(reply.needed_bytes, reply.needed_device, label, what)
                continue
            if reply.error is not None:
                raise PluginError(label, what, f"raised {reply.error}")
            return self.decoded(label, what, reply.state)
        raise PluginError(label, what, "needed more output space twice in a row")

    def plugin_label(self, instance: int) -> str:
        request = self.builds.get(instance)
        if request is not None:
            return f"{request.kind}:{request.name}"
        if self.hello is not None and -instance - 1 < len(self.hello.sources):
            return f"module:{self.hello.sources[-instance - 1].name}"
        return self.spec.label

    # -- tensors --------------------------------------------------------------------------------------------
    def sync_segments(self, what: str, label: str) -> None:
        """Send the host every segment it has not seen (all of them after a restart), before the request."""
        self.tensors.sync(lambda segment: self.channel.send_segment(segment, what, label))

    def decoded(self, label: str, hook: str, wire: Any) -> Any:
        """``wire`` as Python values, tensors copied out of the output slots. Whatever goes wrong here (a bad
        reference, absurd shapes, nesting too deep) means the host sent garbage: it is killed, and the call
        fails with ``HostDeadError``."""
        try:
            return from_wire(wire, self.tensors.tensor_out)
        except Exception as exc:
            self.kill(f"sent a malformed result: {exc!r:.200}")
            raise HostDeadError(label, hook, f"sent a malformed result ({exc!r:.200}); the host was killed") from None

    def grow_outputs(self, nbytes: int, device: int, label: str, hook: str) -> None:
        if not 0 < nbytes <= MAX_OUTPUT:
            self.kill(f"asked for {nbytes} bytes of output space")
            raise HostDeadError(label, hook, f"asked for {nbytes} bytes of output space (at most {MAX_OUTPUT}); "
                                f"the host was killed")
        self.tensors.grow(nbytes, device)
