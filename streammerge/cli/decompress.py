"""``streammerge decompress SRC DST``: a ``--compress`` output back to plain safetensors."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import EXIT_OK, common_args


def add_parser(sub) -> None:
    d = sub.add_parser("decompress", help="restore a --compress output to plain safetensors, byte-identical")
    d.add_argument("src", metavar="SRC")
    d.add_argument("dst", metavar="DST")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    common_args(d)


def run(args, log) -> int:
    from ..sinks.safetensors import decompress_dir

    files = decompress_dir(Path(args.src), Path(args.dst), args.overwrite)
    if not args.quiet:
        sys.stderr.write(f"decompressed {len(files)} shard(s) into {args.dst}\n")
    return EXIT_OK
