"""``swiftk datasets``: the named datasets ``[data] dataset_name`` accepts, their hub ids and task types."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("List the named datasets (built-in and registered by installed plugins). A config "
                          "names one with [data] dataset_name; its local copy goes in [data] dataset_path.")


def main(args: argparse.Namespace) -> int:
    from swiftk.kernel.plugins import load_entry_points
    from swiftk.plugins.datasets import listing

    load_entry_points()
    print(listing())
    return 0
