"""``streammerge merge BASE ADAPTER OUT``."""

from __future__ import annotations

import argparse
import importlib
import sys
import threading
from pathlib import Path

from ..options import CHECKSUMS
from ..outputs import output, save_method_help
from .common import (
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    EXECUTOR_CHOICES,
    EXIT_OK,
    SAVE_METHOD_CHOICES,
    common_args,
    direct_io_arg,
    fmt_bytes,
    print_json,
    size_arg,
)


def add_parser(sub, epilog: str) -> None:
    m = sub.add_parser(
        "merge",
        help="merge adapter(s) into a base checkpoint",
        description="Merge one or more PEFT LoRA adapters into BASE and write a merged checkpoint to OUT.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "base",
        metavar="BASE",
        help="Hugging Face model directory, or a Hub repo id ORG/NAME[@REVISION] read from the local cache; "
        "omit it (two arguments: ADAPTER OUT) to take the adapter's base_model_name_or_path",
    )
    m.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter directory or repo id, optionally :WEIGHT")
    m.add_argument("out", metavar="OUT", nargs="?", help="output directory (must not exist or be empty)")
    m.add_argument(
        "--adapter",
        dest="extra_adapters",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="another adapter to merge in the same pass (repeatable); deltas are summed in fp32",
    )
    m.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="output float dtype")
    m.add_argument("--shard-size", default="5GB", type=size_arg, help="max tensor bytes per output shard (5GB)")
    m.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="where to compute (auto)")
    m.add_argument(
        "--max-memory",
        default="128MiB",
        metavar="SIZE|FRACTION",
        help="work memory budget beyond the interpreter and torch: a size (256MiB, 2GB) or a fraction of "
        "available RAM (0.25); large tensors are merged in row blocks that fit it (default 128MiB)",
    )
    _output_args(m)
    _run_args(m)
    m.add_argument("--allow-nonfinite", action="store_true", help="do not fail on NaN/Inf in adapter or output")
    m.add_argument("--push-to-hub", metavar="REPO", help="after a successful merge, upload OUT to this Hub repo")
    m.add_argument("--private", action="store_true", help="--push-to-hub: create the repo private")
    m.add_argument("--revision", metavar="BRANCH", help="--push-to-hub: upload to this branch (created if needed)")
    direct_io_arg(m)
    common_args(m)


def _output_args(m: argparse.ArgumentParser) -> None:
    m.add_argument(
        "--save-method",
        default="merged_16bit",
        choices=SAVE_METHOD_CHOICES,
        help=save_method_help(),
    )
    m.add_argument(
        "--gguf-type",
        metavar="TYPE",
        help="gguf: f32, f16, bf16, q8_0 or auto (the checkpoint's dtype; default), as llama.cpp's converter "
        "writes them; or a k-quant (q4_k_m, q5_k_m, q6_k, ...) made by llama.cpp's quantizer "
        "(needs streammerge[llama-cpp])",
    )
    m.add_argument(
        "--quant-type", choices=["nf4", "fp4"], help="merged_4bit: 4-bit type (default: the input's, or nf4)"
    )
    m.add_argument("--blocksize", type=int, help="merged_4bit: quantization block size (default: the input's, or 64)")
    m.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="merged_4bit: quantize the statistics too (default: the input's, or on)",
    )
    m.add_argument(
        "--compress",
        metavar="zstd[:LEVEL]",
        help="write archival *.safetensors.zst shards (restore with 'streammerge decompress')",
    )
    m.add_argument(
        "--checksum",
        default="xxh3",
        choices=CHECKSUMS,
        help="per-shard checksum kept in the journal and report (xxh3: fastest, as 'xxhsum -H3' prints; "
        "crc32: zlib's; sha256: as sha256sum prints)",
    )


def _run_args(m: argparse.ArgumentParser) -> None:
    m.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    m.add_argument(
        "--executor",
        default="inprocess",
        choices=EXECUTOR_CHOICES,
        help="inprocess (default): this process; local: --workers processes, one output shard each; "
        "ray: one Ray task per output shard (needs streammerge[ray]; --address for a cluster)",
    )
    m.add_argument("--workers", type=int, default=2, help="worker processes for --executor local (2)")
    m.add_argument("--address", help="Ray cluster address for --executor ray (default: start a local one)")
    m.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (killed, Ctrl-C, disk full) with the same inputs and options, "
        "keeping its complete shards",
    )
    m.add_argument(
        "--verify",
        action="store_true",
        help="after writing, check the output (index, headers, checksums) and recompute --verify-sample tensors",
    )
    m.add_argument("--verify-sample", type=int, default=32, metavar="N", help="tensors recomputed by --verify (32)")


