"""The plugin manager: load plugin sources, pick the configured plugins by name, check them, register them.

Everything here runs before any model is loaded, so that a misnamed loss or a bad ``loss_config`` is
reported together with the config's other problems.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from swiftk.contracts import PROJECT_NAME, PluginError, PluginRegistryError, hookspecs, lookup
from swiftk.contracts.conformance import config_problems, describe, hookimpl_problems
from swiftk.contracts.registry import (
    contract_problem,
    file_hash,
    forget,
    has_hookimpls,
    import_source,
    imported_files,
    source_hash,
)
from swiftk.contracts.stages import Stage
from swiftk.hosts import tenants
from swiftk.hosts.group import HostGroup, HostSpec, Policy, SharedSlot
from swiftk.kernel import dist as distributed
from swiftk.kernel.config import Fallback, PluginSource, RunConfig, TenantConfig, TrainConfig, stage_class
from swiftk.native import NativeABIError, NativeBuildError, is_native, register_native
from swiftk.plugins.datasets import forget_source as forget_dataset_source


@dataclass
class Selected:
    """A plugin chosen by the config: its kind, name, the config table it is built with, and where set."""

    kind: str
    name: str
    config: dict[str, Any]
    key: str  # the config key that chose it, for error messages
    config_key: str  # the config key its arguments come from


@dataclass
class Origin:
    """How a registered plugin was made, so that a hot reload can make it again from new code."""

    kind: str  # loss, metric... or "module" (a plugin file's own @hookimpl functions)
    name: str
    config: dict[str, Any]
    source: str  # the file that defines it (absolute), or the module name


@dataclass
class Plugins:
    """The run's plugin manager and what was registered in it, by name."""

    manager: pluggy.PluginManager
    by_name: dict[str, object] = field(default_factory=dict)
    code_hashes: dict[str, str] = field(default_factory=dict)
    origins: dict[str, Origin] = field(default_factory=dict)  # in-process plugins, by registered name
    hosts: HostGroup | None = None  # the processes serving plugins with isolation = "process"
    components: dict[str, str] = field(default_factory=dict)  # "stage:dpo" -> the file that defines it

    def track(self, kind: str, name: str) -> None:
        """Record the code of the run's stage or tuner like a plugin's (ranks compare it, checkpoints keep it);
        hot reload leaves its file alone (a component is built once, when the run starts)."""
        target = lookup(kind, name).target
        self.code_hashes[f"{kind}:{name}"] = source_hash(target)
        self.components[f"{kind}:{name}"] = lookup(kind, name).source

    def register(self, name: str, plugin: object, code: Any, code_hash: str | None = None) -> None:
        """Register ``plugin`` under ``name``, recording the hash of the file ``code`` is defined in."""
        self.manager.register(plugin, name=name)
        self.by_name[name] = plugin
        self.code_hashes[name] = code_hash or source_hash(code)

    def close(self) -> None:
        """Shut the plugin hosts down (no process or shared segment is left)."""
        if self.hosts is not None:
            self.hosts.close()
            self.hosts = None

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call a hook (keywords only); an exception from a plugin becomes a ``PluginError`` naming it."""
        caller = getattr(self.manager.hook, hook)
        try:
            return caller(**kwargs)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(culprit(caller, exc), hook, f"raised {describe(exc)}") from exc


def culprit(caller: Any, exc: BaseException) -> str:
    """The registered name of the implementation whose frame is in ``exc``'s traceback."""
    codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()}
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            return codes[tb.tb_frame.f_code]
        tb = tb.tb_next
    return "?"


def new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


ENTRY_POINT_GROUP = "swiftk.plugins"


def load_entry_points() -> tuple[list[Loaded], list[str]]:
    """Import every installed package's ``swiftk.plugins`` entry point (a module or an object in one).

    A pip-installed plugin package is found this way with no config line; importing it runs its
    ``register_*`` decorators, and a module with ``@hookimpl`` functions is registered as a plugin.
    """
    from importlib.metadata import entry_points

    loaded, problems = [], []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
        except Exception as exc:
            problems.append(f"entry point '{ep.name}' ({ep.value}, package {dist_name(ep)}) failed to load: "
                            f"{describe(exc)}")
            continue
        module = target if isinstance(target, ModuleType) else sys.modules[ep.module]
        loaded.append(Loaded(module.__name__, module, dist_name(ep)))
    return loaded, problems


