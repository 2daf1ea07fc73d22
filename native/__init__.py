"""Native (C++) plugins: build a ``.cpp`` against this torch, check a ``.so``'s ABI, load and register it.

A native plugin is one C++ file that includes ``<swiftk/plugin.h>``, declares ``SWIFTK_PLUGIN(name, kind)``
and defines its kind's functions (native/README.md). ``plugins = ["native:path/plugin.cpp"]`` in a config
builds it (cached) and registers it under its name like a Python plugin; a prebuilt ``.so`` is accepted too.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, TextIO

from swiftk.contracts.registry import register
from swiftk.native.build import NativeBuildError, build
from swiftk.native.load import NativeABIError, NativeInfo, NativePlugin, load, read_info
from swiftk.native.loss import NativeTokenLoss, native_loss
from swiftk.native.optimizer import NativeOptimizer

SOURCES = Path(__file__).resolve().parent  # the built-in plugins' .cpp files
PREFIX = "native:"

__all__ = ["NativeABIError", "NativeBuildError", "NativeInfo", "NativeOptimizer", "NativePlugin", "NativeTokenLoss",
           "builtin", "build", "is_native", "load", "native_loss", "read_info", "register_native"]


_builtins: dict[str, NativePlugin] = {}


def builtin(stem: str, progress: TextIO | None = sys.stderr) -> NativePlugin:
    """One of the plugins shipped in native/ (``adamw``, ``projected_adamw``, ``fused_ce``), built on first use."""
    if stem not in _builtins:
        _builtins[stem] = load(SOURCES / f"{stem}.cpp", progress=progress)
    return _builtins[stem]


def is_native(source: str) -> bool:
    """A ``plugins`` entry that names a native plugin: ``native:FILE``, or a ``.cpp``/``.so`` path."""
    return source.startswith(PREFIX) or source.endswith((".cpp", ".cc", ".cxx", ".so"))


def register_native(source: str, progress: TextIO | None = sys.stderr) -> NativePlugin:
    """Build or load the native plugin ``source`` names and register it under its own name and kind."""
    path = Path(source.removeprefix(PREFIX))
    plugin = load(path, progress=progress)
    name, where = plugin.info.name, str(plugin.source)
    settings = plugin.defaults()
    if plugin.info.kind == "optimizer":
        def create(param_groups: list[dict[str, Any]], lr: float, **config: Any) -> NativeOptimizer:
            return NativeOptimizer(param_groups, plugin, lr=lr, **config)

        fixed = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("param_groups", "lr")]
        create.__signature__ = signature(settings, fixed, skip=("lr", "weight_decay"))  # type: ignore[attr-defined]
        create.swiftk_contract = plugin.info.contract  # type: ignore[attr-defined]
        register("optimizer", name, source=where)(create)
    else:
        loss = type(f"NativeLoss_{name}", (NativeTokenLoss,), {
            "load_plugin": classmethod(lambda cls: plugin),
            "__signature__": signature(settings, []),
            "__doc__": f"native loss '{name}' from {where}",
            "swiftk_contract": plugin.info.contract,
        })
        register("loss", name, source=where)(loss)
    return plugin


def signature(settings: dict[str, float], fixed: list[inspect.Parameter],
              skip: tuple[str, ...] = ()) -> inspect.Signature:
    """The config arguments a native plugin takes: its hyperparameters, with their defaults and types."""
    keywords = [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=value, annotation=float)
                for key, value in settings.items() if key not in skip]
    return inspect.Signature(fixed + keywords)
