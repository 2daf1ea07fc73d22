"""The plugin author's commands: ``swiftk plugin new|check`` and ``swiftk plugins list|show``.

``new`` scaffolds a pip-installable plugin package from ``kernel/templates``; ``check`` runs the contract's
conformance checks (``swiftk.contracts.conformance``) on what a file or module registers; ``list`` and ``show``
describe every plugin a run could use: built-ins, installed entry points and extra files.
"""

from __future__ import annotations

import difflib
import inspect
import json
import keyword
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from types import ModuleType

from swiftk.contracts import CONTRACT_VERSION, PluginSpec, conformance, registered
from swiftk.contracts.conformance import describe as describe_exception
from swiftk.contracts.registry import has_hookimpls
from swiftk.kernel.plugins import import_source, load_entry_points

# kind -> (what the example does, how a run uses it: Markdown for the README)
KINDS = {
    "loss": ("focal loss over the supervised tokens",
             'In a run\'s config:\n\n    [train]\n    loss_type = "$module"\n    loss_config = { gamma = 2.0 }'),
    "optimizer": ("Signum (sign-SGD with momentum)",
                  'In a run\'s config:\n\n    [train]\n    optimizer = "$module"\n'
                  '    optimizer_config = { beta = 0.9 }\n    lr = 1e-4'),
    "metric": ("next-token accuracy on the eval set",
               'In a run\'s config (it reports `eval_$module`):\n\n    [eval]\n    metrics = ["$module"]'),
    "callback": ("early stopping when the training loss plateaus",
                 'In a run\'s config:\n\n    [train]\n    callbacks = ["$module"]\n'
                 '    callbacks_config = { $module = { patience = 50 } }'),
    "reward": ("exact-match reward for GRPO/PPO",
               "Installed, its module-level `@hookimpl` scores every rollout batch of an RL run. To use the file "
               'without installing it, name it in the config:\n\n    plugins = ["$module.py"]'),
}
CONFIG_TABLE = {"loss": "[train] loss_config", "optimizer": "[train] optimizer_config",
                "scheduler": "[train] scheduler_config", "metric": "[eval] metric_config.NAME",
                "callback": "[train] callbacks_config.NAME"}
# Hooks that say what a module-level plugin is, for listings.
HOOK_KINDS = {"swiftk_loss_compute": "loss", "swiftk_optimizer_build": "optimizer",
              "swiftk_scheduler_build": "scheduler", "swiftk_eval_end": "metric", "swiftk_step_end": "callback",
              "swiftk_reward_compute": "reward", "swiftk_data_row": "data", "swiftk_data_collate": "data",
              "swiftk_model_loaded": "model"}


# ----------------------------------------------------------------------------------------- plugin new


def new(name: str, kind: str, directory: str | None) -> int:
    """Write DIR/NAME: pyproject.toml, the plugin module, tests/test_MODULE.py and a README."""
    module = name.replace("-", "_")
    problem = name_problem(name, module)
    target = Path(directory or ".") / name
    if problem is None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        problem = f"{target} already exists and is not empty; choose another NAME or --dir"
    if problem:
        print(f"swiftk plugin new: {problem} (nothing was written)", file=sys.stderr)
        return 2
    summary, usage = KINDS[kind]
    values = {"name": name, "module": module, "kind": kind, "summary": summary,
              "contract": conformance.CONTRACT, "usage": Template(usage).substitute(module=module)}
    files = {"pyproject.toml": "pyproject.toml.tmpl", "README.md": "README.md.tmpl",
             f"{module}.py": f"{kind}.py.tmpl", f"tests/test_{module}.py": f"test_{kind}.py.tmpl"}
    templates = resources.files("swiftk.kernel") / "templates"
    for relative, template in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(templates.joinpath(template).read_text()).substitute(values))
    print(f"created {target}/, a {kind} plugin ({summary}):")
    print("\n".join(f"  {target / relative}" for relative in files))
    print(f"next:\n  cd {target} && pip install -e . && python -m pytest\n  swiftk plugin check {target / module}.py")
    return 0


