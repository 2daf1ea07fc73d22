"""The ``swiftk`` command line: one table of commands, each command one module, imported only when it runs.

``COMMANDS`` maps a command's name to the module that implements it and the line ``swiftk --help`` shows for
it. ``swiftk --help`` imports no command module; ``swiftk CMD ...`` (``--help`` included) imports CMD's module
alone. A command module exposes two functions:

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        '''Add the command's arguments (and set parser.description / parser.formatter_class if it likes).'''

    def main(args: argparse.Namespace) -> int:
        '''Run the command; the return value is the exit code (None: 0).'''

and imports anything heavy (torch, transformers, the plugins) inside ``main``, so that its ``--help`` answers
at once. A ``SwiftkError`` raised by ``main`` is printed without a traceback and exits with its ``exit_code``;
a ``PluginError`` exits 1; a second Ctrl-C exits 130.

An installed package adds a command through the entry-point group ``swiftk.commands``; the entry point names
a module (or an object in one) with the same two functions:

    [project.entry-points."swiftk.commands"]
    greet = "swiftk_greet.command"          # swiftk greet ...

``swiftk --help`` lists it with the package that provides it, without importing it. A built-in command's name
cannot be taken: such an entry point is ignored.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, NamedTuple

from swiftk.kernel.errors import SwiftkError

DESCRIPTION = "swiftk fine-tunes and aligns LLMs; every loss, optimizer, metric and callback is a plugin."
ENTRY_POINT_GROUP = "swiftk.commands"


class Command(NamedTuple):
    module: str  # "pkg.module" or "pkg.module:object" (an entry point's value); imported when the command runs
    help: str  # its line in `swiftk --help`


COMMANDS = {
    "init": Command("swiftk.kernel.cli.init", "write a commented starter config by answering a few questions"),
    "run": Command("swiftk.kernel.cli.run", "train from a config file"),
    "web": Command("swiftk.kernel.cli.web", "launch, watch and compare runs and chat with a checkpoint in a browser"),
    "plot": Command("swiftk.kernel.cli.plot", "draw a run's loss and learning-rate curves"),
    "plan": Command("swiftk.kernel.cli.plan", "the memory a config needs per GPU, and the layouts that fit"),
    "export": Command("swiftk.kernel.cli.export", "merge, quantize or GGUF-convert a finished run's model"),
    "infer": Command("swiftk.kernel.cli.infer", "chat with a finished run or a model, or answer a file of prompts"),
    "serve": Command("swiftk.kernel.cli.serve", "serve a finished run or a model over OpenAI's API"),
    "eval": Command("swiftk.kernel.cli.eval", "benchmark a run, a model or an endpoint on tasks; compare reports"),
    "plugin": Command("swiftk.kernel.cli.plugin", "write and check a plugin (new, check)"),
    "plugins": Command("swiftk.kernel.cli.plugins", "list or describe the available plugins (list, show)"),
    "native": Command("swiftk.kernel.cli.native", "build or inspect C++ plugins (build, info)"),
    "sandbox": Command("swiftk.kernel.cli.sandbox", "check the multi-tenant sandbox (doctor)"),
    "datasets": Command("swiftk.kernel.cli.datasets", "list the named datasets a config's dataset_name accepts"),
    "env": Command("swiftk.kernel.cli.env", "install, list or remove tools' managed environments (vllm, evalscope)"),
}


def installed_commands() -> dict[str, Command]:
    """Commands that installed packages add through ``swiftk.commands`` entry points (not imported here)."""
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
        if ep.name not in COMMANDS:
            found.setdefault(ep.name, Command(ep.value, f"(from {origin}; see swiftk {ep.name} --help)"))
    return found


def load(command: Command) -> Any:
    """The command's module (or the object an entry point names in it)."""
    module_name, _, attribute = command.module.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in filter(None, attribute.split(".")):
        target = getattr(target, part)
    return target


def build_parser(commands: dict[str, Command]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one empty sub-parser per command; a command fills its own when it is chosen."""
    parser = argparse.ArgumentParser(prog="swiftk", description=DESCRIPTION)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser, {name: sub.add_parser(name, help=command.help) for name, command in commands.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {**COMMANDS, **installed_commands()}
    parser, subparsers = build_parser(commands)
    name = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level has no option with a value
    command = None
    if name in commands:
        try:
            command = load(commands[name])
        except Exception as exc:
            if name in COMMANDS:
                raise
            print(f"swiftk: command '{name}' ({commands[name].module}) failed to load: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 1
        command.add_arguments(subparsers[name])
    args = parser.parse_args(argv)
    if args.version:
        import swiftk

        print(swiftk.__version__)
        return 0
    if command is None:
        parser.print_help()
        return 0
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        code = command.main(args)
        return 0 if code is None else int(code)
    except SwiftkError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: the run stops now; a half-written checkpoint is never trusted
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:
        from swiftk.contracts import PluginError

        if isinstance(exc, PluginError):
            print(f"PluginError: {exc}", file=sys.stderr)
            return 1
        raise
