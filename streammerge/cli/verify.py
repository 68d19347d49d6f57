"""``streammerge verify OUT [--base BASE --adapter ADAPTER]``."""

from __future__ import annotations

import sys

from ..outputs import OUTPUTS
from .common import EXIT_OK, EXIT_USAGE, common_args, print_json


def add_parser(sub) -> None:
    v = sub.add_parser(
        "verify",
        help="check an output: complete, checksums intact, and (given the inputs) recomputed equal",
        description="Check that OUT is a complete output of the kind its streammerge_report.json records "
        "(options.save_method; without a report, the kind its files show): merged_16bit, merged_4bit, "
        "merged_fp8 or mxfp4 shards (plain or zstd: index <-> files <-> headers, sizes, the report's checksum "
        "per shard, the format's quantization_config and companion tensors); a lora adapter folder; a gguf "
        "file (read back by gguf-py, size, checksum, the Modelfile's FROM). Given --base and --adapter: "
        "recomputed tensors equal the written ones bit for bit (lora: the input adapter's tensors; gguf: read "
        "back only).",
    )
    v.add_argument("out", metavar="OUT")
    v.add_argument("--base", help="the base checkpoint the output was merged from")
    v.add_argument("--adapter", action="append", default=[], metavar="PATH[:WEIGHT]", help="adapter(s) merged")
    v.add_argument("--sample", type=int, metavar="N", help="recompute N tensors (default: all)")
    common_args(v)


def summary(vr) -> str:
    """The first line ``verify`` prints: OUT, OK or FAILED, the kind checked, and what was checked."""
    status = "OK" if vr.ok else "FAILED"
    if vr.kind in ("", "unknown"):
        return f"{vr.out}: {status}: no output kind streammerge writes could be told"
    kind = vr.kind + (" (zstd)" if vr.compressed else "")
    source = " (from the files present)" if vr.kind_from == "files" else ""
    adapter = vr.kind in OUTPUTS and not OUTPUTS[vr.kind].merges
    compared = "tensors compared with the input adapter" if adapter else "tensors recomputed"
    return (
        f"{vr.out}: {status}: {kind} output{source}: {vr.files} file(s), {vr.tensors} tensors, "
        f"{vr.checksums_checked} checksum(s), {vr.recomputed} {compared}"
    )


def run(args, log) -> int:
    from ..errors import VerifyError
    from ..verify import verify_output

    if bool(args.base) != bool(args.adapter):
        log.error("verify: --base and --adapter go together")
        return EXIT_USAGE
    vr = verify_output(args.out, args.base, args.adapter, args.sample)
    if args.json:
        print_json(vr.to_dict())
    else:
        sys.stdout.write(summary(vr) + "\n")
        for p in vr.problems:
            sys.stdout.write(f"  - {p}\n")
        for n in vr.notes:
            sys.stdout.write(f"  note: {n}\n")
    if not vr.ok:
        raise VerifyError(f"{args.out}: verification failed ({vr.kind or 'unknown'} output)", details=vr.problems)
    return EXIT_OK
