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
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from swiftk.contracts import PROJECT_NAME, PluginRegistryError, hookspecs, lookup
from swiftk.contracts.registry import has_hookimpls
from swiftk.kernel.config import TrainConfig


@dataclass
class Selected:
    """A plugin chosen by the config: its kind, name, the config table it is built with, and where set."""

    kind: str
    name: str
    config: dict[str, Any]
    key: str  # the config key that chose it, for error messages


@dataclass
class Plugins:
    """The run's plugin manager and what was registered in it, by name."""

    manager: pluggy.PluginManager
    by_name: dict[str, object] = field(default_factory=dict)
    code_hashes: dict[str, str] = field(default_factory=dict)


def new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def import_source(source: str) -> ModuleType:
    """Import a plugin file (under a unique module name) or an importable module."""
    path = Path(source)
    if source.endswith(".py") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"plugin file {source} does not exist")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        name = f"swiftk_user_plugin_{path.stem}_{digest}"
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


def load_sources(sources: list[str]) -> tuple[list[ModuleType], list[str]]:
    """Import every source; returns the modules and one problem line per source that failed."""
    modules, problems = [], []
    for source in sources:
        try:
            modules.append(import_source(source))
        except Exception as exc:
            problems.append(f"plugins: {source!r} failed to load: {describe_exception(exc)}")
    return modules, problems


def describe_exception(exc: BaseException) -> str:
    """``SyntaxError at file.py:3: ...`` or the innermost frame of a traceback, on one line."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError at {exc.filename}:{exc.lineno}: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}: {exc}"


def selection(train: TrainConfig) -> list[Selected]:
    return [
        Selected("loss", train.loss_type, train.loss_config, "[train] loss_type"),
        Selected("optimizer", train.optimizer, train.optimizer_config, "[train] optimizer"),
        Selected("scheduler", train.scheduler, train.scheduler_config, "[train] scheduler"),
    ]


def check_selection(selected: list[Selected]) -> list[str]:
    """Names exist and their config tables bind to the plugin's signature."""
    problems = []
    for item in selected:
        try:
            spec = lookup(item.kind, item.name)
        except PluginRegistryError as exc:
            problems.append(f"{item.key} = '{item.name}': {exc}")
            continue
        signature = spec.config_signature()
        try:
            signature.bind(**item.config)
        except TypeError as exc:
            accepted = ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
                                 for p in signature.parameters.values()) or "no arguments"
            problems.append(
                f"{item.key.replace('_type', '')}_config for {item.kind} '{item.name}' ({spec.source}): {exc}; "
                f"it accepts: {accepted}"
            )
    return problems


def build(selected: list[Selected], modules: list[ModuleType]) -> Plugins:
    """Instantiate the selected plugins and register them, plus every plugin module with ``@hookimpl``s."""
    plugins = Plugins(new_manager())
    for item in selected:
        spec = lookup(item.kind, item.name)
        name = f"{item.kind}:{item.name}"
        plugin = spec.build(**item.config)
        plugins.manager.register(plugin, name=name)
        plugins.by_name[name] = plugin
        plugins.code_hashes[name] = source_hash(spec.target)
    for module in modules:
        if has_hookimpls(module):
            name = f"module:{module.__name__}"
            plugins.manager.register(module, name=name)
            plugins.by_name[name] = module
            plugins.code_hashes[name] = source_hash(module)
    return plugins


def source_hash(obj: Any) -> str:
    """Short hash of the file that defines ``obj`` (recorded in checkpoints and metrics)."""
    try:
        path = inspect.getsourcefile(obj)
        data = Path(path).read_bytes() if path else repr(obj).encode()
    except (TypeError, OSError):
        data = repr(obj).encode()
    return hashlib.sha256(data).hexdigest()[:12]