def dist_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "?"


@dataclass
class Loaded:
    """A plugin source from the config (or an entry point), imported."""

    name: str
    module: ModuleType
    origin: str = "config"  # or the distribution that installed it ("NAME VERSION")


def load_configured(items: list[str | PluginSource], native: bool = True, python: bool = True
                    ) -> tuple[list[Loaded], list[str]]:
    """Import the config's ``plugins`` and every ``swiftk.plugins`` entry point; one problem per failure.
    ``native=False`` leaves C++ sources alone (assembling the config's schema needs no compiler); ``python=False``
    builds only those (the Python files were imported when the config was read).

    What plugin files registered in an earlier run of this process (a test suite, a notebook) is forgotten
    first: a run sees the built-ins, the entry points and its own config's files, nothing else.
    """
    if python:
        for source in imported_files:
            forget(source)
            forget_dataset_source(source)
        imported_files.clear()
    loaded, problems = [], []
    for item in items:
        if isinstance(item, PluginSource) and item.isolation != "inline":
            continue  # imported by its host, never in the kernel
        source = item if isinstance(item, str) else item.source
        if not is_native(source) and not python:
            continue
        if is_native(source):  # registered under its own name; it has no @hookimpl functions to register
            if not native:
                continue
            try:
                load_native(source)
            except (NativeBuildError, NativeABIError, FileNotFoundError) as exc:
                problems.append(f"plugins: {source!r}: {exc}")
            continue
        try:
            module = import_source(source)
        except Exception as exc:
            problems.append(f"plugins: {source!r} failed to load: {describe(exc)}")
            continue
        name = item.name if isinstance(item, PluginSource) and item.name else Path(source).stem
        loaded.append(Loaded(name, module))
    if not python:
        return loaded, problems
    installed, ep_problems = load_entry_points()
    return loaded + installed, problems + ep_problems


def load_native(source: str) -> None:
    """Build (or take from the cache) and register a native plugin; forgotten by the next run like a file."""
    plugin = register_native(source)
    imported_files.add(str(plugin.source))


def start_hosts(cfg: RunConfig) -> tuple[HostGroup | None, list[str]]:
    """Start a host per ``isolation = "process"`` source (or per ``group``), and a sandboxed host per tenant's
    plugin source (or per tenant and ``group``), and learn what each provides."""
    remote = [item for item in cfg.plugins if isinstance(item, PluginSource) and item.isolation == "process"]
    sandboxed = sandboxed_sources(cfg)
    if not remote and not sandboxed:
        return None, []
    groups: dict[str, list[PluginSource]] = {}
    for item in remote:
        groups.setdefault(item.group or f"{item.label}", []).append(item)
    labels = [item.label for item in remote + [item for _, item in sandboxed]]
    problems = [f"plugins: two plugins in hosts are both named '{label}' (by default, the file's stem); give "
                f"them distinct `name`s" for label in sorted(set(labels)) if labels.count(label) > 1]
    specs = []
    for label, items in groups.items():
        limits = {item.memory_mb for item in items}
        if len(limits) > 1:
            problems.append(f"plugins: group '{label}' sets different memory_mb values {sorted(map(str, limits))}; "
                            f"its plugins share one host, so give them one limit")
        if len({item.shared for item in items}) > 1:
            problems.append(f"plugins: group '{label}' mixes shared = 'rank' and 'node'; its plugins share one host")
        shared = node_slot(label) if items[0].shared == "node" else None
        specs.append(HostSpec(f"process:{label}", [i.source for i in items], [i.label for i in items],
                              max((i.memory_mb or 0) for i in items) or None, shared=shared))
    if sandboxed:
        sandbox_specs, sandbox_problems = tenant_specs(cfg, sandboxed)
        specs += sandbox_specs
        problems += sandbox_problems
    if problems:
        return None, problems
    policies = {item.label: policy(item) for item in remote + [item for _, item in sandboxed]}
    group = HostGroup(specs, policies, cfg.hosts)
    return group, group.start()


def node_slot(label: str) -> SharedSlot | None:
    """Where this rank stands in the host its node's ranks share; None in a single process per node (a shared
    host would have one session: an ordinary host)."""
    info = distributed.from_env()
    if not distributed.active() or info.local_world_size < 2:
        return None
    node = info.rank // info.local_world_size
    base = f"swiftk-shared-{os.environ.get('MASTER_PORT', '0')}-{node}-{label}"
    return SharedSlot(base, info.local_rank, info.local_world_size, distributed.store_publish,
                      distributed.store_fetch)


