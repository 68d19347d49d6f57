"""``make demo``: build a small Llama-shaped base and LoRA adapter, merge them, print the report.

Uses the runtime dependencies only (no transformers, no PEFT). Everything goes under ``.demo/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from streammerge.cli import main as cli_main
from streammerge.synthetic import write_synthetic_llama


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", default=".demo", help="working directory (recreated)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    print(f"building a Llama-shaped bf16 base and an r=16 adapter under {root}/ ...", flush=True)
    base, adapter = write_synthetic_llama(
        root, hidden=args.hidden, inter=args.hidden * 11 // 4, layers=args.layers, vocab=8000, kv_heads=2, heads=8
    )
    out = root / "merged"
    print(f"\n$ streammerge merge {base} {adapter} {out} --shard-size 20MB --dry-run", flush=True)
    rc = cli_main(["merge", str(base), str(adapter), str(out), "--shard-size", "20MB", "--dry-run"])
    if rc:
        return rc
    print(f"\n$ streammerge merge {base} {adapter} {out} --shard-size 20MB", flush=True)
    rc = cli_main(["merge", str(base), str(adapter), str(out), "--shard-size", "20MB"])
    if rc:
        return rc
    report = json.loads((out / "streammerge_report.json").read_text())
    print(f"\nwrote {out}/:")
    for p in sorted(out.iterdir()):
        print(f"  {p.name:40s} {p.stat().st_size:>12,d} bytes")
    print("\nreport (streammerge_report.json), abridged:")
    brief = {k: report[k] for k in ("version", "device", "total_size", "tensors_merged", "tensors_copied", "seconds")}
    brief["peak_rss_MiB"] = round(report["peak_rss_bytes"] / 2**20, 1)
    brief["modules"] = f"{len(report['modules'])} LoRA module updates, e.g. {report['modules'][0]}"
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
