"""Command line: argparse, logging, progress, ``--json``; maps exceptions to exit codes.

The only module that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .errors import StreamMergeError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
exit codes:
  0    success
  1    streammerge error: bad input, adapter/base mismatch, non-finite values, I/O failure
  2    usage error (bad arguments)
  130  interrupted (Ctrl-C, SIGTERM); nothing is left at OUT; continue with --resume

examples:
  streammerge merge ./Llama-3-8B ./my-lora ./Llama-3-8B-merged
  streammerge merge ./base ./lora ./out --dtype bf16 --shard-size 2GB --json
  streammerge merge ./base ./lora-a:0.7 ./out --adapter ./lora-b:0.3
  streammerge merge ./base ./lora ./out --dry-run
  streammerge merge ./base ./lora ./out --resume      # after a crash, Ctrl-C or a full disk
  streammerge verify ./out --base ./base --adapter ./lora --sample 20
  streammerge batch ./base ./merged 'runs/*/checkpoint-*'   # one pass over the base for all of them
  streammerge inspect ./my-lora
"""


def _direct_io_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--direct-io",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write shards with O_DIRECT, past the page cache (default on; falls back to buffered writes "
        "where the filesystem refuses it)",
    )


def _size_arg(text: str) -> int:
    from .run import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streammerge",
        description="Merge LoRA adapters into safetensors checkpoints out of core, exactly as PEFT does.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"streammerge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser(
        "merge",
        help="merge adapter(s) into a base checkpoint",
        description="Merge one or more PEFT LoRA adapters into BASE and write a merged checkpoint to OUT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("base", metavar="BASE", help="Hugging Face model directory (config.json + safetensors)")
    m.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter directory, optionally PATH:WEIGHT")
    m.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty)")
    m.add_argument(
        "--adapter",
        dest="extra_adapters",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="another adapter to merge in the same pass (repeatable); deltas are summed in fp32",
    )
    m.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="output float dtype")
    m.add_argument("--shard-size", default="5GB", type=_size_arg, help="max tensor bytes per output shard (5GB)")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute (auto)")
    m.add_argument(
        "--max-memory",
        default="128MiB",
        metavar="SIZE|FRACTION",
        help="work memory budget beyond the interpreter and torch: a size (256MiB, 2GB) or a fraction of "
        "available RAM (0.25); large tensors are merged in row blocks that fit it (default 128MiB)",
    )
    m.add_argument(
        "--save-method",
        default="merged_16bit",
        choices=["merged_16bit", "merged_4bit", "lora"],
        help="merged_16bit: dense merged model; merged_4bit: merged then re-quantized with bitsandbytes "
        "(loses precision); lora: no merge, a validated and normalized adapter directory",
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
    m.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    m.add_argument(
        "--checksum",
        default="crc32",
        choices=["crc32", "sha256"],
        help="per-shard checksum kept in the journal and report (crc32: fast; sha256: as sha256sum prints)",
    )
    m.add_argument(
        "--executor",
        default="inprocess",
        choices=["inprocess", "local", "ray"],
        help="inprocess (default): this process; local: --workers processes, one output shard each; "
        "ray: one Ray task per output shard (needs streammerge[ray]; --address for a cluster)",
    )
    m.add_argument("--workers", type=int, default=2, help="worker processes for --executor local (2)")
    m.add_argument("--address", help="Ray cluster address for --executor ray (default: start a local one)")
    m.add_argument(
        "--compress",
        metavar="zstd[:LEVEL]",
        help="write archival *.safetensors.zst shards (restore with 'streammerge decompress')",
    )
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
    m.add_argument("--allow-nonfinite", action="store_true", help="do not fail on NaN/Inf in adapter or output")
    _direct_io_arg(m)
    _common(m)

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
    b.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="output float dtype for every job")
    b.add_argument("--shard-size", type=_size_arg, help="max tensor bytes per output shard (5GB)")
    b.add_argument("--save-method", choices=["merged_16bit", "merged_4bit", "lora"], help="for every job")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--max-memory", default="128MiB", metavar="SIZE|FRACTION", help="work memory budget")
    b.add_argument("--resume", action="store_true", help="skip jobs whose output is already complete")
    b.add_argument("--compress", metavar="zstd[:LEVEL]", help="write archival *.safetensors.zst shards")
    b.add_argument(
        "--executor",
        default="inprocess",
        choices=["inprocess", "local", "ray"],
        help="inprocess: one shared pass; local/ray: each job's shards spread over workers",
    )
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--address", help="Ray cluster address")
    b.add_argument("--overwrite", action="store_true", help="replace non-empty job outputs")
    _direct_io_arg(b)
    _common(b)

    v = sub.add_parser(
        "verify",
        help="check a merged output: complete, checksums intact, and (given the inputs) recomputed equal",
        description="Check that OUT is complete (index <-> files <-> headers, sizes, the report's sha256 per "
        "shard) and, given --base and --adapter, that recomputed tensors equal the written ones bit for bit.",
    )
    v.add_argument("out", metavar="OUT")
    v.add_argument("--base", help="the base checkpoint the output was merged from")
    v.add_argument("--adapter", action="append", default=[], metavar="PATH[:WEIGHT]", help="adapter(s) merged")
    v.add_argument("--sample", type=int, metavar="N", help="recompute N tensors (default: all)")
    _common(v)

    d = sub.add_parser("decompress", help="restore a --compress output to plain safetensors, byte-identical")
    d.add_argument("src", metavar="SRC")
    d.add_argument("dst", metavar="DST")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    _common(d)

    i = sub.add_parser("inspect", help="describe a checkpoint or adapter directory")
    i.add_argument("path", metavar="PATH")
    _common(i)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="more detail on stderr")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _print_plan(report, out) -> None:
    w = out.write
    w(f"base:     {report.base}\n")
    for a in report.adapters:
        w(f"adapter:  {a['path']} (weight {a['weight']:g})\n")
    w(f"output:   {report.out}  dtype={report.options['dtype']} device={report.device}\n")
    w(
        f"modules:  {len(report.modules)} updates on {report.tensors_merged} tensors; "
        f"{report.tensors_copied} of {report.tensors_total} tensors copied unchanged\n"
    )
    for mrec in report.modules:
        detail = f"r={mrec['r']} alpha={mrec['alpha']:g} scaling={mrec['scaling']:.6g}" if mrec["r"] else ""
        w(f"  {mrec['kind']:<9} {mrec['tensor']}  <- {mrec['module']}  {detail}\n")
    w("shards:\n")
    for s in report.shards:
        w(f"  {s['file']}  {_fmt_bytes(s['bytes'])}  {s['tensors']} tensors\n")
    w(f"total:    {_fmt_bytes(report.total_size)} ({report.total_size} bytes)\n")
    if report.free_disk_bytes is not None:
        w(f"free:     {_fmt_bytes(report.free_disk_bytes)} at the output location\n")
    for n in report.notes:
        w(f"note:     {n}\n")


