"""The ``adaptive-data`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def parser() -> argparse.ArgumentParser:
    from . import __version__, _demo

    top = argparse.ArgumentParser(
        prog="adaptive-data",
        description="Learn, while a PyTorch model trains, which data to draw and how to "
        "augment it.",
    )
    top.add_argument("--version", action="version", version=f"adaptive-data {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train on scikit-learn's digits with GAR and with a uniform mixture (< 1 minute)",
        description="Train a small CNN on scikit-learn's digits (shipped with scikit-learn, "
        "nothing to download) from three sources: clean, random labels and pixel noise, with "
        "a GARTransform. Once with GAR (learned mixture and augmentation, one line in the "
        "loop) and once with the uniform mixture and uniform augmentation; print the learned "
        "weights and both test accuracies; write weights.png and summary.json.",
    )
    _demo.add_arguments(demo)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "demo":
        from . import _demo

        _demo.run(args)


if __name__ == "__main__":
    main()