def sandboxed_sources(cfg: RunConfig) -> list[tuple[str, PluginSource]]:
    """(tenant, source) for every plugin that runs sandboxed: those listed in [tenants.NAME] plugins (with the
    tenant's deadline and failure policy) and [[plugins]] tables with isolation = "sandbox"."""
    found = []
    for name, tenant in cfg.tenants.items():
        for source in tenant.plugins:
            where = {"path": source} if source.endswith(".py") or Path(source).exists() else {"module": source}
            found.append((name, PluginSource(**where, isolation="sandbox", tenant=name,
                                             deadline_s=tenant.deadline_s, on_failure=tenant.on_failure,
                                             max_failures=tenant.max_failures,
                                             failure_window_s=tenant.failure_window_s)))
    found += [(item.tenant or item.label, item) for item in cfg.plugins
              if isinstance(item, PluginSource) and item.isolation == "sandbox"]
    return found


def tenant_specs(cfg: RunConfig, sandboxed: list[tuple[str, PluginSource]]) -> tuple[list[HostSpec], list[str]]:
    """A sandboxed host per tenant's source (or per tenant and ``group``), once this machine is known to give
    hosts the layers [sandbox] requires; the tenants' uids, scratch folders and readable data resolved."""
    layers, missing, optional = tenants.plan(cfg.sandbox.require)
    if missing:
        return [], [tenants.unavailable_message(missing, cfg.sandbox.require)]
    for layer in optional:  # not required, not available: said once, and the hosts' audit records show it
        print(f"sandbox: tenant hosts run without {layer}", file=sys.stderr)
    problems: list[str] = []
    resolved: dict[str, tenants.Tenant] = {}
    taken = {t.uid for t in cfg.tenants.values() if t.uid is not None}
    for name in sorted({tenant for tenant, _ in sandboxed}):
        settings = cfg.tenants.get(name, TenantConfig())
        where = f"[tenants.{name}]" if name in cfg.tenants else f"[[plugins]] '{name}' (its own tenant)"
        uid = settings.uid
        if uid is not None and tenants.account(uid):
            problems.append(f"{where} uid = {uid} belongs to the account '{tenants.account(uid)}' of this "
                            f"machine; a tenant needs a uid nobody else has")
        if uid is None:
            try:
                uid = tenants.tenant_uid(name, cfg.sandbox.uid_base, taken)
            except tenants.SandboxUnavailable as exc:
                problems.append(f"{where}: {exc}; set its uid, or another [sandbox] uid_base")
                continue
            taken.add(uid)
        data = []
        for path in settings.data:
            if not Path(path).exists():
                problems.append(f"{where} data: {path!r} does not exist")
            data.append(str(Path(path).resolve()))
        scratch = Path(settings.scratch or Path(tempfile.gettempdir()) / "swiftk-tenants" / name).resolve()
        resolved[name] = tenants.Tenant(
            name, uid, str(scratch), data, settings.memory_mb, settings.cpu_seconds_per_call, settings.cpu_cores,
            settings.pids_max, settings.open_files, settings.file_size_mb, settings.cpu_seconds_total)
    groups: dict[tuple[str, str], list[PluginSource]] = {}
    for name, item in sandboxed:
        if item.module is None and not Path(item.source).is_file():
            problems.append(f"plugins: tenant '{name}': plugin file {item.source!r} does not exist")
        groups.setdefault((name, item.group or item.label), []).append(item)
    if problems:
        return [], problems
    specs = []
    for (name, label), items in groups.items():
        tenant = resolved[name]
        sources = [str(Path(i.source).resolve()) if i.path else i.source for i in items]  # the host's cwd differs
        specs.append(HostSpec(f"sandbox:{name}/{label}", sources, [i.label for i in items], tenant.memory_mb,
                              tenant, tuple(layers)))
    return specs, problems


def policy(item: PluginSource) -> Policy:
    fallback = item.on_failure.fallback if isinstance(item.on_failure, Fallback) else None
    on_failure = "fallback" if isinstance(item.on_failure, Fallback) else item.on_failure
    return Policy(on_failure, fallback, item.deadline_s, item.max_failures, item.failure_window_s)