def _print_summary(report, out) -> None:
    secs = report.seconds.get("total", 0.0)
    rate = report.total_size / secs / 2**20 if secs else 0.0
    out.write(
        f"merged {report.tensors_merged} tensors ({len(report.modules)} module updates) into {report.out}: "
        f"{len(report.shards)} shard(s), {_fmt_bytes(report.total_size)} in {secs:.1f}s ({rate:.0f} MiB/s), "
        f"peak RSS {_fmt_bytes(report.peak_rss_bytes)}\n"
    )
    for n in report.notes:
        out.write(f"note: {n}\n")


def _inspect(path: str) -> dict:
    from .adapter import CONFIG_NAME, find_adapter_dir, load_adapter
    from .source import Reader, open_checkpoint

    p = Path(path)
    if (p / "config.json").is_file() and not (p / CONFIG_NAME).is_file():
        ck = open_checkpoint(p)
        dtypes: dict[str, int] = {}
        for t in ck.tensors.values():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
        cfg = ck.config
        return {
            "kind": "checkpoint",
            "path": str(p),
            "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"),
            "dtype": cfg.get("dtype", cfg.get("torch_dtype")),
            "tie_word_embeddings": cfg.get("tie_word_embeddings"),
            "vocab_size": cfg.get("vocab_size"),
            "quantization_config": cfg.get("quantization_config"),
            "shards": [Path(f).name for f in ck.shard_files],
            "tensors": len(ck.tensors),
            "total_bytes": ck.total_bytes,
            "bytes_by_dtype": dtypes,
            "tensor_list": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ck.tensors.values()],
        }
    adir = find_adapter_dir(p)
    reader = Reader()
    try:
        ad = load_adapter(adir, reader)
    finally:
        reader.close()
    c = ad.config
    return {
        "kind": "adapter",
        "path": ad.path,
        "weights_file": ad.weights_file,
        "base_model_name_or_path": c.get("base_model_name_or_path"),
        "r": c.get("r"),
        "lora_alpha": c.get("lora_alpha"),
        "use_rslora": c.get("use_rslora", False),
        "use_dora": c.get("use_dora", False),
        "target_modules": c.get("target_modules"),
        "modules_to_save": c.get("modules_to_save"),
        "lora_modules": len(ad.modules),
        "replacements": sorted(ad.replacements),
        "trainable_tokens": sorted(ad.tokens),
        "tensors": len(ad.tensors),
        "total_bytes": sum(t.nbytes for t in ad.tensors.values()),
        "modules": [
            {"module": m.module, "kind": m.kind, "r": m.r, "alpha": m.alpha, "scaling": m.scaling}
            for m in ad.modules.values()
        ],
    }


