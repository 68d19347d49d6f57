"""One prepared check of the CUDA path, for a GPU machine when one is lent (about a minute).

    python scripts/gpu_check.py            # needs torch with CUDA; prints one table

1. The parity suites (core, adapters, quantized, executor) with ``--device auto`` picking CUDA,
   allowing 1 ulp (CUDA's matmul may round the last bit differently from the CPU's).
2. CPU vs CUDA on a synthetic Llama-shaped model: max ulp distance per tensor and both wall times.
3. The CUDA out-of-memory fallback: a merge with a budget far above the device's free memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def run_suites() -> tuple[str, str]:
    env = dict(os.environ, STREAMMERGE_MAX_ULP="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_parity_core.py",
        "tests/test_parity_adapters.py",
        "tests/test_quant.py",
        "tests/test_executor.py",
        "tests/test_moe.py",  # fused experts in expert blocks on the device
        "tests/test_fp8.py",  # FP8 decoding and merged_fp8 re-quantization on the device
        "tests/test_mxfp4.py",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    return ("ok" if proc.returncode == 0 else "FAILED"), last


def cpu_vs_cuda(root: Path) -> list[tuple[str, str]]:
    from helpers import read_dir, ulp_distance

    import streammerge
    from streammerge.synthetic import write_synthetic_llama

    base, ad = write_synthetic_llama(root, hidden=2048, inter=5632, layers=4, vocab=32000, kv_heads=4, heads=16)
    rows = []
    outs = {}
    for dev in ("cpu", "cuda"):
        t = time.perf_counter()
        rep = streammerge.merge(base, ad, root / dev, device=dev)
        rows.append((f"merge on {dev}", f"{time.perf_counter() - t:.2f} s, stages {rep.seconds}"))
        outs[dev] = read_dir(root / dev)
    worst = max(ulp_distance(outs["cpu"][k], outs["cuda"][k]) for k in outs["cpu"])
    rows.append(("CPU vs CUDA max ulp", str(worst)))
    free = torch.cuda.mem_get_info()[0]
    rep = streammerge.merge(base, ad, root / "big", device="cuda", max_memory=str(4 * free))
    same = all(
        torch.equal(outs["cuda"][k], v) or ulp_distance(outs["cpu"][k], v) <= 1
        for k, v in read_dir(root / "big").items()
    )
    rows.append(("huge budget (OOM fallback) output ok", f"{same}; notes: {len(rep.notes)}"))
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    rows = [("device", torch.cuda.get_device_name(0)), ("torch", torch.__version__)]
    status, line = run_suites()
    rows.append((f"parity suites on CUDA ({status})", line))
    with tempfile.TemporaryDirectory() as d:
        rows += cpu_vs_cuda(Path(d))
    width = max(len(k) for k, _ in rows)
    print("| check | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
