"""``swiftk plan CONFIG [--gpus 8xA10]``: the memory a config needs per GPU, before anything is loaded."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Per-GPU memory of weights, gradients, optimizer state, activations, logits and runtime for the config's "
        "tuner, precision, batch and parallel layout, counted on the meta device (no weights are loaded). With "
        "--gpus, every layout swiftk runs on those GPUs (ddp, zero2, fsdp, tp, dp x tp, pp, dp x pp, device_map), "
        "whether it fits (trained, and while each rank loads the whole model, which every engine but device_map "
        "does before splitting it), and the one that needs the least.")
    parser.add_argument("config", help="a run config (TOML or YAML)")
    parser.add_argument("--gpus", default=None, help="COUNTxNAME (8xA10, 2xH100, 4x24GB) or cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as in swiftk run (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def main(args: argparse.Namespace) -> int:
    import warnings

    from swiftk.kernel.config import load_config
    from swiftk.kernel.plan import Gpus, make_plan, render

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, said by the meta model
    gpus = Gpus.parse(args.gpus) if args.gpus else None
    plan = make_plan(load_config(args.config, args.overrides), gpus)
    print(json.dumps(plan.as_dict()) if args.json else render(plan))
    best = plan.best()
    return 0 if gpus is None or best is not None else 3
