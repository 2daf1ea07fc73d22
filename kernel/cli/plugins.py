"""``swiftk plugins list|show``: every plugin a run could use (built-ins, installed entry points, extra files)."""

from __future__ import annotations

import argparse
import difflib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from swiftk.kernel.cli.plugin import belongs

if TYPE_CHECKING:
    from swiftk.contracts import PluginSpec

HELP = textwrap.dedent("""\
    List or describe the plugins a run can use: the built-ins, every installed package's "swiftk.plugins"
    entry point, and the files given with --plugin.""")

LIST_HELP = textwrap.dedent("""\
    One row per plugin a run can use (the built-ins, every installed package's "swiftk.plugins" entry point,
    and the files given with --plugin): its name, kind, source (built-in, the installed distribution and
    version, or the file), the contract version it declares, and its isolation.

    exit codes: 0 listed, 1 a plugin failed to load (reported on stderr, the others are listed).""")

SHOW_HELP = textwrap.dedent("""\
    Show a plugin's source, contract version, hooks and docstring, and the arguments its config table may
    set, with their annotations and defaults.

    exit codes: 0 shown, 1 no such plugin, 2 the name is ambiguous (use --kind).""")

CONFIG_TABLE = {"loss": "[train] loss_config", "optimizer": "[train] optimizer_config",
                "scheduler": "[train] scheduler_config", "metric": "[eval] metric_config.NAME",
                "callback": "[train] callbacks_config.NAME"}
# Hooks that say what a module-level plugin is, for listings.
HOOK_KINDS = {"swiftk_loss_compute": "loss", "swiftk_optimizer_build": "optimizer",
              "swiftk_scheduler_build": "scheduler", "swiftk_eval_end": "metric", "swiftk_step_end": "callback",
              "swiftk_reward_compute": "reward", "swiftk_data_row": "data", "swiftk_data_collate": "data",
              "swiftk_model_loaded": "model"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser.description = HELP
    parser.formatter_class = raw
    verbs = parser.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)
    listing = verbs.add_parser("list", help="a table: name, kind, source, contract, isolation",
                               description=LIST_HELP, formatter_class=raw)
    show_ = verbs.add_parser("show", help="a plugin's docstring, hooks and config arguments",
                             description=SHOW_HELP, formatter_class=raw)
    show_.add_argument("name", metavar="NAME", help="the plugin's name, as a config uses it (e.g. cross_entropy)")
    show_.add_argument("--kind", default=None, help="loss, optimizer, scheduler, metric, callback... when NAME "
                       "is used by several kinds")
    for command in (listing, show_):
        command.add_argument("--plugin", dest="extra", action="append", default=[], metavar="PATH",
                             help="also import this plugin file or module; repeatable")


def main(args: argparse.Namespace) -> int:
    if args.plugins_command == "list":
        return list_plugins(args.extra)
    return show(args.name, args.kind, args.extra)


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
    from swiftk.contracts import conformance, registered
    from swiftk.contracts.conformance import describe as describe_exception
    from swiftk.contracts.registry import has_hookimpls
    from swiftk.kernel.plugins import import_source, load_entry_points

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
    from swiftk.contracts import CONTRACT_VERSION

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
    from swiftk.contracts import CONTRACT_VERSION, PluginSpec, conformance

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
    if isinstance(plugin, PluginSpec) and plugin.kind in ("stage", "tuner"):  # a component: its own [train] keys
        from swiftk.kernel.config import config_model

        config = config_model(plugin.target)
        fields = config.model_fields if config is not None else {}
        lines += ["", f"[train] keys it adds ({plugin.kind} = '{plugin.name}'):" if fields else
                  "[train] keys it adds: none (it uses the generic [train] table)"]
        lines += [f"  {key} = {field.get_default(call_default_factory=True)!r}"
                  + (f"    # {field.description}" if field.description else "") for key, field in fields.items()]
    elif isinstance(plugin, PluginSpec):
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
