"""``swiftk native build|info``: compile a C++ plugin, or say what a built one was made for."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

BUILD_HELP = textwrap.dedent("""\
    Compile a C++ plugin file (it includes <swiftk/plugin.h> and declares SWIFTK_PLUGIN(name, kind); see
    native/README.md) into a Python extension against this torch, and print the library's path and info.
    Builds are cached by source, headers, torch, Python, compiler and flags in $SWIFTK_NATIVE_CACHE
    (default ~/.cache/swiftk/native); a first build takes 10-30 s. A config runs the plugin with
    plugins = ["native:FILE.cpp"] (built the same way) or with the printed .so.

    exit codes: 0 built (or cached), 1 compile error (shown as file:line:col), 2 bad arguments.""")

INFO_HELP = textwrap.dedent("""\
    Print the info record a built native plugin (.so) carries: its name, kind, contract version, and the
    torch version and C++ ABI it was compiled against, and whether this torch can load it.

    exit codes: 0 loadable here, 1 built for another torch/ABI/contract or not a swiftk plugin.""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser.description = "Build native (C++) plugins and check what a built one was made for."
    verbs = parser.add_subparsers(dest="native_command", metavar="ACTION", required=True)
    build = verbs.add_parser("build", help="compile a .cpp plugin (cached)", description=BUILD_HELP,
                             formatter_class=raw)
    build.add_argument("source", metavar="FILE.cpp", help="the plugin's C++ file")
    build.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    info = verbs.add_parser("info", help="what a built .so was compiled for", description=INFO_HELP,
                            formatter_class=raw)
    info.add_argument("library", metavar="FILE.so", help="a built native plugin")


def main(args: argparse.Namespace) -> int:
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
