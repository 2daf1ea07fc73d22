"""The kernel's side of a plugin host: spawn, handshake, calls with deadlines and heartbeats, restart with
backoff, and shutdown that escalates request -> SIGTERM -> SIGKILL. No process or segment outlives it.

The host is spawned (``python -m swiftk.hosts.host``, never forked: forking after torch started threads
deadlocks), in its own session so that a kill reaches whatever the plugin started. It talks over three zmq
``ipc://`` sockets in the abstract namespace (nothing on disk to leak): calls (PAIR), heartbeats (PULL,
conflated: only the newest matters) and orders (PUSH); shared-segment descriptors go over a Unix socket.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from swiftk.contracts import registry
from swiftk.contracts.errors import HostDeadError, PluginError
from swiftk.contracts.markers import CONTRACT_VERSION
from swiftk.hosts import messages as m
from swiftk.hosts.codec import Unsendable, from_wire, to_wire
from swiftk.hosts.tenants import Sandbox, Tenant
from swiftk.shm.cuda import CudaArena
from swiftk.shm.refs import BadReference, CudaRef, TensorRef
from swiftk.shm.segments import Arena, Segment

EventSink = Callable[[str, dict[str, Any]], None]
OUTPUT_IDS = 1 << 20  # output segments and buffers are numbered from here, inputs from 0
MAX_OUTPUT = 1 << 36  # a host asking for more output space than this is broken
_SPAWNED = itertools.count()


@dataclass(frozen=True)
class HostSettings:
    """``[hosts]``: supervision timings shared by every host."""

    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 10.0
    start_timeout_s: float = 60.0
    restart_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    shutdown_timeout_s: float = 5.0
    spin_us: float = 200.0


@dataclass(frozen=True)
class SharedSlot:
    """A host shared by the ranks of a node (``shared = "node"``): the node's first rank starts it, and every
    other rank is one more session of it, on endpoints named after ``base`` and its local rank. The token the
    host answers with travels through the process group's store (``publish`` / ``fetch``)."""

    base: str
    local_rank: int
    local_world_size: int
    publish: Callable[[str, str], None]
    fetch: Callable[[str, float], str]

    def endpoint(self, rank: int, suffix: str) -> str:
        return f"ipc://@{self.base}-{rank}-{suffix}"

    def channel(self, rank: int) -> str:
        return f"{self.base}-{rank}-fd"

    @property
    def token_key(self) -> str:
        return f"swiftk/shared/{self.base}/token"


@dataclass(frozen=True)
class HostSpec:
    """One host process: the plugin sources it imports (one, or a config ``group``) and its memory limit. A
    tenant's host runs sandboxed (``swiftk.hosts.sandbox``) with ``layers``."""

    label: str
    sources: list[str]
    names: list[str]
    memory_mb: int | None = None
    tenant: Tenant | None = None
    layers: tuple[str, ...] = ()
    shared: SharedSlot | None = None


class HostStartError(Exception):
    """A host did not start or did not complete the handshake."""


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


def console(event: str, fields: dict[str, Any]) -> None:
    """The default event sink: one line on stderr."""
    detail = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("traceback",))
    print(f"swiftk: {event}: {detail}", file=sys.stderr, flush=True)


def tenant_events(events: EventSink, tenant: str) -> EventSink:
    """Events of a tenant's host name the tenant: the kernel records them as audit records."""
    def sink(event: str, fields: dict[str, Any]) -> None:
        events(event, {"tenant": tenant, **fields})
    return sink


@dataclass
class Call:
    """What a call returned: the decoded result, the gradients, and the inputs they belong to."""

    result: Any
    grads: list[torch.Tensor | None] = field(default_factory=list)
    grad_inputs: list[torch.Tensor] = field(default_factory=list)