def name_problem(name: str, module: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or keyword.iskeyword(module):
        return (f"NAME {name!r} is not a valid plugin name: use letters, digits, '-' and '_', starting with a "
                f"letter (the module is NAME with '-' as '_')")
    if module in sys.stdlib_module_names or module in ("swiftk", "torch", "pluggy", "pytest", "tests"):
        return f"NAME {name!r} would shadow the module {module!r}; choose another name"
    return None


# ----------------------------------------------------------------------------------------- plugin check


def check(source: str, only: str | None, config_json: str | None) -> int:
    """Conformance-check every plugin ``source`` registers; 0: all pass, 1: findings, 2: cannot run."""
    config = parse_config(config_json)
    if config is None:
        print(f"swiftk plugin check: --config must be a JSON object, e.g. '{{\"gamma\": 2.0}}', got {config_json}",
              file=sys.stderr)
        return 2
    before = {(s.kind, s.name): s for s in registered()}
    try:
        module = import_source(source)
    except Exception as exc:
        print(f"swiftk plugin check: cannot import {source}: {describe_exception(exc)}", file=sys.stderr)
        return 2
    specs = [s for s in registered() if before.get((s.kind, s.name)) is not s or belongs(s.source, module)]
    targets: list[tuple[str, object, str]] = [(f"{s.kind}:{s.name}", s, s.name) for s in specs]
    if has_hookimpls(module):
        label = conformance.plugin_label(module)
        targets.append((f"module:{label}", module, label))
    if only is not None:
        names = [t[2] for t in targets]
        targets = [t for t in targets if only in (t[0], t[2])]
        if not targets:
            print(f"swiftk plugin check: {source} has no plugin named {only!r}; it has: "
                  f"{', '.join(names) or 'none'}", file=sys.stderr)
            return 2
    if not targets:
        print(f"{source} registers no plugin: decorate a class or function with register_loss(...) (or "
              f"register_optimizer/scheduler/metric/callback), or define module-level @hookimpl functions")
        return 1
    failed = 0
    for label, target, _ in targets:
        findings = conformance.check(target, config if isinstance(target, PluginSpec) else None, name=label)
        failed += bool(findings)
        print(f"{'FAIL' if findings else 'ok':<5} {label}" + (f": {len(findings)} finding(s)" if findings else ""))
        print("".join(f"      {finding}\n" for finding in findings), end="")
    print(f"{len(targets)} plugin(s) checked, {failed} failed")
    return 1 if failed else 0


def parse_config(text: str | None) -> dict[str, object] | None:
    try:
        config = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return None
    return config if isinstance(config, dict) else None


def belongs(source: str, module: ModuleType) -> bool:
    """Whether a registration's source file is ``module``'s file (or inside it, for a package)."""
    file = getattr(module, "__file__", None)
    if file is None:
        return source == module.__name__
    path, origin = Path(source).resolve(), Path(file).resolve()
    if hasattr(module, "__path__"):
        return origin.parent in path.parents
    return path == origin


# ----------------------------------------------------------------------------------------- plugins list/show


@dataclass
class Entry:
    """One plugin a run could use."""

    name: str
    kind: str
    source: str  # "built-in", "DIST VERSION (entry point)" or a file
    contract: str | None
    plugin: PluginSpec | ModuleType
    isolation: str = "inline"


def discover(extra: list[str]) -> tuple[list[Entry], list[str]]:
    """Built-ins, installed entry points and ``extra`` plugin files; one problem line per failed import."""
    import swiftk.plugins

    origins: list[tuple[ModuleType, str]] = [(swiftk.plugins, "built-in")]
    installed, problems = load_entry_points()
    origins += [(entry.module, f"{entry.origin} (entry point)") for entry in installed]
    for source in extra:
        try:
            origins.append((import_source(source), source))
        except Exception as exc:
            problems.append(f"--plugin {source!r} failed to load: {describe_exception(exc)}")
    entries = []
    for spec in registered():
        where = next((label for module, label in origins if belongs(spec.source, module)), spec.source)
        entries.append(Entry(spec.name, spec.kind, where, spec.contract, spec))
    for module, label in origins[1:]:
        if has_hookimpls(module):
            impls, _ = conformance.validated_hookimpls(module.__name__, module)
            kind = "+".join(sorted({HOOK_KINDS.get(h, "hooks") for h in impls})) or "hooks"
            entries.append(Entry(conformance.plugin_label(module), kind, label,
                                 conformance.declared_contract(module), module))
    return entries, problems


def list_plugins(extra: list[str]) -> int:
    entries, problems = discover(extra)
    rows = [("NAME", "KIND", "SOURCE", "CONTRACT", "ISOLATION")]
    rows += [(e.name, e.kind, e.source, e.contract or "-", e.isolation) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    print(f"contract: this swiftk implements {CONTRACT_VERSION}")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 1 if problems else 0


def show(name: str, kind: str | None, extra: list[str]) -> int:
    entries, problems = discover(extra)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    matches = [e for e in entries if e.name == name and kind in (None, e.kind)]
    if len(matches) > 1:
        kinds = ", ".join(e.kind for e in matches)
        print(f"swiftk plugins show: {name!r} names several plugins ({kinds}); pick one with --kind", file=sys.stderr)
        return 2
    if not matches:
        close = difflib.get_close_matches(name, sorted({e.name for e in entries}), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `swiftk plugins list`"
        print(f"swiftk plugins show: no plugin named {name!r}{kind and f' of kind {kind}' or ''}{hint}",
              file=sys.stderr)
        return 1
    print(describe(matches[0]))
    return 0


def describe(entry: Entry) -> str:
    """Header, hooks, docstring and the config arguments with annotations and defaults."""
    plugin = entry.plugin
    lines = [f"{entry.kind} '{entry.name}'", f"  source:    {entry.source}",
             f"  contract:  {entry.contract or '-'} (this swiftk: {CONTRACT_VERSION})",
             f"  isolation: {entry.isolation}"]
    if isinstance(plugin, PluginSpec) and not plugin.is_hook_class:
        hooks = [f"{h} (through the {plugin.kind} adapter)" for h in HOOK_KINDS if HOOK_KINDS[h] == plugin.kind]
    else:
        impls = conformance.validated_hookimpls(entry.name, getattr(plugin, "target", plugin))[0]
        hooks = [f"{h}({', '.join(p for p in inspect.signature(f).parameters if p != 'self')})"
                 for h, f in sorted(impls.items())]
    doc = inspect.getdoc(plugin.target if isinstance(plugin, PluginSpec) else plugin)
    lines += [f"  hooks:     {', '.join(hooks) or '-'}", "", doc or "(no docstring)"]
    if isinstance(plugin, PluginSpec):
        table = CONFIG_TABLE.get(plugin.kind, "its config table").replace("NAME", plugin.name)
        params = list(plugin.config_signature().parameters.values())
        lines += ["", f"arguments (set them in {table}):" if params else "arguments: none"]
        lines += [f"  {argument(p)}" for p in params]
    return "\n".join(lines)


def argument(param: inspect.Parameter) -> str:
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(param.kind, "")
    text = stars + param.name
    if param.annotation is not param.empty:
        annotation = param.annotation
        text += f": {annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)}"
    if param.default is not param.empty:
        text += f" = {param.default!r}"
    return text