def _print_inspect(info: dict, out) -> None:
    skip = {"tensor_list", "modules"}
    for k, v in info.items():
        if k not in skip:
            out.write(f"{k}: {_fmt_bytes(v) if k.endswith('bytes') and isinstance(v, int) else v}\n")
    if info["kind"] == "checkpoint":
        for t in info["tensor_list"]:
            out.write(f"  {t['name']}  {t['dtype']}  {t['shape']}\n")
    else:
        for m in info["modules"]:
            out.write(f"  {m['kind']:<9} {m['module']}  r={m['r']} alpha={m['alpha']:g} scaling={m['scaling']:.6g}\n")


def _print_verify(vr, as_json: bool) -> None:
    if as_json:
        json.dump(vr.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    sys.stdout.write(
        f"{vr.out}: {'OK' if vr.ok else 'FAILED'}: {vr.files} shard(s), {vr.tensors} tensors, "
        f"{vr.checksums_checked} checksums, {vr.recomputed} tensors recomputed\n"
    )
    for p in vr.problems:
        sys.stdout.write(f"  - {p}\n")


def _batch(args, log) -> int:
    from .batch import batch, jobs_from_args, read_manifest, results_json, summary_table

    keys = ("dtype", "shard_size", "save_method", "compress")
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
        json.dump(results_json(results), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        sys.stdout.write(summary_table(results) + "\n")
    return EXIT_ERROR if any(r.status == "failed" for r in results) else EXIT_OK


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def entry() -> None:
    """The ``streammerge`` command: :func:`main`, then a quick exit. Tearing down the interpreter
    after torch was imported takes about 0.5 s; by the time ``main`` returns the output is fsynced
    and published, so the process flushes its streams and leaves without it (unless Ray is loaded:
    its exit hooks stop the processes it started)."""
    code = main()
    if "ray" in sys.modules:
        raise SystemExit(code)
    logging.shutdown()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None when the process was started with it closed
                stream.flush()
    except OSError:  # e.g. stdout was a pipe closed early
        code = code or EXIT_ERROR
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="streammerge: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    log = logging.getLogger("streammerge")
    if not args.verbose:  # bitsandbytes logs optional-kernel notices at WARNING on import
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)  # a polite kill stops like Ctrl-C: resumable, exit 130
    try:
        if args.command == "decompress":
            from .sink import decompress_dir

            files = decompress_dir(Path(args.src), Path(args.dst), args.overwrite)
            if not args.quiet:
                sys.stderr.write(f"decompressed {len(files)} shard(s) into {args.dst}\n")
            return EXIT_OK
        if args.command == "batch":
            return _batch(args, log)
        if args.command == "verify":
            from .verify import VerifyError, verify

            if bool(args.base) != bool(args.adapter):
                log.error("verify: --base and --adapter go together")
                return EXIT_USAGE
            vr = verify(args.out, args.base, args.adapter, args.sample)
            _print_verify(vr, args.json)
            if not vr.ok:
                raise VerifyError(f"{args.out}: verification failed", details=vr.problems)
            return EXIT_OK
        if args.command == "inspect":
            info = _inspect(args.path)
            if args.json:
                json.dump(info, sys.stdout, indent=2)
                sys.stdout.write("\n")
            else:
                _print_inspect(info, sys.stdout)
            return EXIT_OK
        from .run import merge

        progress = not args.no_progress and not args.quiet and sys.stderr.isatty()
        report = merge(
            args.base,
            args.adapter,
            args.out,
            adapters=args.extra_adapters,
            dtype=args.dtype,
            shard_size=args.shard_size,
            device=args.device,
            save_method=args.save_method,
            dry_run=args.dry_run,
            overwrite=args.overwrite,
            allow_nonfinite=args.allow_nonfinite,
            resume=args.resume,
            compress=args.compress,
            checksum=args.checksum,
            direct_io=args.direct_io,
            executor=args.executor,
            workers=args.workers,
            address=args.address,
            progress=progress,
            max_memory=args.max_memory,
            quant_type=args.quant_type,
            blocksize=args.blocksize,
            double_quant=args.double_quant,
        )
        for w in report.warnings:
            log.warning(w)
        if args.verify and not args.dry_run:
            from .verify import VerifyError, verify

            vr = verify(args.out, args.base, [args.adapter, *args.extra_adapters], args.verify_sample)
            if not vr.ok:
                raise VerifyError(f"{args.out}: verification failed", details=vr.problems)
            log.info(
                "verified: %d shard checksums, %d tensors recomputed bit for bit", vr.checksums_checked, vr.recomputed
            )
        if args.json:
            json.dump(report.to_dict(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif args.dry_run:
            _print_plan(report, sys.stdout)
        elif not args.quiet:
            _print_summary(report, sys.stderr)
        return EXIT_OK
    except StreamMergeError as e:
        log.error(str(e))
        return e.exit_code
    except ValueError as e:
        log.error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        log.error("interrupted: nothing was published at the output; rerun with --resume to continue a merge")
        return EXIT_INTERRUPTED
