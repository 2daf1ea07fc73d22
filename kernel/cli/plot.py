"""``swiftk plot RUN_DIR``: a run's loss and learning-rate curves as an image."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Write RUN_DIR/curves.png from RUN_DIR/metrics.jsonl."
    parser.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output image (default: RUN_DIR/curves.png)")


def main(args: argparse.Namespace) -> int:
    from swiftk.kernel.plot import plot

    print(plot(args.run_dir, args.out))
    return 0
