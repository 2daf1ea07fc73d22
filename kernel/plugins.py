"""The plugin manager: load plugin sources, pick the configured plugins by name, check them, register them.

Everything here runs before any model is loaded, so that a misnamed loss or a bad ``loss_config`` is
reported together with the config's other problems.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import typing
from dataclasses import dataclass, field
from inspect import Parameter
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
from pydantic import TypeAdapter, ValidationError

from swiftk.contracts import PROJECT_NAME, PluginError, PluginRegistryError, PluginSpec, hookspecs, lookup
from swiftk.contracts.conformance import describe, validated_hookimpls
from swiftk.contracts.registry import contract_problem, forget, has_hookimpls
from swiftk.kernel.config import PluginSource, RunConfig, TrainConfig


@dataclass
class Selected:
    """A plugin chosen by the config: its kind, name, the config table it is built with, and where set."""

    kind: str
    name: str
    config: dict[str, Any]
    key: str  # the config key that chose it, for error messages
    config_key: str  # the config key its arguments come from


@dataclass
class Plugins:
    """The run's plugin manager and what was registered in it, by name."""

    manager: pluggy.PluginManager
    by_name: dict[str, object] = field(default_factory=dict)
    code_hashes: dict[str, str] = field(default_factory=dict)

    def register(self, name: str, plugin: object, code: Any) -> None:
        """Register ``plugin`` under ``name``, recording the hash of the file ``code`` is defined in."""
        self.manager.register(plugin, name=name)
        self.by_name[name] = plugin
        self.code_hashes[name] = source_hash(code)

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


def import_source(source: str) -> ModuleType:
    """Import a plugin file (under a unique module name) or an importable module."""
    path = Path(source)
    if source.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"plugin file {source} does not exist")
        path = path.resolve()  # registrations then name the absolute file
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        name = f"swiftk_user_plugin_{path.stem}_{digest}"
        _FILE_SOURCES.add(str(path))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return importlib.import_module(source)


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


_FILE_SOURCES: set[str] = set()  # plugin files imported by earlier runs in this process


def load_configured(items: list[str | PluginSource]) -> tuple[list[Loaded], list[str]]:
    """Import the config's ``plugins`` and every ``swiftk.plugins`` entry point; one problem per failure.

    What plugin files registered in an earlier run of this process (a test suite, a notebook) is forgotten
    first: a run sees the built-ins, the entry points and its own config's files, nothing else.
    """
    for source in _FILE_SOURCES:
        forget(source)
    _FILE_SOURCES.clear()
    loaded, problems = [], []
    for item in items:
        source = item if isinstance(item, str) else item.source
        try:
            module = import_source(source)
        except Exception as exc:
            problems.append(f"plugins: {source!r} failed to load: {describe(exc)}")
            continue
        name = item.name if isinstance(item, PluginSource) and item.name else Path(source).stem
        loaded.append(Loaded(name, module))
    installed, ep_problems = load_entry_points()
    return loaded + installed, problems + ep_problems


def selection(cfg: RunConfig) -> list[Selected]:
    train, evaluation = cfg.train, cfg.eval
    chosen = [
        Selected("loss", train.loss_type, train.loss_config, "[train] loss_type", "[train] loss_config"),
        Selected("optimizer", train.optimizer, optimizer_arguments(train), "[train] optimizer",
                 "[train] optimizer_config"),
        Selected("scheduler", train.scheduler, train.scheduler_config, "[train] scheduler",
                 "[train] scheduler_config"),
    ]
    if cfg.data.eval_file:
        chosen += [Selected("metric", name, evaluation.metric_config.get(name, {}), "[eval] metrics",
                            f"[eval] metric_config.{name}") for name in evaluation.metric_names()]
    chosen += [Selected("callback", name, train.callbacks_config.get(name, {}), "[train] callbacks",
                        f"[train] callbacks_config.{name}") for name in train.callbacks]
    return chosen


def optimizer_arguments(train: TrainConfig) -> dict[str, Any]:
    """``optimizer_config`` without ``weight_decay``: the kernel applies that itself, to the decayed group."""
    return {k: v for k, v in train.optimizer_config.items() if k != "weight_decay"}


def weight_decay(train: TrainConfig) -> float:
    """``[train] weight_decay``, or ``optimizer_config.weight_decay`` (the ms-swift spelling) when given."""
    return float(train.optimizer_config.get("weight_decay", train.weight_decay))


def check_selection(selected: list[Selected]) -> list[str]:
    """Names exist, config tables bind to the plugin's signature with the right types, contracts match."""
    problems = []
    for item in selected:
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


def config_problems(spec: PluginSpec, config: dict[str, Any]) -> list[str]:
    """Unknown, missing or mistyped arguments of ``config`` for the plugin's constructor or factory."""
    signature = spec.config_signature()
    try:
        bound = signature.bind(**config)
    except TypeError as exc:
        accepted = ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
                             for p in signature.parameters.values()) or "no arguments"
        return [f"{exc}; it accepts: {accepted}"]
    try:
        target = spec.target.__init__ if isinstance(spec.target, type) else spec.target
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: names and arity were still checked
        return []
    problems = []
    for name, value in bound.arguments.items():
        if name in hints and signature.parameters[name].kind not in (Parameter.VAR_KEYWORD, Parameter.VAR_POSITIONAL):
            try:
                TypeAdapter(hints[name]).validate_python(value)
            except ValidationError as exc:
                expected = getattr(hints[name], "__name__", str(hints[name]))
                problems.append(f"{name} = {value!r} is not a valid {expected} "
                                f"({exc.errors()[0]['msg']})")
    return problems


def hookimpl_problems(target: object) -> list[str]:
    """``swiftk_*`` attributes that are not hooks, miss the @hookimpl marker, or take arguments the hook
    does not pass (the plugin author's conformance checks, run on the class or module itself)."""
    label = getattr(target, "__name__", type(target).__name__)
    # A class is checked through a bare instance (no __init__ run), so its methods are bound and `self` is
    # not mistaken for a hook argument.
    subject = target.__new__(target) if isinstance(target, type) else target
    _, findings = validated_hookimpls(label, subject)
    return [f"{f.hook} {f.message}; fix: {f.fix}" for f in findings]


def build(selected: list[Selected], loaded: list[Loaded]) -> Plugins:
    """Instantiate the selected plugins and register them, plus every plugin module with ``@hookimpl``s."""
    plugins = Plugins(new_manager())
    for item in selected:
        spec = lookup(item.kind, item.name)
        plugins.register(f"{item.kind}:{item.name}", spec.build(**item.config), spec.target)
    for entry in loaded:
        if has_hookimpls(entry.module):
            plugins.register(f"module:{entry.name}", entry.module, entry.module)
    return plugins


def source_hash(obj: Any) -> str:
    """Short hash of the file that defines ``obj`` (recorded in checkpoints and metrics)."""
    try:
        path = inspect.getsourcefile(obj)
        data = Path(path).read_bytes() if path else repr(obj).encode()
    except (TypeError, OSError):
        data = repr(obj).encode()
    return hashlib.sha256(data).hexdigest()[:12]
