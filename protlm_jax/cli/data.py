"""``protlm data fetch``: its arguments and the printed summary."""

from __future__ import annotations

import argparse

from protlm_jax.data import fetch as data_fetch
from protlm_jax.data.fetch import DATASETS, DEFAULT_DATASET
from protlm_jax.data.locations import ENV_VAR


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``protlm data fetch`` options to ``parser``.

    Args:
        parser: the (sub)parser to extend.
    """
    parser.add_argument(
        "--dataset",
        action="append",
        choices=[d.name for d in DATASETS] + ["all"],
        metavar="NAME",
        help=(
            "data set to fetch; repeatable; 'all' for every one "
            f"(default: {DEFAULT_DATASET}). Known: "
            + ", ".join(f"{d.name} ({d.description})" for d in DATASETS)
        ),
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        metavar="DIR",
        help=f"where to put the data (default: fetched/ of the data root, ${ENV_VAR} "
        "or data/)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="download and extract again even if already fetched",
    )


def _human(n: int) -> str:
    """Formats a byte count for people (the exact count is printed too)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def run(args: argparse.Namespace) -> int:
    """Runs ``protlm data fetch`` with parsed arguments.

    Prints one line per data set: name, status, path, bytes.

    Args:
        args: namespace from a parser extended by :func:`add_arguments`.

    Returns:
        0 on success (failures raise :class:`ProtlmError`).
    """
    data_dir = getattr(args, "data_dir", None) or data_fetch.default_data_dir()
    summary = data_fetch.fetch(
        getattr(args, "dataset", None), data_dir, force=getattr(args, "force", False)
    )
    for name, info in summary.items():
        print(
            f"{name}\t{info['status']}\t{info['path']}\t{info['bytes']} bytes "
            f"({_human(info['bytes'])}, {info['seconds']:.1f}s)",
            flush=True,
        )
    return 0
