"""``swiftk run CONFIG``: train as a config says."""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = textwrap.dedent("""\
    Train as CONFIG says (TOML, or YAML with the same schema).

    Every config problem is reported at once (key, file:line, a suggestion) with exit code 2, before
    any model is loaded or anything written. The run directory ([output] dir) receives config.toml
    (the resolved config), metrics.jsonl (one record per step, plus events), checkpoints/step-N/,
    final/ (the LoRA adapter in PEFT format, or the full model) and samples.json. With [tenants.NAME]
    tables, each tenant's plugins run in sandboxed hosts (SECURITY.md) and metrics.jsonl holds "audit"
    records of what each host got and of every failure the kernel saw.

    exit codes: 0 done, 1 run error (data, model, checkpoint, plugin), 2 config error, 3 paused by
    the stage (e.g. reward plugins failing past [train] reward_failure_threshold; --resume continues), 130 interrupted
    (a checkpoint was saved: continue with --resume).""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", help="path to the run's .toml (or .yaml) config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 --set train.max_steps=20; "
                             "VALUE is parsed as TOML (numbers, booleans, arrays, inline tables); repeatable")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue exactly from the latest checkpoint of [output] dir, or from PATH "
                             "(a run folder or a checkpoints/step-N folder); [distributed] may change (another "
                             "engine, number of processes, ZeRO stage, tp/pp size) if the global batch stays the same")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing [output] dir and start afresh (refused by default)")
    parser.add_argument("--merge", action="store_true",
                        help="lora/qlora/dora: also write RUN_DIR/merged, a plain HF model with the adapter folded "
                             "in")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults filled in, overrides applied) and exit")
    parser.add_argument("--watch", action="store_true",
                        help="hot-reload plugin files when saved: the next step uses the new code (a broken edit is "
                             "rejected and the old code keeps running)")


def main(args: argparse.Namespace) -> int:
    quiet_libraries()
    from swiftk.kernel.run import Options, execute

    return execute(Options(args.config, args.overrides, args.resume, args.overwrite, args.merge,
                           args.print_config, args.watch))


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
