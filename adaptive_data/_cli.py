"""The ``adaptive-data`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

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
        "a GARTransform. Once with GAR (the learned mixture, one line in the loop; the "
        "augmentation policy frozen unless --learn-augment) and once with the uniform "
        "mixture; print the learned weights, both test accuracies and wall times; write "
        "weights.png, history.pt (adaptive-data plot draws it) and summary.json.",
    )
    _demo.add_arguments(demo)
    plot = commands.add_parser(
        "plot",
        help="draw a learned mixture's weights (and rewards) from a saved state to a PNG",
        description="Draw each source's weight over the updates, and each update's mean "
        "reward per source where the file holds them, to a PNG. STATE is a file torch.save "
        "wrote: a GARSampler.state_dict(), a checkpoint holding one (the Trainer's "
        "adaptive_data_rank0.pt, a Lightning .ckpt), or sampler.history (which also holds "
        "the rewards). Needs matplotlib: pip install 'adaptive-data[plot]'.",
    )
    plot.add_argument("state", type=Path, help="the file to draw (torch.save output)")
    plot.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="the PNG to write (default: STATE with the suffix .png)",
    )
    plot.add_argument("--title", default=None, help="the figure's title")
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "demo":
        from . import _demo

        _demo.run(args)
    elif args.command == "plot":
        from ._plot import plot_history

        out = args.out if args.out is not None else args.state.with_suffix(".png")
        try:
            written = plot_history(args.state, out, title=args.title)
        except (ImportError, OSError, ValueError) as e:
            raise SystemExit(f"adaptive-data plot: {e}") from None
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
