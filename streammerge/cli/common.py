"""Arguments and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from ..outputs import SAVE_METHODS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DTYPE_CHOICES = ["auto", "bf16", "fp16", "fp32"]
DEVICE_CHOICES = ["auto", "cpu", "cuda"]
SAVE_METHOD_CHOICES = list(SAVE_METHODS)
EXECUTOR_CHOICES = ["inprocess", "local", "ray"]


def size_arg(text: str) -> int:
    from ..options import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def direct_io_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--direct-io",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write shards with O_DIRECT, past the page cache (default on; falls back to buffered writes "
        "where the filesystem refuses it)",
    )


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="more detail on stderr")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