class Host:
    """One plugin host process, as the kernel sees it."""

    def __init__(self, spec: HostSpec, settings: HostSettings, context: zmq.Context[Any],
                 events: EventSink = console) -> None:
        self.spec, self.settings, self.context = spec, settings, context
        self.events = events if spec.tenant is None else tenant_events(events, spec.tenant.name)
        self.sandbox: Sandbox | None = None
        self.oom_kills = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.hello: m.HelloReply | None = None
        self.builds: dict[int, m.BuildRequest] = {}
        self.inputs = Arena(host_writable=False, announce=lambda s: None)
        self.outputs = Arena(host_writable=True, announce=lambda s: None, first_id=OUTPUT_IDS)
        self.cuda_inputs: dict[torch.device, CudaArena] = {}
        self.cuda_outputs: dict[torch.device, CudaArena] = {}
        self.cuda_handles: dict[int, tuple[list[Any], bool]] = {}
        self.announced: set[int] = set()  # segment ids the current host process has mapped
        self.cuda_announced: set[int] = set()  # CUDA buffer ids it has opened (another id space)
        self.call_ids = itertools.count(1)
        self.deaths = 0  # consecutive, reset by a successful call
        self.dead_at = 0.0
        self.last_beat = 0.0
        self.closed = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -- start ----------------------------------------------------------------------------------------------
    def spawn(self) -> None:
        tenant = self.spec.tenant
        if tenant is not None and self.sandbox is None:  # kept across restarts: folders, cgroups, policy
            self.sandbox = Sandbox(tenant, self.spec.sources, list(self.spec.layers),
                                   f"swiftk-{os.getpid()}-{next(_SPAWNED)}")
        # A sandboxed host is in another network namespace, where abstract sockets are not the kernel's: its
        # sockets are files in a folder only the tenant's uid may enter.
        base = (self.sandbox.endpoint("h") if self.sandbox is not None
                else f"ipc://@swiftk-{os.getpid()}-{next(_SPAWNED)}-{secrets.token_hex(4)}")
        self.bind_sockets(lambda suffix: f"{base}-{suffix}")
        self.fds, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.token = secrets.token_hex(16)
        command = [sys.executable, "-m", "swiftk.hosts", "--call", f"{base}-call", "--heartbeat",
                   f"{base}-hb", "--control", f"{base}-ctl", "--fd", str(child.fileno()), "--parent",
                   str(os.getpid() if self.sandbox is None else 0),
                   "--heartbeat-interval", str(self.settings.heartbeat_interval_s),
                   "--spin-us", str(self.settings.spin_us)]
        if threading.current_thread() is not threading.main_thread():
            command.append("--no-death-signal")
        if self.spec.memory_mb and self.sandbox is None:  # a sandbox sets its own limits
            command += ["--memory-mb", str(self.spec.memory_mb)]
        shared = self.spec.shared
        if shared is not None:  # the node's other ranks: one more session each
            for rank in range(1, shared.local_world_size):
                command += ["--guest", shared.endpoint(rank, "call"), shared.endpoint(rank, "hb"),
                            shared.endpoint(rank, "ctl"), shared.channel(rank)]
            shared.publish(shared.token_key, self.token)
        # Passive OpenMP waits: a host that spins after its call would steal the cores the kernel needs next.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "SWIFTK_HOST_TOKEN": self.token}
        stdin = None
        if self.sandbox is not None:  # the launcher builds the namespaces and forks the host inside them
            command, env, stdin = self.sandbox.command(command), self.sandbox.env(self.token), subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(command, pass_fds=(child.fileno(),), env=env, start_new_session=True,
                                         stdin=stdin)
        except BaseException:
            self.close_sockets()
            raise
        finally:
            child.close()
        self.announced.clear()
        self.cuda_announced.clear()
        self.last_beat = time.monotonic()

    def bind_sockets(self, endpoint: Callable[[str], str]) -> None:
        """Bind the calls (PAIR), heartbeats (PULL, conflated: only the newest matters) and orders (PUSH)
        sockets at ``endpoint("call" | "hb" | "ctl")``; the host connects to them."""
        self.calls = self.context.socket(zmq.PAIR)
        self.beats = self.context.socket(zmq.PULL)
        self.beats.setsockopt(zmq.CONFLATE, 1)
        self.orders = self.context.socket(zmq.PUSH)
        for sock, suffix in ((self.calls, "call"), (self.beats, "hb"), (self.orders, "ctl")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint(suffix))
            if self.sandbox is not None:
                self.sandbox.own_socket(endpoint(suffix))

    def handshake(self, same_code: bool = True) -> m.HelloReply:
        """Send the hello and check the reply: same contract version, the token this kernel gave the host, and
        (``same_code``) the code hash of each file as the kernel reads it. A host started for a hot reload skips
        that check: it runs what the file holds when it imports it, which a save during its start may change, and
        the reloader records the hash the host reports."""
        end = time.monotonic() + self.settings.start_timeout_s
        # A PAIR socket holds a message only once the host has connected: until then, watch the process (a host
        # that dies before connecting, e.g. a sandbox that could not be built, would block the send forever).
        while not self.calls.poll(int(self.settings.heartbeat_interval_s * 1000), zmq.POLLOUT):
            self.check_alive("the handshake", starting=True)
            if time.monotonic() >= end:
                pid = self.pid
                self.kill("did not connect")
                raise HostStartError(f"host '{self.spec.label}' (pid {pid}) did not connect within "
                                     f"{self.settings.start_timeout_s:g} s (see [hosts] start_timeout_s)")
        self.send(m.encode(m.HelloRequest(CONTRACT_VERSION, self.token, self.spec.sources, self.spec.names)),
                  max(end - time.monotonic(), 0.001), "the handshake", starting=True)
        reply = self.receive(max(end - time.monotonic(), 0.001), "the handshake", starting=True)
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
        delay = min(self.settings.restart_backoff_s * 2 ** max(self.deaths - 1, 0), self.settings.max_backoff_s)
        wait = self.dead_at + delay - time.monotonic()
        if wait > 0:
            time.sleep(wait)
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
        self.send(m.encode(message), timeout_s, what)
        return self.receive(timeout_s, what)

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
            wire, grad_inputs, cuda_events = self.encode(kwargs, differentiate, label, hook)
            call_id = next(self.call_ids)
            self.sync_segments(hook, label)
            self.send(m.encode(m.CallRequest(call_id, instance, hook, wire, cuda_events)), deadline_s, hook, label,
                      deadline=True)
            reply = self.receive(deadline_s, hook, label=label, deadline=True, cpu_budget=self.cpu_budget())
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

    def decoded(self, label: str, hook: str, wire: Any) -> Any:
        """``wire`` as Python values, tensors copied out of the output slots. Whatever goes wrong here (a bad
        reference, absurd shapes, nesting too deep) means the host sent garbage: it is killed, and the call
        fails with ``HostDeadError``."""
        try:
            return from_wire(wire, self.tensor_out)
        except Exception as exc:
            self.kill(f"sent a malformed result: {exc!r:.200}")
            raise HostDeadError(label, hook, f"sent a malformed result ({exc!r:.200}); the host was killed") from None

    def grow_outputs(self, nbytes: int, device: int, label: str, hook: str) -> None:
        if not 0 < nbytes <= MAX_OUTPUT:
            self.kill(f"asked for {nbytes} bytes of output space")
            raise HostDeadError(label, hook, f"asked for {nbytes} bytes of output space (at most {MAX_OUTPUT}); "
                                f"the host was killed")
        if device < 0:
            self.outputs.reserve(nbytes)
        else:
            self.cuda_arena(self.cuda_outputs, torch.device("cuda", device), OUTPUT_IDS).reserve(nbytes)

    def state(self, instance: int, load: Any = None) -> Any:
        label = self.plugin_label(instance)
        what = "load_state_dict" if load is not None else "state_dict"
        self.ensure_running(what)
        for _ in range(2):  # a second time only when the output segments had to grow
            wire, _, cuda_events = self.encode(load, False, label, what)
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
    def encode(self, value: Any, differentiate: bool, label: str, hook: str
               ) -> tuple[Any, list[torch.Tensor], list[m.CudaBufferEvent]]:
        self.inputs.reset()
        for arena in self.cuda_inputs.values():
            arena.reset()
        grad_inputs: list[torch.Tensor] = []
        grad_bytes: dict[torch.device, int] = {}

        def tensor(t: torch.Tensor) -> TensorRef | Any:
            needs = differentiate and t.requires_grad and t.is_floating_point()
            if needs:
                grad_inputs.append(t)
                grad_bytes[t.device] = grad_bytes.get(t.device, 0) + t.numel() * t.element_size() + 64
            if t.is_cuda and self.sandbox is None:
                return self.cuda_arena(self.cuda_inputs, t.device, 0).put(t, needs)
            # A sandboxed host gets CPU copies: CUDA IPC handles cannot be opened from another pid namespace.
            return self.inputs.put(t.cpu() if t.is_cuda else t, needs)

        try:
            wire = to_wire(value, tensor, "argument")
        except Unsendable as exc:
            raise PluginError(label, hook, f"cannot run in a plugin host: {exc}") from None
        for device, nbytes in grad_bytes.items():  # the gradients come back in output slots sized up front
            if device.type == "cuda":
                self.cuda_arena(self.cuda_outputs, device, OUTPUT_IDS).reserve(nbytes + (1 << 20))
            else:
                self.outputs.reserve(nbytes + (1 << 20))
        if not self.outputs.segments:
            self.outputs.reserve(1 << 20)
        for device in {d for d in grad_bytes if d.type == "cuda"} | {a.device for a in self.cuda_inputs.values()}:
            torch.cuda.current_stream(device).synchronize()  # the copies are done before the host reads them
        events = [m.CudaBufferEvent(buffer, handle, writable) for buffer, (handle, writable)
                  in self.cuda_handles.items() if buffer not in self.cuda_announced]
        self.cuda_announced.update(e.buffer for e in events)
        return wire, grad_inputs, events

    def cuda_arena(self, arenas: dict[torch.device, CudaArena], device: torch.device, first_id: int) -> CudaArena:
        if device not in arenas:
            writable = arenas is self.cuda_outputs
            start = first_id + 1000 * (device.index or 0) + 100_000 * (1 if not writable else 0)

            def announce(buffer: int, handle: list[Any]) -> None:
                self.cuda_handles[buffer] = (handle, writable)

            arenas[device] = CudaArena(device, announce, start)
        return arenas[device]

    def tensor_out(self, ref: TensorRef | CudaRef) -> torch.Tensor:
        if isinstance(ref, CudaRef):
            for arena in self.cuda_outputs.values():
                if any(buffer == ref.buffer for buffer, _ in arena.buffers):
                    return arena.view(ref).clone()
            raise BadReference(f"CUDA result names buffer {ref.buffer}, which is not an output buffer")
        if ref.segment < OUTPUT_IDS:
            raise BadReference(f"result names input segment {ref.segment}")
        return self.outputs.view(ref).clone()

    def sync_segments(self, what: str, label: str) -> None:
        """Send the host every segment it has not seen (all of them after a restart), before the request."""
        for segment in (*self.inputs.segments, *self.outputs.segments):
            if segment.id not in self.announced:
                self.send_segment(segment, what, label)
                self.announced.add(segment.id)

    def send_segment(self, segment: Segment, what: str, label: str) -> None:
        """One segment's descriptor and fd over the Unix channel: a host that is gone (a broken pipe) or stuck (a
        full channel) is a ``HostDeadError``, never an ``OSError`` that ends the run or a send that never returns."""
        fd = segment.host_fd()
        try:
            event = m.encode(m.SegmentEvent(segment.id, segment.size, segment.host_writable))
            self.fds.settimeout(self.settings.heartbeat_timeout_s)
            socket.send_fds(self.fds, [event], [fd])
        except OSError as exc:  # TimeoutError included
            self.check_process(what, label)  # a death explains itself
            pid = self.pid
            self.kill(f"its segment channel failed: {exc!r}")
            raise HostDeadError(label, what, f"failed: its host (pid {pid}) did not take a shared segment "
                                f"({exc!r}); the host was killed and restarts on the next call") from None
        finally:
            os.close(fd)

    # -- supervision ----------------------------------------------------------------------------------------
    def cpu_budget(self) -> tuple[float, float] | None:
        """(CPU seconds the host has used so far, what one call may add): a tenant's ``cpu_seconds_per_call``,
        counted by its cgroup; None when there is no budget or no cgroup to count it."""
        tenant, cgroups = self.spec.tenant, self.sandbox.cgroups if self.sandbox else None
        if tenant is None or tenant.cpu_seconds_per_call is None or cgroups is None:
            return None
        used = cgroups.cpu_seconds()
        return None if used is None else (used, tenant.cpu_seconds_per_call)

    def send(self, frame: bytes, timeout_s: float, what: str, label: str | None = None, deadline: bool = False,
             starting: bool = False) -> None:
        """Queue ``frame`` for the host, watching its process and heartbeats while it cannot be queued: a PAIR
        socket whose peer is gone blocks a plain send forever (a host that died between two calls)."""
        label = label or self.spec.label
        end = time.monotonic() + timeout_s
        while True:
            try:
                self.calls.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:  # no peer (it left, or has not connected yet), or its queue is full
                pass
            if self.calls.poll(max(1, int(min(end - time.monotonic(), self.settings.heartbeat_interval_s) * 1000)),
                               zmq.POLLOUT):
                continue
            self.check_alive(what, label, starting)
            self.check_deadline(end, timeout_s, what, label, deadline, "take the request")

    def receive(self, timeout_s: float, what: str, label: str | None = None, deadline: bool = False,
                starting: bool = False, cpu_budget: tuple[float, float] | None = None) -> m.Message:
        """The host's next message, watching its process, heartbeats, the deadline and the CPU budget."""
        label = label or self.spec.label
        end = time.monotonic() + timeout_s
        while True:
            remaining = end - time.monotonic()
            if self.calls.poll(max(1, int(min(remaining, self.settings.heartbeat_interval_s) * 1000))):
                frame = self.calls.recv()
                try:
                    return m.decode(frame)
                except m.ProtocolError as exc:
                    self.kill(f"sent a malformed message: {exc}")
                    raise HostDeadError(label, what, f"(host pid {self.pid}) sent a malformed message ({exc}); "
                                        f"the host was killed") from None
            self.check_alive(what, label, starting)
            if cpu_budget is not None and self.sandbox is not None and self.sandbox.cgroups is not None:
                used = (self.sandbox.cgroups.cpu_seconds() or 0.0) - cpu_budget[0]
                if used > cpu_budget[1]:
                    pid = self.pid
                    self.kill(f"{what} used {used:.1f} CPU-seconds, over its {cpu_budget[1]:g} s budget")
                    raise HostDeadError(label, what, f"used more than {cpu_budget[1]:g} CPU-seconds in one call "
                                        f"(see cpu_seconds_per_call); its host (pid {pid}) was killed and restarts "
                                        f"on the next call")
            self.check_deadline(end, timeout_s, what, label, deadline, "answer")

    def check_deadline(self, end: float, timeout_s: float, what: str, label: str, deadline: bool, doing: str) -> None:
        """Past ``end``, the host is killed and ``what`` fails: it did not ``doing`` within ``timeout_s``."""
        if time.monotonic() < end:
            return
        pid = self.pid
        key = "deadline_s" if deadline else "[hosts] start_timeout_s"
        self.kill(f"{what} missed its {timeout_s:g} s deadline (did not {doing})")
        raise HostDeadError(label, what, f"did not {doing} within {timeout_s:g} s (see {key}); its host (pid {pid}) "
                            f"was killed and restarts on the next call")

    def check_alive(self, what: str, label: str | None = None, starting: bool = False) -> None:
        label = label or self.spec.label
        self.check_process(what, label)
        while self.beats.poll(0):
            try:
                beat = m.decode(self.beats.recv())
            except m.ProtocolError:
                continue
            if isinstance(beat, m.HeartbeatEvent):
                self.last_beat = time.monotonic()
        silent = time.monotonic() - self.last_beat
        if not starting and silent > self.settings.heartbeat_timeout_s:
            pid = self.pid
            self.kill(f"missed heartbeats for {silent:.1f} s")
            raise HostDeadError(label, what, f"failed: its host (pid {pid}) missed heartbeats for {silent:.1f} s; see "
                                f"[hosts] heartbeat_timeout_s")

    def check_process(self, what: str, label: str) -> None:
        """``HostDeadError`` when the host process has exited (it is reaped, and the reason logged)."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            how += self.death_cause(code)
            pid = self.proc.pid
            self.kill(how)
            raise HostDeadError(label, what, f"failed: its host (pid {pid}) {how}")

    def death_cause(self, code: int) -> str:
        """What a sandboxed host's death most likely means (the sandbox turns escapes into these)."""
        if self.sandbox is None:
            return ""
        cgroups = self.sandbox.cgroups
        if code == -signal.SIGKILL and cgroups is not None and cgroups.oom_kills() > self.oom_kills:
            self.oom_kills = cgroups.oom_kills()
            return f" (over its memory limit of {self.sandbox.tenant.memory_mb} MiB: the cgroup's OOM killer)"
        if code == -signal.SIGXCPU:
            return " (its lifetime CPU limit, cpu_seconds_total)"
        if code in (-signal.SIGSEGV, -signal.SIGBUS):
            return " (a memory fault, e.g. writing to a read-only input tensor)"
        if code == 70:
            return " (its sandbox could not be built; the launcher printed why)"
        return ""

    def kill(self, reason: str) -> None:
        """SIGKILL the host's whole session now and forget its sockets (segments stay for the next host)."""
        if self.proc is None:
            return
        pid = self.proc.pid
        self.signal_group(signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self.close_sockets()
        self.deaths += 1
        self.dead_at = time.monotonic()
        self.events("host_dead", {"host": self.spec.label, "plugin": ",".join(self.spec.names), "pid": pid,
                                  "reason": reason})

    def signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def close_sockets(self) -> None:
        for sock in (self.calls, self.beats, self.orders):
            sock.close(linger=0)
        self.fds.close()

    def shutdown(self) -> None:
        """Ask the host to leave, then SIGTERM, then SIGKILL, logging each escalation; free every segment."""
        self.closed = True
        if self.proc is not None:
            proc, pid, wait_s = self.proc, self.proc.pid, self.settings.shutdown_timeout_s
            try:
                self.orders.send(m.encode(m.ShutdownRequest("the run is over")), zmq.NOBLOCK)
            except zmq.ZMQError:  # no peer to take it (the host is gone or never connected): escalate
                pass
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    self.signal_group(sig)  # first, so that a failing event sink cannot leave the host alive
                    self.events("host_shutdown", {"host": self.spec.label, "pid": pid,
                                                  "escalation": sig.name, "after_s": wait_s})
            proc.wait()
            self.signal_group(signal.SIGKILL)  # anything the plugin started in the host's session
            self.proc = None
            self.close_sockets()
        self.free_segments()
        if self.sandbox is not None:
            self.sandbox.close()

    def free_segments(self) -> None:
        self.inputs.close()
        self.outputs.close()
        for arena in (*self.cuda_inputs.values(), *self.cuda_outputs.values()):
            arena.close()


SHARED_DEAD = ("its shared host is gone: a host shared by a node's ranks is not restarted (the node's other ranks "
               "hold sessions with the dead one); its plugin's failure policy applies from now on. Use shared = "
               "\"rank\" (one host per rank) for plugins that must come back")


class GuestHost(Host):
    """A rank's session with the host its node's first rank started (``shared = "node"``): the same calls,
    segments and supervision, but no process of its own. The host connects to this rank's endpoints; a death
    is seen through the host's pid and heartbeats, and the host is not restarted (``SHARED_DEAD``)."""

    def __init__(self, spec: HostSpec, settings: HostSettings, context: zmq.Context[Any],
                 events: EventSink = console) -> None:
        super().__init__(spec, settings, context, events)
        assert spec.shared is not None
        self.shared = spec.shared
        self.host_pid: int | None = None
        self.gone = False

    @property
    def pid(self) -> int | None:
        return self.host_pid

    def spawn(self) -> None:
        rank = self.shared.local_rank
        self.bind_sockets(lambda suffix: self.shared.endpoint(rank, suffix))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind("\0" + self.shared.channel(rank))
        self.listener.listen(1)
        self.fds = self.listener  # until the host connects its segment channel
        self.token = self.shared.fetch(self.shared.token_key, self.settings.start_timeout_s)
        self.last_beat = time.monotonic()

    def handshake(self, same_code: bool = True) -> m.HelloReply:
        self.listener.settimeout(self.settings.start_timeout_s)
        try:
            self.fds, _ = self.listener.accept()
        except TimeoutError:
            raise HostStartError(f"the shared host '{self.spec.label}' of this node did not connect within "
                                 f"{self.settings.start_timeout_s:g} s (local rank 0 starts it)") from None
        finally:
            self.listener.close()
        reply = super().handshake(same_code)
        self.host_pid = reply.pid
        return reply

    def ensure_running(self, what: str) -> None:
        if self.closed:
            raise HostDeadError(self.spec.label, what, "is shut down")
        if self.gone:
            raise HostDeadError(self.spec.label, what, SHARED_DEAD)

    def check_process(self, what: str, label: str) -> None:
        if self.host_pid is None:
            return
        try:
            state = Path(f"/proc/{self.host_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "gone"
        if state in ("Z", "X", "gone"):
            pid = self.host_pid
            self.kill("exited")
            raise HostDeadError(label, what, f"failed: its shared host (pid {pid}, started by local rank 0) exited")

    def kill(self, reason: str) -> None:
        """Kill the shared host (a hung host hangs every rank of the node) and leave it for good."""
        if self.gone:
            return
        pid, self.gone, self.host_pid = self.host_pid, True, None
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.close_sockets()
        self.deaths += 1
        self.dead_at = time.monotonic()
        self.events("host_dead", {"host": self.spec.label, "plugin": ",".join(self.spec.names), "pid": pid,
                                  "reason": reason})

    def shutdown(self) -> None:
        """Tell the host this rank is done (it leaves when every rank is); free this rank's segments."""
        self.closed = True
        if not self.gone:
            try:
                self.orders.send(m.encode(m.ShutdownRequest("this rank is done")), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.close_sockets()
        self.free_segments()


class RemoteError(PluginError):
    """The plugin raised (or broke its contract) in its host; the host lives on."""

    def __init__(self, plugin: str, hook: str, message: str, traceback: str | None) -> None:
        super().__init__(plugin, hook, message)
        self.remote_traceback = traceback
