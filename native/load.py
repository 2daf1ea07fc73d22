"""Load a native plugin (a built ``.so``, or a ``.cpp`` built first) after checking what it was built for.

Every native plugin embeds an info record (``SWIFTK_PLUGIN`` in ``<swiftk/plugin.h>``): its name and kind, the
contract version, and the torch version and C++ ABI of the headers it was compiled against. The record is read
from the file's bytes *before* the library is loaded, so a build for another torch is refused with both versions
named: loading it would fail in the dynamic linker with an undefined symbol at best, and at worst bind to
functions whose layout changed and crash later.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import torch

from swiftk.contracts import CONTRACT_VERSION
from swiftk.contracts.registry import contract_problem
from swiftk.native.build import build

MARKER = b"SWIFTK_NATIVE_INFO:"
INIT_SYMBOL = re.compile(rb"PyInit_(\w+)\x00")
KINDS = {  # what a native plugin of each kind must define (see native/README.md)
    "optimizer": ("defaults", "init_state", "step"),
    "loss": ("defaults", "forward", "backward"),
}


class NativeABIError(ImportError):
    """A native plugin was built for another torch, C++ ABI or contract, or is not a swiftk plugin at all."""


@dataclass(frozen=True)
class NativeInfo:
    name: str
    kind: str
    contract: str
    torch: str  # the torch headers it was compiled against, "MAJOR.MINOR.PATCH"
    cxx11_abi: int  # _GLIBCXX_USE_CXX11_ABI of that build
    compiler: str = "?"


@dataclass(frozen=True)
class NativePlugin:
    info: NativeInfo
    module: ModuleType
    library: Path  # the .so
    source: Path  # the .cpp it was built from, or the .so itself for a prebuilt plugin

    def defaults(self) -> dict[str, float]:
        return dict(self.module.defaults())


def read_info(library: Path) -> NativeInfo:
    """The info record embedded in ``library``, read from its bytes without loading it."""
    with open(library, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(MARKER)
        if start < 0:
            raise NativeABIError(
                f"{library} is not a swiftk native plugin: it has no info record. A plugin's .cpp must "
                f"`#include <swiftk/plugin.h>` and declare SWIFTK_PLUGIN(\"name\", \"kind\"); build it with "
                f"`swiftk native build FILE.cpp`")
        end = data.find(b"\x00", start)
        text = data[start + len(MARKER):end].decode("utf-8", "replace")
    try:
        return NativeInfo(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise NativeABIError(f"{library}: its info record is unreadable ({exc}): {text[:200]!r}") from None


def running_torch() -> tuple[str, int]:
    version = torch.__version__.split("+")[0]
    return version, int(torch._C._GLIBCXX_USE_CXX11_ABI)


def compatibility_problem(info: NativeInfo) -> str | None:
    """Why a plugin built as ``info`` says cannot be loaded into this process (None: it can)."""
    version, abi = running_torch()
    if info.torch.split(".")[:2] != version.split(".")[:2]:
        return (f"it was built against torch {info.torch} but this process runs torch {version}; "
                f"torch's C++ ABI changes between minor versions, so rebuild it here")
    if info.cxx11_abi != abi:
        return (f"it was built with _GLIBCXX_USE_CXX11_ABI={info.cxx11_abi} but this torch uses {abi} "
                f"(torch {version}); rebuild it with this torch's compiler settings")
    problem = contract_problem(info.contract, CONTRACT_VERSION)
    if problem:
        return problem
    if info.kind not in KINDS:
        return f"its kind '{info.kind}' is not one a native plugin can be ({', '.join(KINDS)})"
    return None


def load_library(library: Path, source: Path | None = None) -> NativePlugin:
    """Check ``library``'s info record against this torch, then import it and check what it defines."""
    library = library.resolve()
    if not library.is_file():
        raise FileNotFoundError(f"native plugin {library} does not exist")
    info = read_info(library)
    problem = compatibility_problem(info)
    if problem:
        raise NativeABIError(f"native plugin '{info.name}' ({library}) cannot be loaded: {problem}. "
                             f"Rebuild: swiftk native build {source or 'PLUGIN.cpp'}")
    module = import_extension(library)
    loaded = json.loads(module.swiftk_info())
    if loaded != json.loads(json.dumps(info.__dict__)):
        raise NativeABIError(f"native plugin {library}: the loaded module reports {loaded}, but the file's "
                             f"record says {info.__dict__}; the file was modified after it was built")
    missing = [fn for fn in KINDS[info.kind] if not hasattr(module, fn)]
    if missing:
        raise NativeABIError(f"native {info.kind} plugin '{info.name}' ({source or library}) does not define "
                             f"{', '.join(missing)}; a native {info.kind} must define {', '.join(KINDS[info.kind])} "
                             f"in its PYBIND11_MODULE (see native/README.md)")
    return NativePlugin(info, module, library, (source or library).resolve())


def import_extension(library: Path) -> ModuleType:
    """Import a built extension under the name its ``PyInit_`` symbol gives (a renamed file still works)."""
    with open(library, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = INIT_SYMBOL.search(data)
        name = found.group(1).decode() if found else None
    if name is None:
        raise NativeABIError(f"{library} is not a Python extension module (it exports no PyInit_ function)")
    if name in sys.modules:
        module = sys.modules[name]
        if Path(getattr(module, "__file__", "")).resolve() != library:
            raise NativeABIError(f"{library} defines module '{name}', which is already loaded from "
                                 f"{module.__file__}; two builds cannot share one module name")
        return module
    spec = importlib.util.spec_from_file_location(name, library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        version, _ = running_torch()
        raise NativeABIError(f"native plugin {library} failed to load into torch {version}: {exc}") from None
    sys.modules[name] = module
    return module


def load(source: str | Path, *, progress: TextIO | None = sys.stderr, cache_dir: Path | None = None) -> NativePlugin:
    """A native plugin from a ``.cpp`` (built, or taken from the build cache) or a prebuilt ``.so``."""
    path = Path(source)
    if path.suffix == ".so":
        return load_library(path)
    return load_library(build(path, progress=progress, cache_dir=cache_dir), source=path)


def hyper(defaults: dict[str, float], config: dict[str, Any], where: str) -> dict[str, float]:
    """The defaults overridden by ``config``; every value is sent to C++ as a float (bools as 0/1)."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise TypeError(f"{where}: unknown argument(s) {', '.join(unknown)}; it takes {', '.join(sorted(defaults))}")
    return {key: float(config.get(key, value)) for key, value in defaults.items()}
