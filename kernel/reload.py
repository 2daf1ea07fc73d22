"""Hot reload: edit a plugin file while training runs; the next step uses the new code.

    save -> watchdog event (close-after-write, or a rename onto the file) -> debounce 100 ms
         -> background: import the new code into a fresh module (or start a fresh host with it), run the
            contract checks, build the plugins again with their config
         -> main thread, at the next step boundary: probe a loss on the last batch (finite, 0-dim, gradient
            reaches the logits), carry the plugin's state over, unregister the old plugin, register the new

A broken edit (syntax or import error, failing checks or probe) is rejected with file:line and traceback;
the old code keeps running. Every swap and rejection is a record in metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from swiftk.contracts import ModelOutputs, PluginSpec, checks, lookup
from swiftk.contracts.conformance import describe, hookimpl_problems, spec_problems
from swiftk.contracts.registry import (
    file_hash,
    has_hookimpls,
    import_source,
    registrations_of,
    reinstate,
)
from swiftk.hosts.proxy import RemotePlugin, make_proxy
from swiftk.hosts.supervisor import Host
from swiftk.kernel.plugins import Plugins, new_manager

DEBOUNCE_S = 0.1


class RejectedEdit(Exception):
    """The new code cannot replace the old (it does not import, breaks the contract, or fails the probe)."""


@dataclass
class Candidate:
    """New code, imported and built, waiting for the next step boundary."""

    path: str
    new_hash: str
    plugins: dict[str, object]  # registered name -> the new plugin
    previous: list[PluginSpec]  # registrations to put back if the probe rejects it
    saved_at: float
    ready_at: float
    host: tuple[Host, Host] | None = None  # (old, new) when the plugin lives in a host


@dataclass
class Failure:
    path: str
    error: str
    saved_at: float


@dataclass
class Reloader:
    """Watches the run's plugin files and swaps new code in at step boundaries (``apply``)."""

    plugins: Plugins
    paths: list[str]  # plugin files to watch (absolute)
    debounce_s: float = DEBOUNCE_S
    ready: queue.Queue[Candidate | Failure] = field(default_factory=queue.Queue)
    last: tuple[Any, dict[str, Any], Any] | None = None  # batch, its outputs' fields (detached), state
    touched: dict[str, float] = field(default_factory=dict)  # path -> first event of the current burst
    quiet_since: dict[str, float] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    helpers: dict[str, str] = field(default_factory=dict)  # a local module's file -> the plugin file using it

    def start(self) -> None:
        for path in self.paths:
            self.track_helpers(path)
            self.hashes[path] = self.content_hash(path)
        self.lock = threading.Condition()
        self.stopped = False
        self.observer = Observer()
        for folder in sorted({str(Path(p).parent) for p in self.paths}):
            self.observer.schedule(_Events(self), folder, recursive=False)
        self.observer.start()
        self.worker = threading.Thread(target=self.work, name="swiftk-reload", daemon=True)
        self.worker.start()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.observer.stop()
        self.observer.join()
        self.worker.join()
        while not self.ready.empty():  # prepared but never swapped in: a new host must not outlive the run
            item = self.ready.get_nowait()
            if isinstance(item, Candidate):
                self.reject(item)

    # -- watching (watchdog's thread) -----------------------------------------------------------------------
    def saw(self, path: str) -> None:
        target = path if path in self.hashes else self.helpers.get(path)
        if target is None:
            return
        with self.lock:
            now = time.monotonic()
            self.touched.setdefault(target, now)
            self.quiet_since[target] = now
            self.lock.notify()

    def content_hash(self, path: str) -> str:
        """The plugin file and its local modules, together: saving any of them with a change reloads it."""
        digest = hashlib.sha256(Path(path).read_bytes())
        for helper in sorted(f for f, owner in self.helpers.items() if owner == path):
            if Path(helper).is_file():
                digest.update(Path(helper).read_bytes())
        return digest.hexdigest()[:12]

    def track_helpers(self, path: str) -> None:
        """Local modules the plugin imported from its own folder: saving one reloads the plugin."""
        folder = Path(path).parent
        for module in list(sys.modules.values()):
            file = getattr(module, "__file__", None)
            if file and Path(file).parent == folder and file != path and file not in self.paths:
                self.helpers[str(Path(file))] = path

    # -- preparing (the worker thread) ----------------------------------------------------------------------
    def work(self) -> None:
        while True:
            with self.lock:
                while not self.stopped and not self.due():
                    self.lock.wait(timeout=self.debounce_s / 2 if self.touched else None)
                if self.stopped:
                    return
                path = self.due()
                assert path is not None
                saved_at = self.touched.pop(path)
                self.quiet_since.pop(path)
            self.prepare(path, saved_at)

    def due(self) -> str | None:
        now = time.monotonic()
        return next((p for p, t in self.quiet_since.items() if now - t >= self.debounce_s), None)

    def prepare(self, path: str, saved_at: float) -> None:
        try:
            content, new_hash = self.content_hash(path), file_hash(path)
        except OSError as exc:  # deleted or mid-rename: wait for the next event
            self.ready.put(Failure(path, f"cannot read {path}: {exc}", saved_at))
            return
        if content == self.hashes[path]:
            return  # saved without a change
        self.hashes[path] = content
        host = self.host_of(path)
        try:
            candidate = self.prepare_host(path, host, new_hash, saved_at) if host is not None else \
                self.prepare_inline(path, new_hash, saved_at)
        except RejectedEdit as exc:
            self.ready.put(Failure(path, str(exc), saved_at))
            return
        self.ready.put(candidate)

    def prepare_inline(self, path: str, new_hash: str, saved_at: float) -> Candidate:
        running = [name for name, source in self.plugins.components.items() if source == path]
        if running:  # a stage or tuner holds the model and its data: it is built once, when the run starts
            raise RejectedEdit(f"{path} defines {', '.join(running)}, which this run uses; a stage's or tuner's code "
                               f"is read when the run starts: stop the run and continue it with --resume to use "
                               f"the edit")
        names = [name for name, origin in self.plugins.origins.items() if origin.source == path]
        previous = registrations_of(path)
        for helper in [f for f, owner in self.helpers.items() if owner == path]:
            for name, module in list(sys.modules.items()):
                if getattr(module, "__file__", None) == helper:
                    del sys.modules[name]  # imported afresh by the plugin
        try:
            module = import_source(path)
            self.track_helpers(path)
            built: dict[str, object] = {}
            for name in names:
                origin = self.plugins.origins[name]
                if origin.kind == "module":
                    problems = hookimpl_problems(module) if has_hookimpls(module) else \
                        ["no longer has @hookimpl functions"]
                    built[name] = module
                else:
                    spec = lookup(origin.kind, origin.name)
                    problems = spec_problems(spec, origin.config)
                    if not problems:
                        built[name] = spec.build(**origin.config)
                if problems:
                    raise RejectedEdit(f"{name}: " + "; ".join(problems))
        except RejectedEdit:
            reinstate(path, previous)
            raise
        except BaseException as exc:
            reinstate(path, previous)
            raise RejectedEdit(f"{describe(exc)}\n{''.join(traceback.format_exception(exc)[-4:])}") from None
        return Candidate(path, new_hash, built, previous, saved_at, time.monotonic())

    def host_of(self, path: str) -> Host | None:
        hosts = self.plugins.hosts
        if hosts is None:
            return None
        return next((h for h in hosts.hosts if path in {str(Path(s).resolve()) for s in h.spec.sources}), None)

    def prepare_host(self, path: str, old: Host, new_hash: str, saved_at: float) -> Candidate:
        """A fresh host with the new code, started and built beside the old one (training goes on)."""
        new = Host(old.spec, old.settings, old.context, old.events)
        try:
            hello = new.start(same_code=False)
            errors = [f"{s.source}: {s.error}" for s in hello.sources if s.error]
            if errors:
                raise RejectedEdit("; ".join(errors))
            # What the host imported: a save while it started (edits faster than a host starts) is newer than
            # what this edit hashed, and is reloaded again after this one.
            new_hash = next((s.code_hash for s in hello.sources if str(Path(s.source).resolve()) == path), new_hash)
            built: dict[str, object] = {}
            # The plugins of this host's line (its spec), whichever generation serves them now: an earlier edit
            # may be swapped in by the main thread while this one starts. The instances are the same in each.
            for name, proxy in list(self.plugins.by_name.items()):
                if not isinstance(proxy, RemotePlugin) or proxy.host.spec is not old.spec:
                    continue
                if proxy.instance in proxy.host.builds:
                    reply = new.build(proxy.host.builds[proxy.instance])
                    if reply.problems:
                        raise RejectedEdit(f"{name}: " + "; ".join(reply.problems))
                    hooks, stateful = reply.hooks, reply.stateful
                else:  # a module's own hooks
                    hooks, stateful = hello.sources[-proxy.instance - 1].module_hooks, False
                edited = str(Path(proxy.source).resolve()) == path
                built[name] = make_proxy(new, proxy.instance, proxy.label, hooks, stateful, proxy.policy,
                                         new_hash if edited else proxy.code_hash, proxy.events, proxy.source)
        except RejectedEdit:
            new.shutdown()
            raise
        except Exception as exc:
            new.shutdown()
            raise RejectedEdit(f"the new host did not start: {exc}") from None
        return Candidate(path, new_hash, built, [], saved_at, time.monotonic(), host=(old, new))

    # -- swapping (the main thread, at a step boundary) -----------------------------------------------------
    def remember(self, batch: Any, outputs: ModelOutputs, state: Any) -> None:
        kept = outputs.fields()  # detached, without computing logits that are not there
        self.last = (batch, {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kept.items()}, state)

    def apply(self, step: int, event: Any, say: Any) -> None:
        """Swap in every candidate that passes its probe; record every swap and rejection."""
        while True:
            try:
                item = self.ready.get_nowait()
            except queue.Empty:
                return
            started = time.monotonic()
            if isinstance(item, Candidate):
                try:
                    self.covers(item)
                    self.probe(item)
                except RejectedEdit as exc:
                    self.reject(item)
                    item = Failure(item.path, str(exc), item.saved_at)
            if isinstance(item, Failure):
                name = Path(item.path).name
                event("plugin_reload_failed", step=step, plugin=name, path=item.path, error=item.error)
                say(f"reload of {item.path} rejected at step {step}; the old code keeps running:\n{item.error}")
                continue
            for name, plugin in item.plugins.items():
                edited = not isinstance(plugin, RemotePlugin) or str(Path(plugin.source).resolve()) == item.path
                old_hash = self.plugins.code_hashes.get(name, "?")
                self.swap(name, plugin, item.new_hash if edited else old_hash)
                if not edited:
                    continue  # shares the host, not the file: restarted with it, same code
                event("plugin_reload", step=step, plugin=name, old_hash=old_hash, new_hash=item.new_hash,
                      ready_ms=round((item.ready_at - item.saved_at) * 1e3, 1),  # save -> ready to swap
                      swap_ms=round((time.monotonic() - started) * 1e3, 1))  # what the step boundary waited
                say(f"reloaded {name} from {item.path} at step {step} ({old_hash} -> {item.new_hash})")
            if item.host is not None:
                hosts = self.plugins.hosts
                current = self.host_of(item.path)  # not item.host[0] if an earlier edit was swapped in since
                assert hosts is not None and current is not None
                hosts.replace(current, item.host[1])

    def covers(self, candidate: Candidate) -> None:
        """A new host replaces the current one only if it serves every plugin the current one serves: after the
        swap, no registered plugin may call the host that is being shut down."""
        if candidate.host is None:
            return
        current = self.host_of(candidate.path)
        served = {name for name, plugin in self.plugins.by_name.items()
                  if isinstance(plugin, RemotePlugin) and plugin.host is current}
        missing = sorted(served - set(candidate.plugins))
        if missing:
            raise RejectedEdit(f"the new host does not serve {', '.join(missing)}, which its host serves now")

    def probe(self, candidate: Candidate) -> None:
        """A new loss must give a finite 0-dim loss on the last batch whose gradient reaches the model's outputs
        (the logits, or the hidden states they are computed from)."""
        if self.last is None:
            return
        batch, kept, state = self.last
        for name, plugin in candidate.plugins.items():
            if not hasattr(plugin, "swiftk_loss_compute"):
                continue
            manager = new_manager()
            manager.register(plugin, name=f"probe:{name}")
            leaf_name = "logits" if kept["logits"] is not None else "hidden"
            leaf = kept[leaf_name].clone().requires_grad_()
            outputs = ModelOutputs(**{**kept, leaf_name: leaf})
            try:
                result = manager.hook.swiftk_loss_compute(batch=batch, outputs=outputs,
                                                          step=state.step, state=state)
                try:
                    loss = checks.checked_loss(result).loss  # the contract every loss is held to
                except checks.ContractViolation as exc:
                    raise RejectedEdit(f"{name}: on the last batch, swiftk_loss_compute {exc}; {exc.fix}") from None
                loss.backward()
                if leaf.grad is None or not bool(torch.isfinite(leaf.grad).all()):
                    raise RejectedEdit(f"{name}: on the last batch, no finite gradient reaches the {leaf_name}")
            except RejectedEdit:
                raise
            except Exception as exc:
                raise RejectedEdit(f"{name}: the probe on the last batch raised {describe(exc)}\n"
                                   f"{''.join(traceback.format_exception(exc)[-4:])}") from None
            finally:
                manager.unregister(name=f"probe:{name}")

    def reject(self, candidate: Candidate) -> None:
        if candidate.host is not None:
            candidate.host[1].shutdown()
        else:
            reinstate(candidate.path, candidate.previous)

    def swap(self, name: str, plugin: object, new_hash: str) -> None:
        """Replace the plugin registered as ``name``, carrying its state over when the new one accepts it."""
        old = self.plugins.by_name[name]
        if hasattr(old, "state_dict") and hasattr(plugin, "load_state_dict") and old is not plugin:
            try:
                plugin.load_state_dict(old.state_dict())
            except Exception as exc:  # the new class changed its state: it starts fresh
                print(f"warning: {name}: its state did not carry over the reload ({describe(exc)})",
                      file=sys.stderr)
        self.plugins.manager.unregister(old)
        self.plugins.manager.register(plugin, name=name)
        self.plugins.by_name[name] = plugin
        self.plugins.code_hashes[name] = new_hash


class _Events(FileSystemEventHandler):
    """Close-after-write and rename-onto-target only: a 'modified' event may see a half-written file."""

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader

    def on_any_event(self, event: FileSystemEvent) -> None:
        # A file moved in from another folder arrives as "created"; if it is still being written, its
        # close-after-write follows within the debounce window (or a half file is rejected, then retried).
        if isinstance(event, (FileClosedEvent, FileCreatedEvent)):
            self.reloader.saw(str(Path(str(event.src_path)).resolve()))
        elif isinstance(event, FileMovedEvent):
            self.reloader.saw(str(Path(str(event.dest_path)).resolve()))
