"""The ``swiftk`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from swiftk.kernel.errors import SwiftkError

DESCRIPTION = "swiftk fine-tunes and aligns LLMs; every loss, optimizer, metric and callback is a plugin."

RUN_HELP = textwrap.dedent("""\
    Train as CONFIG says (TOML, or YAML with the same schema).

    Every config problem is reported at once (key, file:line, a suggestion) with exit code 2, before
    any model is loaded or anything written. The run directory ([output] dir) receives config.toml
    (the resolved config), metrics.jsonl (one record per step, plus events), checkpoints/step-N/,
    final/ (the LoRA adapter in PEFT format, or the full model) and samples.json. With [tenants.NAME]
    tables, each tenant's plugins run in sandboxed hosts (SECURITY.md) and metrics.jsonl holds "audit"
    records of what each host got and of every failure the kernel saw.

    exit codes: 0 done, 1 run error (data, model, checkpoint, plugin), 2 config error, 130 interrupted
    (a checkpoint was saved: continue with --resume).""")

EXPORT_HELP = textwrap.dedent("""\
    Export a finished run (RUN_DIR/final) for serving.

    An adapter run (lora, qlora, dora) is put back on the base model RUN_DIR/config.toml names, rebuilt as in
    training and checked against the base-weights fingerprint in the run's checkpoints, then merged; a QLoRA
    adapter is merged into the dequantized base (the weights it was trained against). A full, galore or
    freeze run's final/ is already a plain HF folder: --quantize or --gguf it.

      --merge            OUT: merged HF folder (safetensors + tokenizer), for AutoModelForCausalLM.from_pretrained
      --quantize bnb-nf4 OUT: the merged model in bitsandbytes 4-bit NF4 (double quant) / bnb-int8: 8-bit;
                         transformers reloads it (bitsandbytes installed)
      --gguf f16|q8_0    OUT/<run>-<type>.gguf: Llama-family models with a byte-level BPE tokenizer, for
                         llama.cpp or transformers' gguf_file= loader
    gptq, awq and fp8 need llm-compressor in its own environment (it pins another transformers): the
    command says how.

    exit codes: 0 written, 1 the run cannot be exported as asked (the message says why).""")

PLUGIN_KINDS = ["loss", "optimizer", "metric", "callback", "reward"]  # the examples kernel/templates holds
PLUGIN_NEW_HELP = textwrap.dedent("""\
    Scaffold a pip-installable plugin package in DIR/NAME: pyproject.toml (a "swiftk.plugins" entry point,
    no dependency that could pull torch), NAME.py (a working example of KIND declaring SWIFTK_CONTRACT),
    tests/test_NAME.py (swiftk's pytest fixtures and swiftk_check) and a README. '-' in NAME becomes '_' in
    the module name. An existing, non-empty DIR/NAME is refused.

    exit codes: 0 created, 2 bad NAME or the folder exists.""")

PLUGIN_CHECK_HELP = textwrap.dedent("""\
    Import a plugin file or module and run the contract's conformance checks on every plugin it registers
    (register_loss/optimizer/scheduler/metric/callback) and on the module itself when it has module-level
    @hookimpl functions. Tiny synthetic inputs, no model: a loss must return a finite 0-dim tensor that
    back-propagates to the logits, an optimizer must move the parameters and round-trip its state_dict,
    metrics and step_end must return float dicts, rewards one float per completion, and so on.
    Prints one line per plugin, then one line per finding (plugin, hook, problem, fix).

    exit codes: 0 all conform, 1 findings (or nothing registered), 2 the source cannot be imported
    (a SyntaxError is shown with file:line) or bad arguments.""")

PLUGINS_HELP = textwrap.dedent("""\
    List or describe the plugins a run can use: the built-ins, every installed package's "swiftk.plugins"
    entry point, and the files given with --plugin.""")

PLUGINS_LIST_HELP = textwrap.dedent("""\
    One row per plugin a run can use (the built-ins, every installed package's "swiftk.plugins" entry point,
    and the files given with --plugin): its name, kind, source (built-in, the installed distribution and
    version, or the file), the contract version it declares, and its isolation.

    exit codes: 0 listed, 1 a plugin failed to load (reported on stderr, the others are listed).""")

PLUGINS_SHOW_HELP = textwrap.dedent("""\
    Show a plugin's source, contract version, hooks and docstring, and the arguments its config table may
    set, with their annotations and defaults.

    exit codes: 0 shown, 1 no such plugin, 2 the name is ambiguous (use --kind).""")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftk", description=DESCRIPTION)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train from a config file", description=RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", help="path to the run's .toml (or .yaml) config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.lr=1e-4 --set train.max_steps=20; "
                          "VALUE is parsed as TOML (numbers, booleans, arrays, inline tables); repeatable")
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                     help="continue exactly from the latest checkpoint of [output] dir, or from PATH "
                          "(a run folder or a checkpoints/step-N folder)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete an existing [output] dir and start afresh (refused by default)")
    run.add_argument("--merge", action="store_true",
                     help="lora/qlora/dora: also write RUN_DIR/merged, a plain HF model with the adapter folded in")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config (defaults filled in, overrides applied) and exit")
    run.add_argument("--watch", action="store_true",
                     help="hot-reload plugin files when saved: the next step uses the new code (a broken edit is "
                          "rejected and the old code keeps running)")

    plot = sub.add_parser("plot", help="draw a run's loss and learning-rate curves",
                          description="Write RUN_DIR/curves.png from RUN_DIR/metrics.jsonl.")
    plot.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    plot.add_argument("--out", default=None, help="output image (default: RUN_DIR/curves.png)")

    export = sub.add_parser("export", help="merge, quantize or GGUF-convert a finished run's model",
                            description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run_dir", help="a run directory (holds config.toml and final/)")
    export.add_argument("--out", required=True, help="output folder (must be empty or new)")
    export.add_argument("--merge", action="store_true", help="fold the adapter into the base (adapter runs)")
    export.add_argument("--quantize", choices=["bnb-nf4", "bnb-int8", "gptq", "awq", "fp8"], default=None,
                        help="write a quantized HF folder (merging an adapter first)")
    export.add_argument("--gguf", choices=["f16", "q8_0"], default=None,
                        help="write a GGUF file (merging an adapter first)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    add_plugin_commands(sub)
    add_native_commands(sub)
    add_sandbox_commands(sub)
    return parser


NATIVE_BUILD_HELP = textwrap.dedent("""\
    Compile a C++ plugin file (it includes <swiftk/plugin.h> and declares SWIFTK_PLUGIN(name, kind); see
    native/README.md) into a Python extension against this torch, and print the library's path and info.
    Builds are cached by source, headers, torch, Python, compiler and flags in $SWIFTK_NATIVE_CACHE
    (default ~/.cache/swiftk/native); a first build takes 10-30 s. A config runs the plugin with
    plugins = ["native:FILE.cpp"] (built the same way) or with the printed .so.

    exit codes: 0 built (or cached), 1 compile error (shown as file:line:col), 2 bad arguments.""")

NATIVE_INFO_HELP = textwrap.dedent("""\
    Print the info record a built native plugin (.so) carries: its name, kind, contract version, and the
    torch version and C++ ABI it was compiled against, and whether this torch can load it.

    exit codes: 0 loadable here, 1 built for another torch/ABI/contract or not a swiftk plugin.""")


def add_native_commands(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    native = sub.add_parser("native", help="build or inspect C++ plugins (build, info)",
                            description="Build native (C++) plugins and check what a built one was made for.")
    verbs = native.add_subparsers(dest="native_command", metavar="ACTION", required=True)
    build = verbs.add_parser("build", help="compile a .cpp plugin (cached)", description=NATIVE_BUILD_HELP,
                             formatter_class=raw)
    build.add_argument("source", metavar="FILE.cpp", help="the plugin's C++ file")
    build.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    info = verbs.add_parser("info", help="what a built .so was compiled for", description=NATIVE_INFO_HELP,
                            formatter_class=raw)
    info.add_argument("library", metavar="FILE.so", help="a built native plugin")


def native_command(args: argparse.Namespace) -> int:
    from swiftk.native import NativeABIError, NativeBuildError, build, read_info
    from swiftk.native.load import compatibility_problem, load_library

    try:
        if args.native_command == "build":
            library = build(args.source, force=args.force)
            plugin = load_library(library, source=Path(args.source))
            print(library)
            print(json.dumps(plugin.info.__dict__))
            return 0
        info = read_info(Path(args.library))
        print(json.dumps(info.__dict__))
        problem = compatibility_problem(info)
        if problem:
            print(f"not loadable here: {problem}", file=sys.stderr)
            return 1
        return 0
    except (NativeBuildError, NativeABIError, FileNotFoundError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


SANDBOX_DOCTOR_HELP = textwrap.dedent("""\
    Print which sandbox layers this machine supports (uid, namespaces, rlimits, seccomp, landlock, cgroup,
    no_new_privs), then start an empty sandboxed host per tenant of CONFIG (or one probe tenant) and print what
    each host actually got, read back from inside it (/proc/self/status, its namespaces, its cgroups). No
    tenant code is imported. See SECURITY.md for what each layer stops.

    exit codes: 0 every required layer is in effect ([sandbox] require; default uid, namespaces, seccomp,
    rlimits), 1 a required layer is missing or a host did not get it.""")


def add_sandbox_commands(sub: argparse._SubParsersAction) -> None:
    sandbox = sub.add_parser("sandbox", help="check the multi-tenant sandbox (doctor)",
                             description="Check what the sandbox for tenants' plugins can do on this machine.")
    verbs = sandbox.add_subparsers(dest="sandbox_command", metavar="ACTION", required=True)
    doctor = verbs.add_parser("doctor", help="the layers this machine supports and what a tenant host got",
                              description=SANDBOX_DOCTOR_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    doctor.add_argument("config", nargs="?", help="a run config: check its [tenants] and [sandbox] require")


def add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    plugin = sub.add_parser("plugin", help="write and check a plugin (new, check)",
                            description="Tools for plugin authors: scaffold a plugin package, check a plugin.")
    verbs = plugin.add_subparsers(dest="plugin_command", metavar="ACTION", required=True)
    new = verbs.add_parser("new", help="scaffold a pip-installable plugin package", description=PLUGIN_NEW_HELP,
                           formatter_class=raw)
    new.add_argument("name", metavar="NAME", help="package name, e.g. my-focal (module and plugin: my_focal)")
    new.add_argument("--kind", required=True, choices=PLUGIN_KINDS, help="what the example plugin is")
    new.add_argument("--dir", default=None, metavar="DIR", help="parent folder of the package (default: .)")
    check = verbs.add_parser("check", help="run the conformance checks on a plugin file or module",
                             description=PLUGIN_CHECK_HELP, formatter_class=raw)
    check.add_argument("source", metavar="PATH_OR_MODULE", help="a plugin .py file or an importable module")
    check.add_argument("--name", default=None, help="check only the plugin registered under NAME")
    check.add_argument("--config", default=None, metavar="JSON",
                       help="arguments the plugins are built with, as a JSON object, e.g. '{\"gamma\": 0.5}' "
                            "(default: their defaults)")

    plugins = sub.add_parser("plugins", help="list or describe the available plugins (list, show)",
                             description=PLUGINS_HELP, formatter_class=raw)
    verbs = plugins.add_subparsers(dest="plugins_command", metavar="ACTION", required=True)
    listing = verbs.add_parser("list", help="a table: name, kind, source, contract, isolation",
                               description=PLUGINS_LIST_HELP, formatter_class=raw)
    show = verbs.add_parser("show", help="a plugin's docstring, hooks and config arguments",
                            description=PLUGINS_SHOW_HELP, formatter_class=raw)
    show.add_argument("name", metavar="NAME", help="the plugin's name, as a config uses it (e.g. cross_entropy)")
    show.add_argument("--kind", default=None, help="loss, optimizer, scheduler, metric, callback... when NAME "
                      "is used by several kinds")
    for command in (listing, show):
        command.add_argument("--plugin", dest="extra", action="append", default=[], metavar="PATH",
                             help="also import this plugin file or module; repeatable")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import swiftk

        print(swiftk.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        if args.command == "run":
            quiet_libraries()
            from swiftk.kernel.run import Options, execute

            return execute(Options(args.config, args.overrides, args.resume, args.overwrite, args.merge,
                                   args.print_config, args.watch))
        if args.command == "plot":
            from swiftk.kernel.plot import plot

            print(plot(args.run_dir, args.out))
            return 0
        if args.command == "export":
            quiet_libraries()
            from swiftk.kernel.export import export

            for line in export(args.run_dir, args.out, args.merge, args.quantize, args.gguf, args.overwrite):
                print(line)
            return 0
        if args.command in ("plugin", "plugins"):
            return plugin_command(args)
        if args.command == "native":
            return native_command(args)
        if args.command == "sandbox":
            from swiftk.kernel.sandbox_cli import doctor

            return doctor(args.config)
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
    return 0


def plugin_command(args: argparse.Namespace) -> int:
    from swiftk.kernel import plugin_cli

    if args.command == "plugin" and args.plugin_command == "new":
        return plugin_cli.new(args.name, args.kind, args.dir)
    if args.command == "plugin":
        return plugin_cli.check(args.source, args.name, args.config)
    if args.plugins_command == "list":
        return plugin_cli.list_plugins(args.extra)
    return plugin_cli.show(args.name, args.kind, args.extra)


def quiet_libraries() -> None:
    """Keep the console for the run: library warnings that need no action from the user are hidden."""
    import logging
    import warnings

    # bitsandbytes (imported by peft) offers a hub-downloaded CPU kernel; offline there is nothing to act on.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
