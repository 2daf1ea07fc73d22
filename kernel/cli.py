"""The ``swiftk`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from swiftk.kernel.errors import SwiftkError

DESCRIPTION = "swiftk fine-tunes and aligns LLMs; every loss, optimizer, metric and callback is a plugin."

RUN_HELP = textwrap.dedent("""\
    Train as CONFIG says (TOML, or YAML with the same schema).

    Every config problem is reported at once (key, file:line, a suggestion) with exit code 2, before
    any model is loaded or anything written. The run directory ([output] dir) receives config.toml
    (the resolved config), metrics.jsonl (one record per step, plus events), checkpoints/step-N/,
    final/ (the LoRA adapter in PEFT format, or the full model) and samples.json.

    exit codes: 0 done, 1 run error (data, model, checkpoint, plugin), 2 config error, 130 interrupted
    (a checkpoint was saved: continue with --resume).""")


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
                     help="LoRA: also write RUN_DIR/merged, a plain HF model with the adapter folded in")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config (defaults filled in, overrides applied) and exit")

    plot = sub.add_parser("plot", help="draw a run's loss and learning-rate curves",
                          description="Write RUN_DIR/curves.png from RUN_DIR/metrics.jsonl.")
    plot.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    plot.add_argument("--out", default=None, help="output image (default: RUN_DIR/curves.png)")
    return parser


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
                                   args.print_config))
        if args.command == "plot":
            from swiftk.kernel.plot import plot

            print(plot(args.run_dir, args.out))
            return 0
    except SwiftkError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        from swiftk.contracts import PluginError

        if isinstance(exc, PluginError):
            print(f"PluginError: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


def quiet_libraries() -> None:
    """Keep the console for the run: library warnings that need no action from the user are hidden."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