def selection(cfg: RunConfig) -> list[Selected]:
    train, evaluation = cfg.train, cfg.eval
    stage = build_stage(train)
    loss = stage.loss()
    chosen = [
        Selected("loss", loss.name, loss.arguments, loss.key, loss.config_key),
        Selected("optimizer", train.optimizer, optimizer_arguments(train), "[train] optimizer",
                 "[train] optimizer_config"),
        Selected("scheduler", train.scheduler, train.scheduler_config, "[train] scheduler",
                 "[train] scheduler_config"),
    ]
    chosen += [Selected("reward", reward.name, reward.arguments, reward.key, reward.config_key)
               for reward in stage.rewards()]
    if cfg.data.eval_file:  # the stage says which metric plugins its evaluation reports through
        chosen += [Selected("metric", name, evaluation.metric_config.get(name, {}), "[eval] metrics",
                            f"[eval] metric_config.{name}") for name in stage.metrics(evaluation)]
    chosen += [Selected("callback", name, train.callbacks_config.get(name, {}), "[train] callbacks",
                        f"[train] callbacks_config.{name}") for name in train.callbacks]
    return chosen


def build_stage(train: TrainConfig) -> Stage:
    """The stage ``[train] stage`` names, built with the assembled ``[train]`` table."""
    stage: Stage = stage_class(train)(train)
    return stage


def optimizer_arguments(train: TrainConfig) -> dict[str, Any]:
    """``optimizer_config`` without ``weight_decay``: the kernel applies that itself, to the decayed group."""
    return {k: v for k, v in train.optimizer_config.items() if k != "weight_decay"}


def weight_decay(train: TrainConfig) -> float:
    """``[train] weight_decay``, or ``optimizer_config.weight_decay`` (the ms-swift spelling) when given."""
    return float(train.optimizer_config.get("weight_decay", train.weight_decay))


def check_selection(selected: list[Selected], hosts: HostGroup | None = None) -> list[str]:
    """Names exist, config tables bind to the plugin's signature with the right types, contracts match.
    A plugin provided by a host is checked and built there."""
    problems = []
    for item in selected:
        if hosts is not None and hosts.provides(item.kind, item.name):
            problems += [f"{item.config_key}: {item.kind} '{item.name}': {p}"
                         for p in hosts.build(item.kind, item.name, item.config)]
            continue
        try:
            spec = lookup(item.kind, item.name)
        except PluginRegistryError as exc:
            problems.append(f"{item.key} = '{item.name}': {exc}")
            continue
        where = f"{item.kind} '{item.name}' ({spec.source})"
        problems += [f"{item.config_key}: {where}: {p}" for p in config_problems(spec, item.config)]
        problem = contract_problem(spec.contract)
        if problem:
            problems.append(f"{item.key}: {where} {problem}")
        if spec.is_hook_class:
            problems += [f"{item.key}: {where}: {p}" for p in hookimpl_problems(spec.target)]
    return problems


def build(selected: list[Selected], loaded: list[Loaded], hosts: HostGroup | None = None) -> Plugins:
    """Instantiate the selected plugins and register them, plus every plugin module with ``@hookimpl``s.
    Plugins in hosts were built by ``check_selection``; their proxies are registered here."""
    plugins = Plugins(new_manager(), hosts=hosts)
    if hosts is not None:
        for (kind, name), proxy in hosts.proxies.items():
            plugins.register(f"{kind}:{name}", proxy, None, proxy.code_hash)
        for name, proxy in hosts.module_proxies:
            plugins.register(f"module:{name}", proxy, None, proxy.code_hash)
    for item in selected:
        if hosts is not None and hosts.provides(item.kind, item.name):
            continue
        spec = lookup(item.kind, item.name)
        native_hash = file_hash(spec.source) if is_native(spec.source) else None  # the .cpp, not its glue
        plugins.register(f"{item.kind}:{item.name}", spec.build(**item.config), spec.target, native_hash)
        plugins.origins[f"{item.kind}:{item.name}"] = Origin(item.kind, item.name, item.config, spec.source)
    for entry in loaded:
        if has_hookimpls(entry.module):
            plugins.register(f"module:{entry.name}", entry.module, entry.module)
            source = getattr(entry.module, "__file__", None) or entry.module.__name__
            plugins.origins[f"module:{entry.name}"] = Origin("module", entry.name, {}, source)
    return plugins
