"""The plugin author's commands: ``swiftk plugin new`` and ``swiftk plugin check``.

``new`` scaffolds a pip-installable plugin package from ``kernel/templates``; ``check`` runs the contract's
conformance checks (``swiftk.contracts.conformance``) on what a file or module registers.
"""

from __future__ import annotations

import argparse
import json
import keyword
import re
import sys
import textwrap
from pathlib import Path
from string import Template
from types import ModuleType

# kind -> (what the example does, how a run uses it: Markdown for the README); kernel/templates holds each kind
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

NEW_HELP = textwrap.dedent("""\
    Scaffold a pip-installable plugin package in DIR/NAME: pyproject.toml (a "swiftk.plugins" entry point,
    no dependency that could pull torch), NAME.py (a working example of KIND declaring SWIFTK_CONTRACT),
    tests/test_NAME.py (swiftk's pytest fixtures and swiftk_check) and a README. '-' in NAME becomes '_' in
    the module name. An existing, non-empty DIR/NAME is refused.

    exit codes: 0 created, 2 bad NAME or the folder exists.""")

CHECK_HELP = textwrap.dedent("""\
    Import a plugin file or module and run the contract's conformance checks on every plugin it registers
    (register_loss/optimizer/scheduler/metric/callback) and on the module itself when it has module-level
    @hookimpl functions. Tiny synthetic inputs, no model: a loss must return a finite 0-dim tensor that
    back-propagates to the logits, an optimizer must move the parameters and round-trip its state_dict,
    metrics and step_end must return float dicts, rewards one float per completion, and so on.
    Prints one line per plugin, then one line per finding (plugin, hook, problem, fix).

    exit codes: 0 all conform, 1 findings (or nothing registered), 2 the source cannot be imported
    (a SyntaxError is shown with file:line) or bad arguments.""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser.description = "Tools for plugin authors: scaffold a plugin package, check a plugin."
    verbs = parser.add_subparsers(dest="plugin_command", metavar="ACTION", required=True)
    new_ = verbs.add_parser("new", help="scaffold a pip-installable plugin package", description=NEW_HELP,
                            formatter_class=raw)
    new_.add_argument("name", metavar="NAME", help="package name, e.g. my-focal (module and plugin: my_focal)")
    new_.add_argument("--kind", required=True, choices=list(KINDS), help="what the example plugin is")
    new_.add_argument("--dir", default=None, metavar="DIR", help="parent folder of the package (default: .)")
    check_ = verbs.add_parser("check", help="run the conformance checks on a plugin file or module",
                              description=CHECK_HELP, formatter_class=raw)
    check_.add_argument("source", metavar="PATH_OR_MODULE", help="a plugin .py file or an importable module")
    check_.add_argument("--name", default=None, help="check only the plugin registered under NAME")
    check_.add_argument("--config", default=None, metavar="JSON",
                        help="arguments the plugins are built with, as a JSON object, e.g. '{\"gamma\": 0.5}' "
                             "(default: their defaults)")


def main(args: argparse.Namespace) -> int:
    if args.plugin_command == "new":
        return new(args.name, args.kind, args.dir)
    return check(args.source, args.name, args.config)


# ----------------------------------------------------------------------------------------- plugin new


def new(name: str, kind: str, directory: str | None) -> int:
    """Write DIR/NAME: pyproject.toml, the plugin module, tests/test_MODULE.py and a README."""
    from importlib import resources

    from swiftk.contracts import conformance

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
    from swiftk.contracts import PluginSpec, conformance, registered
    from swiftk.contracts.conformance import describe as describe_exception
    from swiftk.contracts.registry import has_hookimpls
    from swiftk.kernel.plugins import import_source

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
        if isinstance(target, PluginSpec) and target.kind in COMPONENT_KINDS:
            # A stage, tuner or generator was checked when it registered (its class and its config model);
            # it has no hooks to call on sample data.
            print(f"{'ok':<5} {label}: a {target.kind} (registered; run it from a config to exercise it)")
            continue
        findings = conformance.check(target, config if isinstance(target, PluginSpec) else None, name=label)
        failed += bool(findings)
        print(f"{'FAIL' if findings else 'ok':<5} {label}" + (f": {len(findings)} finding(s)" if findings else ""))
        print("".join(f"      {finding}\n" for finding in findings), end="")
    print(f"{len(targets)} plugin(s) checked, {failed} failed")
    return 1 if failed else 0


COMPONENT_KINDS = ("stage", "tuner", "generator")


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
