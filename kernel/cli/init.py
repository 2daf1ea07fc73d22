"""``swiftk init``: a few questions in the terminal, then a commented, valid config to train from.

The answers become a config through ``kernel/starter.py`` (the web UI's launch form uses the same module), which
checks it as ``swiftk run`` would before anything is written. ``--yes`` asks nothing: the defaults, plus the
flags given. Ctrl-C at any question leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any

from swiftk.kernel.errors import SwiftkError
from swiftk.kernel.starter import MODELS, STAGES, TUNERS, Answers, default_tuner, refusals

OWN_MODEL = "another model: a folder or a hub id"
OWN_DATA = "my own data: a .jsonl file or a named dataset"


class InitError(SwiftkError):
    """``swiftk init`` cannot ask its questions here (no terminal) or was told not to write."""

    exit_code = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = textwrap.fill(
        "Write a commented starter config by answering a few questions (model, stage, tuner, data), then train "
        "it with `swiftk run PATH`. The file is checked as `swiftk run` checks it before it is written. Run it "
        "from the repository's folder: the example data paths (data/...) are read from the current folder.", 100)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    models = "; ".join(f"{k} ({c.label}: {c.help})" for k, c in MODELS.items())
    parser.epilog = "\n".join([
        textwrap.fill(f"models: {models}; or a model folder or hub id (owner/name)", 100, subsequent_indent="  "),
        f"stages: {', '.join(STAGES)}", f"tuners: {', '.join(TUNERS)}", "",
        "examples:", "  swiftk init", "  swiftk init --yes --model tiny --stage dpo configs/dpo_try.toml"])
    parser.add_argument("path", nargs="?", metavar="PATH",
                        help="where to write the config (default: configs/NAME.toml, configs/ created if missing)")
    parser.add_argument("-y", "--yes", action="store_true",
                        help="ask nothing: take the defaults (smollm2, sft, lora, the shipped data) and the flags")
    parser.add_argument("--model", metavar="M", help=f"a preset ({', '.join(MODELS)}), a model folder or a hub id")
    parser.add_argument("--stage", choices=list(STAGES), help="the training stage (default: sft)")
    parser.add_argument("--tuner", choices=list(TUNERS),
                        help="what trains (default: the model's preset: lora, or full for tiny)")
    parser.add_argument("--data", metavar="D", help="a .jsonl file or a named dataset (`swiftk datasets`) "
                        "(default: the stage's example data shipped in data/)")
    parser.add_argument("--name", metavar="N", help="the run's name: its folder runs/N (default: my_first_run)")
    parser.add_argument("--force", action="store_true", help="overwrite PATH if it exists")


def main(args: argparse.Namespace) -> int:
    from swiftk.kernel.config import ConfigError
    from swiftk.kernel.starter import write

    if args.yes:
        answers = from_flags(args)
        problems = refusals(answers)
        if problems:
            raise ConfigError(problems)
        path = Path(args.path or f"configs/{answers.name}.toml")
    else:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise InitError("swiftk init asks its questions in a terminal, and this is not one; pass --yes to take "
                            "the defaults (with --model, --stage, --tuner, --data, --name as you like)")
        answers, path = ask(args)
    write(answers, path, overwrite=args.force or (not args.yes and path.exists()))
    run = f"swiftk run {path}"
    print(f"wrote {path}: {summary_line(answers)}, into {answers.runs_dir}/{answers.name}\n\nnext:\n"
          f"  {run}  # train\n  {'swiftk web':<{len(run)}}  # watch it, compare runs, chat with the result")
    return 0


def from_flags(args: argparse.Namespace) -> Answers:
    model = args.model or "smollm2"
    return Answers(name=args.name or "my_first_run", model=model, stage=args.stage or "sft",
                   tuner=args.tuner or default_tuner(model), data=args.data)


def summary_line(a: Answers) -> str:
    model = MODELS[a.model].label if a.model in MODELS else a.model
    return f"{STAGES[a.stage].label} of {model} with {TUNERS[a.tuner].label}"


def ask(args: argparse.Namespace) -> tuple[Answers, Path]:
    """The questions a flag did not answer, the summary, and a confirmation. Ctrl-C raises KeyboardInterrupt."""
    import questionary
    from questionary import Choice

    from swiftk.kernel.starter import NAME, qlora_refusal

    name = args.name or prompt(questionary.text(
        "Name of the run (its folder is runs/NAME):", default="my_first_run",
        validate=lambda text: bool(NAME.match(text)) or "letters, digits, '.', '-' or '_'"))
    model = args.model or prompt(questionary.select("Which model?", choices=[
        *(Choice(f"{c.key}: {c.label} ({c.help})", value=c.key) for c in MODELS.values()),
        Choice(OWN_MODEL, value=OWN_MODEL)]))
    if model == OWN_MODEL:
        model = prompt(questionary.text("Model folder or hub id (owner/name):",
                                        validate=lambda text: bool(text.strip()) or "a folder or hub id")).strip()
    stage = args.stage or prompt(questionary.select("What should it learn?", choices=[
        Choice(f"{c.key}: {c.help}", value=c.key) for c in STAGES.values()]))
    refused = qlora_refusal(model)
    tuner = args.tuner or prompt(questionary.select("What trains?", default=default_tuner(model), choices=[
        Choice(f"{c.key}: {c.help}", value=c.key, disabled=refused if c.key == "qlora" else None)
        for c in TUNERS.values()]))
    data = args.data
    if data is None and prompt(questionary.select("Which data?", choices=[
            Choice("the example data for this stage, shipped in data/", value="shipped"),
            Choice(OWN_DATA, value=OWN_DATA)])) == OWN_DATA:
        data = prompt(questionary.text("Data file (.jsonl) or named dataset (`swiftk datasets` lists them):",
                                       validate=lambda text: bool(text.strip()) or "a file or a dataset name"))
    answers = Answers(name=name, model=model, stage=stage, tuner=tuner, data=data)
    path = Path(args.path or prompt(questionary.text("Write the config to:", default=f"configs/{name}.toml")))
    show(answers, path)
    if path.exists() and not args.force and not prompt(questionary.confirm(f"{path} exists. Overwrite it?",
                                                                           default=False)):
        raise InitError(f"{path} exists and was left as it was; nothing written")
    if not prompt(questionary.confirm("Write it?", default=True)):
        raise InitError("nothing written")
    return answers, path


def prompt(question: Any) -> Any:
    """The answer; Ctrl-C propagates (the CLI exits 130) instead of questionary's None."""
    return question.unsafe_ask()


def show(a: Answers, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="swiftk init", show_header=False)
    for key, value in (("run", f"{a.name} (into {a.runs_dir}/{a.name})"),
                       ("model", MODELS[a.model].label if a.model in MODELS else a.model),
                       ("stage", f"{a.stage}: {STAGES[a.stage].help}"),
                       ("tuner", f"{a.tuner}: {TUNERS[a.tuner].help}"),
                       ("data", a.data or "the shipped example data"), ("config", str(path))):
        table.add_row(key, value)
    Console().print(table)
