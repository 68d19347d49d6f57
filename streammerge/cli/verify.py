"""``streammerge verify OUT [--base BASE --adapter ADAPTER]``."""

from __future__ import annotations

import sys

from .common import EXIT_OK, EXIT_USAGE, common_args, print_json


def add_parser(sub) -> None:
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
    common_args(v)


def run(args, log) -> int:
    from ..errors import VerifyError
    from ..verify import verify

    if bool(args.base) != bool(args.adapter):
        log.error("verify: --base and --adapter go together")
        return EXIT_USAGE
    vr = verify(args.out, args.base, args.adapter, args.sample)
    if args.json:
        print_json(vr.to_dict())
    else:
        sys.stdout.write(
            f"{vr.out}: {'OK' if vr.ok else 'FAILED'}: {vr.files} shard(s), {vr.tensors} tensors, "
            f"{vr.checksums_checked} checksums, {vr.recomputed} tensors recomputed\n"
        )
        for p in vr.problems:
            sys.stdout.write(f"  - {p}\n")
    if not vr.ok:
        raise VerifyError(f"{args.out}: verification failed", details=vr.problems)
    return EXIT_OK
