"""A plugin host process: ``python -m swiftk.hosts``. It runs no kernel code.

Lifecycle: ``initialize`` once (handshake, import the plugin sources), ``handle`` many (build, call, state),
and a control thread that sends heartbeats and obeys ``ShutdownRequest``. It dies with the kernel: the
parent-death signal is SIGKILL, and the control thread also exits when the kernel's pid is gone.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

import torch
import zmq

from swiftk.contracts.checks import checked_loss
from swiftk.contracts.conformance import describe, hookimpl_problems, spec_problems
from swiftk.contracts.markers import CONTRACT_VERSION, PROJECT_NAME
from swiftk.contracts.registry import (
    PluginRegistryError,
    has_hookimpls,
    import_source,
    lookup,
    registered,
    source_hash,
)
from swiftk.contracts.types import LossResult
from swiftk.hosts import messages as m
from swiftk.hosts import wire
from swiftk.hosts.codec import from_wire, tensor_bytes, to_wire
from swiftk.hosts.sandbox import Policy, address_space_limit, confine
from swiftk.shm.cuda import CudaMapping
from swiftk.shm.refs import CudaRef, TensorRef
from swiftk.shm.segments import Mapping, OutputFull

PR_SET_PDEATHSIG = 1
REPLY_DEADLINE_S = 30.0  # a kernel session that takes no reply for this long is gone
_exit = os._exit  # bound before any plugin is imported


def die_with_parent(parent: int, signal_on_death: bool) -> None:
    """SIGKILL this process when the kernel dies, even by ``kill -9``.

    The parent-death signal fires when the *thread* that spawned the host exits, so it is asked for only by
    hosts the kernel's main thread spawned; the control thread's parent watch covers the others (a host
    started in the background for a hot reload) within one heartbeat interval."""
    if signal_on_death:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the kernel died before prctl took effect
        _exit(1)


def shutdown(reason: str) -> None:
    """Leave now: the kernel owns every segment, so there is nothing to flush but stdio."""
    sys.stdout.flush()
    sys.stderr.flush()
    _exit(0)


def hook_infos(obj: object) -> tuple[list[m.HookInfo], list[str]]:
    """The ``@hookimpl`` methods of ``obj``, with the argument names the kernel must send."""
    hooks, problems = [], []
    for attr in sorted(dir(obj)):
        impl = getattr(obj, attr, None)
        opts = getattr(impl, f"{PROJECT_NAME}_impl", None)
        if not attr.startswith("swiftk_") or opts is None:
            continue
        if opts.get("hookwrapper") or opts.get("wrapper"):
            problems.append(f"{attr} is a hook wrapper, which cannot run in a plugin host")
            continue
        assert impl is not None
        params = [p for p in inspect.signature(impl).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        hooks.append(m.HookInfo(attr, [p.name for p in params], bool(opts.get("tryfirst")),
                                bool(opts.get("trylast"))))
    return hooks, problems


class Session:
    """One kernel this host serves: its socket, the segments it sent, the plugins it built. A host serves one
    kernel, or (a shared host) every rank of a node: the first rank's session, then one per other rank."""

    def __init__(self, heartbeat: str, control: str, link: socket.socket, primary: bool) -> None:
        self.heartbeat, self.control, self.link, self.primary = heartbeat, control, link, primary
        self.link.setblocking(False)
        self.reader = wire.Reader(link)
        self.mapping = Mapping()
        self.cuda = CudaMapping()
        self.instances: dict[int, object] = {}
        self.greeted = False
        self.closed = False


def guest_channel(name: str, timeout_s: float = 60.0) -> socket.socket:
    """Connect to the segment channel a rank of the node listens on (abstract Unix socket ``name``)."""
    end = time.monotonic() + timeout_s
    while True:
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            channel.connect("\0" + name)
            return channel
        except OSError:  # that rank has not started listening yet
            channel.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


