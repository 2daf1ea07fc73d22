"""Name -> plugin registry behind ``register_loss("focal_loss")`` and friends.

The decorators are thin sugar over hookimpls: each registration records what was decorated, and
``PluginSpec.build(**config)`` turns it into an object with ``@hookimpl`` methods that the kernel registers
in its plugin manager. Three shapes are accepted:

* a class with ``@hookimpl`` methods: instantiated with the config, registered as is;
* a loss module/function ``f(logits[N, V], labels[N])`` over the supervised tokens, returning per-token
  losses ``[N]`` or their mean: wrapped so that the step's loss is normalised by the accumulated token count;
* an optimizer factory ``create(params, lr, **config)`` or a scheduler factory
  ``create(optimizer, total_steps, warmup_steps, **config)``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

from swiftk.contracts.markers import CONTRACT_VERSION, PROJECT_NAME, hookimpl
from swiftk.contracts.types import Batch, LossResult, ModelOutputs, supervised

KINDS = ("loss", "optimizer", "scheduler", "metric", "callback", "reward", "stage", "tuner", "generator", "eval_task")
T = TypeVar("T", bound=Callable[..., Any])


class PluginRegistryError(Exception):
    """A registration conflicts with another, or a name was looked up that nobody registered."""


@dataclass(frozen=True)
class PluginSpec:
    """One registered plugin: what was decorated, under which kind and name, and where it came from."""

    kind: str
    name: str
    target: Callable[..., Any]
    source: str  # the file that registered it (or the module, when it has no file)

    @property
    def contract(self) -> str | None:
        """The contract version the plugin declares it was written for (``swiftk_contract = "0.1"`` on the
        class or function, or ``SWIFTK_CONTRACT`` in its module), if any."""
        return declared_contract(self.target)

    @property
    def is_hook_class(self) -> bool:
        return isinstance(self.target, type) and has_hookimpls(self.target)

    def config_signature(self) -> inspect.Signature:
        """The arguments a config table may set: the constructor's, or the factory's after its fixed ones."""
        signature = inspect.signature(self.target)
        factory = self.kind == "generator" or not isinstance(self.target, type)  # a generator class is one too
        fixed = _FIXED_ARGUMENTS.get(self.kind, 0) if factory else 0
        params = list(signature.parameters.values())[fixed:]
        return signature.replace(parameters=params)

    def build(self, **config: Any) -> object:
        """Instantiate the plugin with its config; the result carries ``@hookimpl`` methods."""
        if self.is_hook_class:
            return self.target(**config)
        adapter = _ADAPTERS.get(self.kind)
        if adapter is None:
            raise PluginRegistryError(
                f"{self.kind} '{self.name}' ({self.source}) has no @hookimpl methods; a {self.kind} plugin "
                f"must be a class whose methods are marked with swiftk.contracts.hookimpl."
            )
        return adapter(self, config)


_REGISTRY: dict[tuple[str, str], PluginSpec] = {}
# Leading positional arguments a factory of each kind receives from the kernel, not from the config.
_FIXED_ARGUMENTS = {"loss": 2, "optimizer": 2, "scheduler": 3, "generator": 2}  # a generator class's (model, tokenizer)


def declared_contract(obj: object) -> str | None:
    """``swiftk_contract`` on a plugin (class, function, instance or module), or ``SWIFTK_CONTRACT`` in the
    module that defines it."""
    declared = getattr(obj, "swiftk_contract", None) or getattr(obj, "SWIFTK_CONTRACT", None)
    if declared is None and not isinstance(obj, ModuleType):
        owner = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
        declared = getattr(inspect.getmodule(owner), "SWIFTK_CONTRACT", None)
    return None if declared is None else str(declared)


def contract_problem(declared: str | None, current: str = CONTRACT_VERSION) -> str | None:
    """Why a plugin written for contract ``declared`` cannot run on ``current`` (None: it can).

    Semantic versioning: the major versions must match and the plugin may not need a newer minor; below 1.0
    every minor version may break, so the minor versions must match.
    """
    if declared is None:
        return None
    try:
        want = [int(part) for part in declared.split(".")[:2]] + [0]
        have = [int(part) for part in current.split(".")[:2]]
    except ValueError:
        return f"declares contract version {declared!r}, which is not MAJOR.MINOR[.PATCH]"
    if want[0] != have[0] or want[1] > have[1] or (have[0] == 0 and want[1] != have[1]):
        return (f"was written for contract {declared} but this swiftk implements {current}; "
                f"update the plugin (or install a swiftk with contract {want[0]}.{want[1]})")
    return None


def has_hookimpls(obj: object) -> bool:
    return any(
        getattr(getattr(obj, attr, None), f"{PROJECT_NAME}_impl", None) is not None
        for attr in dir(obj)
        if attr.startswith("swiftk_")
    )


def _source_of(target: Callable[..., Any]) -> str:
    try:
        return inspect.getsourcefile(target) or target.__module__
    except TypeError:
        return getattr(target, "__module__", "?")


def register(kind: str, name: str, *, source: str | None = None) -> Callable[[T], T]:
    """Record ``target`` as the ``kind`` plugin called ``name``; returns it unchanged.

    Registering the same name again from the same file replaces the entry (a re-import or a hot reload);
    from another file it is an error naming both. ``source`` overrides the file the target is defined in
    (a native plugin is registered by Python glue but comes from its .cpp or .so).
    """
    if kind not in KINDS:
        raise PluginRegistryError(f"unknown plugin kind '{kind}'; expected one of {', '.join(KINDS)}")

    def decorate(target: T) -> T:
        spec = PluginSpec(kind, name, target, source or _source_of(target))
        previous = _REGISTRY.get((kind, name))
        if previous is not None and previous.source != spec.source:
            raise PluginRegistryError(
                f"{kind} '{name}' is registered twice: by {previous.source} and by {spec.source}; "
                f"rename one of them."
            )
        _REGISTRY[(kind, name)] = spec
        return target

    return decorate


def register_loss(name: str) -> Callable[[T], T]:
    return register("loss", name)


def register_optimizer(name: str) -> Callable[[T], T]:
    return register("optimizer", name)


def register_scheduler(name: str) -> Callable[[T], T]:
    return register("scheduler", name)


def register_metric(name: str) -> Callable[[T], T]:
    return register("metric", name)


def register_callback(name: str) -> Callable[[T], T]:
    return register("callback", name)


def register_reward(name: str) -> Callable[[T], T]:
    return register("reward", name)


def forget(source: str) -> None:
    """Drop every registration made by ``source`` (a file), so that importing it afresh starts clean."""
    for key in [k for k, spec in _REGISTRY.items() if spec.source == source]:
        del _REGISTRY[key]


def registrations_of(source: str) -> list[PluginSpec]:
    """What ``source`` (a file) registered: a hot reload keeps it, to put it back if the new code is rejected."""
    return [spec for spec in _REGISTRY.values() if spec.source == source]


def reinstate(source: str, specs: list[PluginSpec]) -> None:
    """Make ``specs`` the registrations of ``source`` again (undoing a rejected reload's import)."""
    forget(source)
    for spec in specs:
        _REGISTRY[(spec.kind, spec.name)] = spec


def registered(kind: str | None = None) -> list[PluginSpec]:
    """Every registration (of one kind), sorted by kind then name."""
    return sorted((s for s in _REGISTRY.values() if kind in (None, s.kind)), key=lambda s: (s.kind, s.name))


def lookup(kind: str, name: str) -> PluginSpec:
    spec = _REGISTRY.get((kind, name))
    if spec is None:
        import difflib

        known = [s.name for s in registered(kind)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise PluginRegistryError(
            f"no {kind} named '{name}'; {hint}known: {', '.join(known) or 'none'}. "
            f"A plugin file named in `plugins = [...]` can register one with register_{kind}('{name}')."
        )
    return spec


# ----------------------------------------------------------------------------------------- adapters


class TokenLoss:
    """Adapts ``f(logits[N, V], labels[N])`` to ``swiftk_loss_compute`` over the supervised tokens."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.name = name
        self.fn = fn

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        logits, targets = supervised(batch, outputs)  # [N, V], [N]
        per_token = self.fn(logits.float(), targets)
        # A mean over this micro-batch's N tokens is turned back into a sum, so that the step's loss is
        # always the token sum divided by the accumulated count, whatever the module returns.
        total = per_token.sum() if per_token.dim() > 0 else per_token * targets.numel()
        return LossResult(total / max(batch.num_items_in_batch, 1))


class OptimizerFactory:
    def __init__(self, name: str, create: Callable[..., torch.optim.Optimizer]) -> None:
        self.name = name
        self.create = create

    @hookimpl
    def swiftk_optimizer_build(self, param_groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        return self.create(param_groups, lr=lr)


class SchedulerFactory:
    def __init__(self, name: str, create: Callable[..., torch.optim.lr_scheduler.LRScheduler]) -> None:
        self.name = name
        self.create = create

    @hookimpl
    def swiftk_scheduler_build(
        self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        return self.create(optimizer, total_steps, warmup_steps)


def _loss_adapter(spec: PluginSpec, config: dict[str, Any]) -> object:
    fn = spec.target(**config) if isinstance(spec.target, type) else functools.partial(spec.target, **config)
    return TokenLoss(spec.name, fn)


def _optimizer_adapter(spec: PluginSpec, config: dict[str, Any]) -> object:
    return OptimizerFactory(spec.name, functools.partial(spec.target, **config))


def _scheduler_adapter(spec: PluginSpec, config: dict[str, Any]) -> object:
    return SchedulerFactory(spec.name, functools.partial(spec.target, **config))


_ADAPTERS: dict[str, Callable[[PluginSpec, dict[str, Any]], object]] = {
    "loss": _loss_adapter,
    "optimizer": _optimizer_adapter,
    "scheduler": _scheduler_adapter,
}


imported_files: set[str] = set()  # plugin files imported by import_source, so that a new run can forget them


CODE_HASH = "__swiftk_code_hash__"  # set on a plugin file's module: the hash of the bytes it ran


def import_source(source: str) -> ModuleType:
    """Import a plugin file (under a unique module name) or an importable module."""
    path = Path(source)
    if source.endswith(".py") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"plugin file {source} does not exist")
        path = path.resolve()  # registrations then name the absolute file
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        name = f"swiftk_user_plugin_{path.stem}_{digest}"
        imported_files.add(str(path))
        if str(path.parent) not in sys.path:  # its local modules import as they would for a script
            sys.path.append(str(path.parent))
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # The bytes are read once: the code hash is of what runs, even if the file is saved again meanwhile.
        code = path.read_bytes()
        setattr(module, CODE_HASH, hashlib.sha256(code).hexdigest()[:12])
        sys.modules[name] = module
        try:
            exec(compile(code, str(path), "exec", dont_inherit=True), module.__dict__)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return importlib.import_module(source)


def source_hash(obj: Any) -> str:
    """Short hash of the file that defines ``obj`` (recorded in checkpoints and metrics, and in host handshakes): of
    the bytes ``import_source`` executed for a plugin file, else of the file as it is now."""
    module = obj if isinstance(obj, ModuleType) else sys.modules.get(getattr(obj, "__module__", None) or "")
    imported = getattr(module, CODE_HASH, None)
    if isinstance(imported, str):
        return imported
    try:
        path = inspect.getsourcefile(obj)
        if path:
            return file_hash(path)
    except (TypeError, OSError):
        pass
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:12]


def file_hash(path: str | Path) -> str:
    """The code hash of a file: the one digest every component compares (checkpoints, handshakes, reloads)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