def print_plan(report, out) -> None:
    w = out.write
    src = report.base_source
    base = f"{src['repo_id']}@{src['commit']} ({src['path']})" if src.get("repo_id") else report.base
    w(f"base:     {base}\n")
    for a in report.adapters:
        w(f"adapter:  {a['path']} (weight {a['weight']:g})\n")
    w(f"output:   {report.out}  dtype={report.options['dtype']} device={report.device}\n")
    w(
        f"modules:  {len(report.modules)} updates on {report.tensors_merged} tensors; "
        f"{report.tensors_copied} of {report.tensors_total} tensors copied unchanged\n"
    )
    for mrec in report.modules:
        detail = f"r={mrec['r']} alpha={mrec['alpha']:g} scaling={mrec['scaling']:.6g}" if mrec["r"] else ""
        rule = f"  [{mrec['rule']}]" if mrec.get("rule") not in (None, "", "same name") else ""
        w(f"  {mrec['kind']:<9} {mrec['tensor']}  <- {mrec['module']}  {detail}{rule}\n")
    w("shards:\n")
    for s in report.shards:
        w(f"  {s['file']}  {fmt_bytes(s['bytes'])}  {s['tensors']} tensors\n")
    w(f"total:    {fmt_bytes(report.total_size)} ({report.total_size} bytes)\n")
    if report.free_disk_bytes is not None:
        w(f"free:     {fmt_bytes(report.free_disk_bytes)} at the output location\n")
    for n in report.notes:
        w(f"note:     {n}\n")


def print_summary(report, out) -> None:
    if report.up_to_date:
        out.write(f"up to date: {report.out} is already the finished output of these inputs and options\n")
        return
    secs = report.seconds.get("total", 0.0)
    rate = report.total_size / secs / 2**20 if secs else 0.0
    out.write(
        f"merged {report.tensors_merged} tensors ({len(report.modules)} module updates) into {report.out}: "
        f"{len(report.shards)} shard(s), {fmt_bytes(report.total_size)} in {secs:.1f}s ({rate:.0f} MiB/s), "
        f"peak RSS {fmt_bytes(report.peak_rss_bytes)}\n"
    )
    for n in report.notes:
        out.write(f"note: {n}\n")


def run(args, log) -> int:
    from ..api import adapter_specs, run_merge
    from ..options import RunOptions, make_options

    if not args.dry_run and output(args.save_method).merges:  # import torch while the inputs are read and planned
        threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()
    progress = not args.no_progress and not args.quiet and sys.stderr.isatty()
    base, adapter, out = (args.base, args.adapter, args.out) if args.out else (None, args.base, args.adapter)
    opts = make_options(
        dtype=args.dtype, shard_size=args.shard_size, device=args.device, save_method=args.save_method,
        allow_nonfinite=args.allow_nonfinite, max_memory=args.max_memory, quant_type=args.quant_type,
        blocksize=args.blocksize, double_quant=args.double_quant, compress=args.compress, checksum=args.checksum,
        direct_io=args.direct_io, gguf_type=args.gguf_type,
    )  # fmt: skip
    run_opts = RunOptions(args.executor, args.workers, args.address, args.resume, args.overwrite, args.device, progress)
    push = (args.push_to_hub, args.private, args.revision) if args.push_to_hub and not args.verify else None
    specs = adapter_specs(adapter, args.extra_adapters)  # with --verify: upload once verified (below)
    report = run_merge(base, specs, Path(out), opts, run_opts, dry_run=args.dry_run, push=push)
    for w in report.warnings:
        log.warning(w)
    if args.verify and not args.dry_run:
        from ..errors import VerifyError
        from ..verify import verify_output

        base_path = report.base_source.get("path", report.base)
        vr = verify_output(out, base_path, [adapter, *args.extra_adapters], args.verify_sample)
        if not vr.ok:
            raise VerifyError(f"{out}: verification failed", details=vr.problems)
        log.info(
            "verified (%s): %d checksum(s), %d tensors recomputed bit for bit", vr.kind, vr.checksums_checked,
            vr.recomputed,
        )  # fmt: skip
    if args.verify and args.push_to_hub and not args.dry_run:
        from ..hub import push

        report.pushed_to = push(Path(out), args.push_to_hub, args.private, args.revision, report)
    if args.json:
        print_json(report.to_dict())
    elif args.dry_run:
        print_plan(report, sys.stdout)
    elif not args.quiet:
        print_summary(report, sys.stderr)
    return EXIT_OK