class Server:
    def __init__(self, args: argparse.Namespace, token: str, sandbox: dict[str, str] | None = None) -> None:
        self.args, self.token, self.sandbox = args, token, sandbox
        self.context = zmq.Context()
        self.sessions = [Session(args.heartbeat, args.control, socket.socket(fileno=args.fd), primary=True)]
        for heartbeat, control, channel in args.guest or []:  # the node's other ranks (a shared host)
            self.sessions.append(Session(heartbeat, control, guest_channel(channel), False))
        self.imported: dict[str, Any] = {}  # source -> module, or the exception importing it raised
        self.use(self.sessions[0])
        self.control = threading.Thread(target=self.watch, name="swiftk-host-control", daemon=True)

    def use(self, session: Session) -> None:
        """Serve ``session``'s request: its socket, segments and plugins."""
        self.session = session
        self.link, self.mapping, self.cuda = session.link, session.mapping, session.cuda
        self.instances = session.instances

    # -- control thread: heartbeats, shutdown, parent watch -------------------------------------------------
    def watch(self) -> None:
        """Heartbeats to every session; a shutdown order closes its session, and the host leaves once every
        session is closed."""
        links = []
        poller = zmq.Poller()
        for session in self.sessions:
            beats = self.context.socket(zmq.PUSH)
            beats.setsockopt(zmq.SNDHWM, 2)
            beats.setsockopt(zmq.LINGER, 0)
            beats.connect(session.heartbeat)
            orders = self.context.socket(zmq.PULL)
            orders.connect(session.control)
            poller.register(orders, zmq.POLLIN)
            links.append((session, beats, orders))
        seq = 0
        while True:
            if self.args.parent and os.getppid() != self.args.parent:  # 0: a sandbox launcher watches the kernel
                _exit(1)
            for _, beats, _ in links:
                try:
                    beats.send(m.encode(m.HeartbeatEvent(os.getpid(), seq, time.monotonic())), zmq.NOBLOCK)
                except zmq.Again:
                    pass
            seq += 1
            ready = dict(poller.poll(int(self.args.heartbeat_interval * 1000)))
            for session, _, orders in links:
                if orders not in ready:
                    continue
                try:
                    order = m.decode(orders.recv())
                except m.ProtocolError:
                    continue
                if isinstance(order, m.ShutdownRequest):
                    session.closed = True
            if all(session.closed for session in self.sessions):
                shutdown("every kernel it served is done")

    # -- main thread ----------------------------------------------------------------------------------------
    def serve(self) -> int:
        self.control.start()
        while True:
            request = self.next_request()  # also selects the session it came from
            if not self.session.greeted:  # a kernel's first message is its hello
                if not isinstance(request, m.HelloRequest):
                    return 2
                self.session.greeted = True
                self.send(self.initialize(request))
                continue
            self.send(self.handle(request))

    def next_request(self) -> m.Message:
        """The next request, from whichever session sends one, with the segments announced before it mapped;
        busy-waits ``--spin-us`` first, since hook calls come in bursts (batch start, loss, step end...) and a
        sleeping process takes tens of microseconds to wake."""
        end = time.perf_counter() + self.args.spin_us / 1e6
        while (request := self.any_request()) is None:
            if time.perf_counter() < end:
                continue
            poller = select.poll()
            for session in self.sessions:
                if not session.closed:
                    poller.register(session.link, select.POLLIN)
            poller.poll()
        return request

    def any_request(self) -> m.Message | None:
        """The first open session's request that is all here, else None."""
        for session in self.sessions:
            if not session.closed and (request := self.take(session)) is not None:
                return request
        return None

    def take(self, session: Session) -> m.Message | None:
        """``session``'s next request if it is all here (mapping each segment announced on the way), else None.
        A kernel that closed its socket is gone: the host leaves with its only kernel, and a shared host closes
        that rank's session."""
        while True:
            try:
                got = session.reader.read()
            except wire.PeerGone:
                self.leave(session, "its kernel closed its socket")
                return None
            if got is None:
                return None
            frame, fds = got
            message = m.decode(frame)  # a malformed frame from the kernel ends this host (ProtocolError)
            if isinstance(message, m.SegmentEvent):
                if fds:
                    session.mapping.attach(message.segment, fds[0], message.size, message.writable)
                continue
            for fd in fds:
                os.close(fd)
            self.use(session)
            return message

    def send(self, message: m.Message) -> None:
        """Reply to the session that asked. A kernel that takes no reply for ``REPLY_DEADLINE_S`` is gone."""
        end = time.monotonic() + REPLY_DEADLINE_S
        for packet in wire.packets(m.encode(message)):
            while True:
                try:
                    if wire.try_send(self.link, packet):
                        break
                except wire.PeerGone:
                    self.leave(self.session, "its kernel closed its socket")
                    return
                if time.monotonic() >= end:
                    self.leave(self.session, "its kernel takes no replies")
                    return
                wire.wait(self.link, 0.1, writable=True)

    def leave(self, session: Session, reason: str) -> None:
        """Close ``session``; the host exits with its primary kernel, or once every session is closed."""
        if session.primary:
            shutdown(reason)
        session.closed = True
        if all(s.closed for s in self.sessions):
            shutdown("every kernel it served is gone")

    def initialize(self, hello: m.HelloRequest) -> m.HelloReply:
        sources = []
        for index, (source, name) in enumerate(zip(hello.sources, hello.names, strict=True)):
            if source not in self.imported:  # a shared host imports each source once, for every session
                try:
                    self.imported[source] = import_source(source)
                except BaseException as exc:
                    self.imported[source] = exc
            module = self.imported[source]
            if isinstance(module, BaseException):
                sources.append(m.SourceInfo(source, name, "", [], [], error=describe(module)))
                continue
            specs = [s for s in registered() if getattr(s.target, "__module__", None) == module.__name__]
            hooks: list[m.HookInfo] = []
            problems: list[str] = []
            if has_hookimpls(module):  # the module's own @hookimpl functions: checked as at a kernel's start
                hooks, problems = hook_infos(module)
                problems += hookimpl_problems(module)
                self.instances[-(index + 1)] = module
            registrations = [m.Registration(s.kind, s.name, s.contract, getattr(s.target, "__qualname__", "?"))
                             for s in specs]
            sources.append(m.SourceInfo(source, name, source_hash(module), registrations, hooks,
                                        error="; ".join(problems) or None))
        versions = {"python": sys.version.split()[0], "torch": torch.__version__}
        return m.HelloReply(CONTRACT_VERSION, self.token if hello.token == self.token else "", os.getpid(),
                            versions, sources, sandbox=self.sandbox)

    def handle(self, request: m.Message) -> m.Message:
        if isinstance(request, m.CallRequest):
            return self.call(request)
        if isinstance(request, m.BuildRequest):
            return self.build(request)
        if isinstance(request, m.StateRequest):
            return self.state(request)
        raise m.ProtocolError(f"a host does not handle {type(request).__name__}")

    def build(self, request: m.BuildRequest) -> m.BuildReply:
        try:
            spec = lookup(request.kind, request.name)
        except PluginRegistryError as exc:
            return m.BuildReply(request.instance, [], False, [str(exc)])
        problems = spec_problems(spec, request.config)
        if problems:
            return m.BuildReply(request.instance, [], False, problems)
        try:
            obj = spec.build(**request.config)
        except Exception as exc:
            return m.BuildReply(request.instance, [], False, [f"building it failed: {describe(exc)}"])
        hooks, problems = hook_infos(obj)
        self.instances[request.instance] = obj
        stateful = callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
        return m.BuildReply(request.instance, hooks, stateful, problems)

    def tensor_in(self, leaves: list[torch.Tensor]) -> Any:
        def make(ref: TensorRef | CudaRef) -> torch.Tensor:
            tensor = self.cuda.view(ref) if isinstance(ref, CudaRef) else self.mapping.view(ref)
            if ref.requires_grad:
                tensor = tensor.detach().requires_grad_()
                leaves.append(tensor)
            return tensor
        return make

    def tensor_out(self, tensor: torch.Tensor) -> TensorRef | CudaRef:
        return self.cuda.put(tensor) if tensor.is_cuda else self.mapping.put(tensor)

    def call(self, request: m.CallRequest) -> m.CallReply:
        for buffer in request.cuda_buffers:
            self.cuda.attach(buffer.buffer, buffer.handle, buffer.writable)
        leaves: list[torch.Tensor] = []
        try:
            kwargs = from_wire(request.kwargs, self.tensor_in(leaves))
            impl = getattr(self.instances[request.instance], request.hook)
            result = impl(**kwargs)
            grads: list[torch.Tensor | None] = []
            if leaves:  # a differentiable hook (a loss): checked here, where it ran (the kernel re-checks it)
                checked = checked_loss(result)
                grads = list(torch.autograd.grad(checked.loss, leaves, allow_unused=True))
                result = LossResult(checked.loss.detach(), checked.metrics)
        except (Exception, SystemExit) as exc:  # the call failed; the host lives on
            return m.CallReply(request.call_id, None, [], error=describe(exc),
                               traceback="".join(traceback.format_exception(exc)[-6:]))
        return self.reply(request.call_id, result, grads)

    def write(self, value: Any, what: str) -> Any:
        """``value`` on the wire, its tensors written into the kernel's output slots (``OutputFull`` when they
        are too small, naming the device); CUDA writes are finished before the reply leaves."""
        self.mapping.reset_outputs()
        self.cuda.reset_outputs()
        try:
            self.mapping.make_room(tensor_bytes(value, cuda=False))
            wire = to_wire(value, self.tensor_out, what)
        except OutputFull as exc:
            if exc.device >= 0:  # ask for room for every CUDA result at once
                raise OutputFull(max(exc.needed, tensor_bytes(value)), exc.device) from None
            raise
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.synchronize()
        return wire

    def reply(self, call_id: int, result: Any, grads: list[torch.Tensor | None]) -> m.CallReply:
        try:
            wire, wire_grads = self.write([result, grads], "the result")
        except OutputFull as exc:
            return m.CallReply(call_id, None, [], needed_bytes=exc.needed, needed_device=exc.device)
        except Exception as exc:
            return m.CallReply(call_id, None, [], error=f"returned something that cannot be sent back: {exc}")
        return m.CallReply(call_id, wire, wire_grads)

    def state(self, request: m.StateRequest) -> m.StateReply:
        for buffer in request.cuda_buffers:
            self.cuda.attach(buffer.buffer, buffer.handle, buffer.writable)
        obj = self.instances[request.instance]
        try:
            if request.load is not None:
                obj.load_state_dict(from_wire(request.load, self.tensor_in([])))  # type: ignore[attr-defined]
                return m.StateReply(request.instance, None)
            return m.StateReply(request.instance, self.write(obj.state_dict(), "the state"))  # type: ignore[attr-defined]
        except OutputFull as exc:
            return m.StateReply(request.instance, None, needed_bytes=exc.needed, needed_device=exc.device)
        except Exception as exc:
            return m.StateReply(request.instance, None, error=describe(exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swiftk-host", description="serve one or more plugins for a kernel")
    parser.add_argument("--heartbeat", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--memory-mb", type=int, default=0)
    parser.add_argument("--spin-us", type=float, default=0.0)
    parser.add_argument("--no-death-signal", action="store_true", help="spawned by a kernel thread that may end")
    parser.add_argument("--sandbox", help="a tenant's sandbox policy (JSON): confine this host before serving")
    parser.add_argument("--guest", nargs=3, action="append", metavar=("HEARTBEAT", "CONTROL", "CHANNEL"),
                        help="a shared host: also serve another rank of the node (its endpoints)")
    args = parser.parse_args(argv)
    if args.parent:  # else a sandbox launcher is the parent, and it watches the kernel
        die_with_parent(args.parent, not args.no_death_signal)
    if args.memory_mb:
        limit = address_space_limit(args.memory_mb)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    token = os.environ.pop("SWIFTK_HOST_TOKEN", "")
    # Everything the host needs is imported above, as root; the tenant's code is imported only after this.
    report = confine(Policy.from_json(args.sandbox)) if args.sandbox else None
    return Server(args, token, report).serve()


if __name__ == "__main__":
    sys.exit(main())
