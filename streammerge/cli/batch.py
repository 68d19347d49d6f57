"""``streammerge batch BASE OUT_ROOT ADAPTER...`` or ``--manifest jobs.toml``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    EXECUTOR_CHOICES,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    SAVE_METHOD_CHOICES,
    common_args,
    direct_io_arg,
    print_json,
    size_arg,
)


def add_parser(sub) -> None:
    b = sub.add_parser(
        "batch",
        help="merge many adapters onto one base in a single pass over the base",
        description="Merge each ADAPTER (globs such as 'runs/*/checkpoint-*' are expanded) onto BASE into its "
        "own directory under OUT_ROOT, reading each base tensor once for all of them. Or describe the jobs, "
        "with per-job options, in a TOML manifest. A failing job is reported and does not stop the others.",
        epilog="examples:\n  streammerge batch ./base ./merged 'runs/*/checkpoint-*'\n"
        "  streammerge batch --manifest jobs.toml --resume --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("args", nargs="*", metavar="BASE OUT_ROOT ADAPTER", help="base, output root, adapters")
    b.add_argument("--manifest", type=Path, help="jobs.toml: base, out_root, [defaults], [[job]] tables")
    b.add_argument("--dtype", choices=DTYPE_CHOICES, help="output float dtype for every job")
    b.add_argument("--shard-size", type=size_arg, help="max tensor bytes per output shard (5GB)")
    b.add_argument("--save-method", choices=SAVE_METHOD_CHOICES, help="for every job")
    b.add_argument("--gguf-type", metavar="TYPE", help="--save-method gguf: f32, f16, bf16, q8_0, auto or a k-quant")
    b.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    b.add_argument("--max-memory", default="128MiB", metavar="SIZE|FRACTION", help="work memory budget")
    b.add_argument("--resume", action="store_true", help="skip jobs whose output is already complete")
    b.add_argument("--compress", metavar="zstd[:LEVEL]", help="write archival *.safetensors.zst shards")
    b.add_argument(
        "--executor",
        default="inprocess",
        choices=EXECUTOR_CHOICES,
        help="inprocess: one shared pass; local/ray: each job's shards spread over workers",
    )
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--address", help="Ray cluster address")
    b.add_argument("--overwrite", action="store_true", help="replace non-empty job outputs")
    direct_io_arg(b)
    common_args(b)


def run(args, log) -> int:
    from ..batch import batch, jobs_from_args, read_manifest, results_json, summary_table

    keys = ("dtype", "shard_size", "save_method", "compress", "gguf_type")
    over = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.manifest:
        if args.args:
            log.error("batch: give either --manifest or BASE OUT_ROOT ADAPTER..., not both")
            return EXIT_USAGE
        base, _, jobs = read_manifest(args.manifest)
        for j in jobs:
            j.options.update(over)
    else:
        if len(args.args) < 3:
            log.error("batch: needs BASE OUT_ROOT ADAPTER... (or --manifest jobs.toml)")
            return EXIT_USAGE
        base, root, *adapters = args.args
        jobs = jobs_from_args(Path(root), adapters, over)
    results = batch(
        base,
        jobs,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        max_memory=args.max_memory,
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        direct_io=args.direct_io,
    )
    if args.json:
        print_json(results_json(results))
    elif not args.quiet:
        sys.stdout.write(summary_table(results) + "\n")
    return EXIT_ERROR if any(r.status == "failed" for r in results) else EXIT_OK
