"""Benchmark: streammerge vs PEFT's in-memory merge vs a plain copy of the base (the disk's floor).

Each tool runs in its own subprocess on the same checkpoint with the page cache prepared the same
way: warm (the base files are read once before each run) or, with ``--cache cold``, evicted (as when
the base is larger than RAM). With ``--repeat N`` the tools take turns, N rounds, so that drift in
the disk's speed hits all of them alike; the median is reported. Reported per tool: wall time, peak
RSS (the kernel's VmHWM) and peak anonymous memory (RssAnon, sampled every 20 ms), the ratios between
tools, and the fixed start-up (python + imports) measured on its own. Not a test: run it with
``make bench`` or directly.

    python scripts/bench.py                       # the 1.7 GB Llama-shaped model of issue #2
    python scripts/bench.py --sizes small,default,large --skip-peft --plot docs/bench.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from streammerge.options import parse_size

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench"
PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab, shards)
    "small": (1024, 2816, 16, 16, 4, 32000, 2),
    "default": (2048, 5632, 16, 16, 4, 32000, 4),
    "large": (4096, 11008, 18, 32, 8, 32000, 8),
    "5.4gb": (4096, 11008, 14, 32, 8, 32000, 6),  # issue 16's model: hidden 4096, intermediate 11008, 14 layers
    "70b-slice": (8192, 28672, 2, 64, 8, 128256, 4),
    # the same slice stored FP8 e4m3 in blocks of 128 (as DeepSeek / Qwen FP8 checkpoints), merged to bf16
    "70b-fp8-slice": (8192, 28672, 2, 64, 8, 128256, 4),
}
PEFT_SNIPPET = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


@dataclass
class Result:
    tool: str
    size: str
    model_bytes: int
    wall_s: float
    peak_rss: int
    peak_anon: int


def build(preset: str) -> tuple[Path, Path]:
    """Build (once) the preset's checkpoint and r=16 adapter under .bench/<preset>/."""
    from streammerge.synthetic import write_synthetic_llama

    root = CACHE / preset
    if (root / ".complete").exists():
        return root / "base", root / "adapter"
    shutil.rmtree(root, ignore_errors=True)
    hidden, inter, layers, heads, kv, vocab, shards = PRESETS[preset]
    t = time.perf_counter()
    print(f"building {preset} model under {root} ...", file=sys.stderr, flush=True)
    fp8 = "fp8" in preset
    base, ad = write_synthetic_llama(root, hidden, inter, layers, vocab, kv, heads, shards=shards, r=16, fp8=fp8)
    with_tokenizer(base)
    (root / ".complete").write_text("ok")
    print(f"  built in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    return base, ad


def with_tokenizer(base: Path) -> None:
    """A SentencePiece tokenizer beside the weights (for --gguf), trained on the spot (tests' fixture)."""
    if (base / "tokenizer.model").exists():
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from gguf_fixtures import spm_tokenizer

    spm_tokenizer(base)


def model_bytes(base: Path) -> int:
    return sum(p.stat().st_size for p in base.glob("*.safetensors"))


def warm(base: Path) -> None:
    """Read the base once so every tool starts from the same (warm) page cache."""
    for p in sorted(base.iterdir()):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "RssAnon"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """Wall time, peak RSS (VmHWM) and peak sampled RssAnon of one subprocess (its stdout is dropped)."""
    peak = {"VmHWM": 0, "RssAnon": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status(proc.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, peak["VmHWM"], peak["RssAnon"]


def startup_seconds(repeat: int = 3) -> float:
    """The fixed cost of a streammerge run: starting python and importing the package (and torch);
    like the CLI, it skips the interpreter's teardown."""
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import os, torch, streammerge.api; os._exit(0)"], check=True)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def bench_tool(
    tool: str, base: Path, ad: Path, out: Path, extra: list[str], prlimit: str | None = None, cache: str = "warm"
) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)  # the previous run's deletions and writes settle first
    warm(base)
    if cache == "cold":
        evict(base)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if tool.startswith("gguf-"):
        extra = [*extra, "--save-method", "gguf", "--gguf-type", tool[len("gguf-") :]]
        tool = "streammerge"
    if tool == "streammerge":
        cmd = [
            *(["prlimit", f"--data={parse_size(prlimit)}"] if prlimit else []),
            sys.executable,
            "-m",
            "streammerge",
            "merge",
            str(base),
            str(ad),
            str(out),
            "--no-progress",
            "-q",
            *extra,
        ]
        res = run_measured(cmd, env)
    elif tool == "peft":
        res = run_measured([sys.executable, "-c", PEFT_SNIPPET, str(base), str(ad), str(out)], env)
    elif tool == "dd-direct":  # the same files copied past the page cache, as streammerge writes
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        rss = anon = 0
        for p in sorted(base.iterdir()):
            _, r, a = run_measured(["dd", f"if={p}", f"of={out / p.name}", "bs=16M", "oflag=direct", "status=none"])
            rss, anon = max(rss, r), max(anon, a)
        subprocess.run(["sync"], check=True)
        res = (time.perf_counter() - t0, rss, anon)
    else:  # cp + sync: the disk's floor through the page cache
        out.mkdir(parents=True)
        files = [str(p) for p in sorted(base.iterdir())]
        t0 = time.perf_counter()
        _, rss, anon = run_measured(["cp", *files, str(out)])
        subprocess.run(["sync"], check=True)
        res = (time.perf_counter() - t0, rss, anon)
    shutil.rmtree(out, ignore_errors=True)
    return res


def projection_70b(r: Result, startup: float) -> str:
    """Full Llama-3-70B (80 layers) time from the 2-layer slice: the pipeline's cost is linear in bytes
    (see the size sweep), so scale the slice's merge time (less the measured start-up) by the bytes of
    the stored base (FP8 slices: the FP8 70B)."""
    hidden, inter, _, heads, kv, vocab, _ = PRESETS[r.size]
    head_dim = hidden // heads
    per = 1 if "fp8" in r.size else 2  # bytes per stored projection weight (FP8 slices: e4m3)
    proj = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    layer = per * proj + 2 * 2 * hidden
    full = 80 * layer + 2 * 2 * vocab * hidden + 2 * hidden
    scale = full / r.model_bytes
    est = startup + (r.wall_s - startup) * scale
    return (
        f"70B projection: slice {r.model_bytes / 1e9:.1f} GB in {r.wall_s:.1f} s -> full model {full / 1e9:.0f} GB "
        f"in about {est / 60:.1f} min ({scale:.1f}x the bytes; {startup:.1f} s start-up counted once), "
        f"peak anon {fmt_gib(r.peak_anon)} GiB"
    )


def evict(base: Path) -> None:
    """Drop the base from the page cache (as if it were far larger than RAM)."""
    for p in base.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)  # dirty pages cannot be evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def bench_batch(size: str, n: int, out_dir: Path) -> str:
    """``streammerge batch`` of n adapters vs n separate ``streammerge merge`` runs, with the base
    evicted from the page cache before each run (cold) and with it cached (warm)."""
    from safetensors.torch import load_file, save_file

    base, ad = build(size)
    sd = load_file(ad / "adapter_model.safetensors")
    ads = []
    for k in range(n):
        d = CACHE / size / f"adapter-{k}"
        if not d.exists():
            d.mkdir()
            shutil.copy(ad / "adapter_config.json", d)
            save_file({name: t * (1 + 0.1 * k) for name, t in sd.items()}, d / "adapter_model.safetensors")
        ads.append(str(d))
    sm = [sys.executable, "-m", "streammerge"]
    rows = []
    for cache in ("cold", "warm"):
        shutil.rmtree(out_dir, ignore_errors=True)
        warm(base)
        if cache == "cold":
            evict(base)
        t = time.perf_counter()
        subprocess.run([*sm, "batch", str(base), str(out_dir / "batch"), *ads, "-q"], check=True)
        one = time.perf_counter() - t
        shutil.rmtree(out_dir, ignore_errors=True)
        t = time.perf_counter()
        for k, a in enumerate(ads):
            if cache == "cold":
                evict(base)
            subprocess.run([*sm, "merge", str(base), a, str(out_dir / f"sep{k}"), "-q", "--no-progress"], check=True)
        sep = time.perf_counter() - t
        shutil.rmtree(out_dir, ignore_errors=True)
        rows.append(f"| {cache} | {one:.2f} | {sep:.2f} | {sep / one:.2f}x |")
    return "\n".join(
        [
            f"batch of {n} adapters on {size} ({model_bytes(base) / 1e9:.2f} GB):",
            "| page cache | one-pass batch s | separate runs s | speed-up |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )


def fmt_gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(results: list[Result]) -> str:
    lines = [
        "| model | tool | wall s | peak RSS GiB | peak anon GiB | wall / cp+sync | wall / dd-direct | wall / PEFT |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size in dict.fromkeys(r.size for r in results):
        rows = [r for r in results if r.size == size]
        ref = {t: next((r for r in rows if r.tool == t), None) for t in ("cp+sync", "dd-direct", "peft")}
        for r in rows:
            ratios = " | ".join(f"{r.wall_s / x.wall_s:.2f}x" if x else "-" for x in ref.values())
            lines.append(
                f"| {size} ({r.model_bytes / 1e9:.2f} GB) | {r.tool} | {r.wall_s:.2f} | {fmt_gib(r.peak_rss)} | "
                f"{fmt_gib(r.peak_anon)} | {ratios} |"
            )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r.size for r in results))
    tools = list(dict.fromkeys(r.tool for r in results))
    big = sizes[-1]
    ncols = 3 if len(sizes) > 1 else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    rows = [r for r in results if r.size == big]
    axes[0].bar([r.tool for r in rows], [r.wall_s for r in rows], color=["C0", "C1", "C2", "C3"][: len(rows)])
    axes[0].set_title(f"wall time, {big} model ({rows[0].model_bytes / 1e9:.1f} GB)")
    axes[0].set_ylabel("seconds")
    axes[1].bar([r.tool for r in rows], [r.peak_anon / 2**30 for r in rows], label="peak anon")
    axes[1].bar([r.tool for r in rows], [r.peak_rss / 2**30 for r in rows], alpha=0.3, label="peak RSS")
    axes[1].set_title("peak memory")
    axes[1].set_ylabel("GiB")
    axes[1].legend()
    if ncols == 3:
        for tool in tools:
            pts = sorted((r.model_bytes / 1e9, r.wall_s) for r in results if r.tool == tool)
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=tool)
        axes[2].set_title("wall time vs model size")
        axes[2].set_xlabel("model GB")
        axes[2].set_ylabel("seconds")
        axes[2].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="default", help=f"comma-separated presets: {', '.join(PRESETS)}")
    p.add_argument("--repeat", type=int, default=1, help="rounds (the tools take turns); the median is reported")
    p.add_argument("--cache", choices=["warm", "cold"], default="warm", help="base in the page cache or evicted")
    p.add_argument("--skip-peft", action="store_true", help="skip PEFT's in-memory merge (slow, needs RAM)")
    p.add_argument("--peft-sizes", default="", help="presets on which to run PEFT (default: all benched)")
    p.add_argument("--json", type=Path, help="write all numbers to this JSON file")
    p.add_argument("--plot", type=Path, help="draw the comparison to this PNG")
    p.add_argument("--out-dir", type=Path, default=CACHE / "out", help="where outputs are written (and removed)")
    p.add_argument("--batch", type=int, default=0, metavar="N", help="also bench a batch of N adapters")
    p.add_argument("--prlimit", help="run streammerge under prlimit --data=SIZE (e.g. 1GiB) to prove the bound")
    p.add_argument("--gguf", default="", metavar="TYPES", help="also bench --save-method gguf, e.g. f16,q8_0")
    p.add_argument("streammerge_args", nargs="*", help="extra arguments for streammerge merge (after --)")
    args = p.parse_args()
    results: list[Result] = []
    peft_sizes = set(args.peft_sizes.split(",")) if args.peft_sizes else None
    for size in args.sizes.split(","):
        base, ad = build(size)
        tools = ["cp+sync", "dd-direct", "streammerge"]
        with_tokenizer(base)
        tools += [f"gguf-{t}" for t in args.gguf.split(",") if t]
        if not args.skip_peft and (peft_sizes is None or size in peft_sizes):
            tools.append("peft")
        runs: dict[str, list] = {tool: [] for tool in tools}
        for _ in range(args.repeat):
            for tool in list(tools):
                try:
                    res = bench_tool(
                        tool, base, ad, args.out_dir / tool, args.streammerge_args, args.prlimit, args.cache
                    )
                except RuntimeError as e:
                    if tool != "dd-direct":
                        raise
                    print(f"  dd-direct skipped (no O_DIRECT here?): {e}", file=sys.stderr, flush=True)
                    tools.remove(tool)
                    del runs[tool]
                    shutil.rmtree(args.out_dir / tool, ignore_errors=True)
                    continue
                runs[tool].append(res)
                print(f"  {size} {tool}: {res[0]:.2f}s", file=sys.stderr, flush=True)
        for tool, rs in runs.items():
            wall = statistics.median(r[0] for r in rs)
            results.append(Result(tool, size, model_bytes(base), wall, max(r[1] for r in rs), max(r[2] for r in rs)))
    import torch

    startup = startup_seconds()

    print(
        f"machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}; "
        f"{args.cache} page cache; median of {args.repeat}; start-up (python + import) {startup:.2f} s"
    )
    print(table(results))
    for size in dict.fromkeys(r.size for r in results):
        by = {r.tool: r for r in results if r.size == size}
        sm = by["streammerge"]
        line = f"{size}: streammerge / cp+sync = {sm.wall_s / by['cp+sync'].wall_s:.2f}x"
        if "dd-direct" in by:
            line += f", / dd-direct = {sm.wall_s / by['dd-direct'].wall_s:.2f}x"
        for tool in by:
            if tool.startswith("gguf-"):
                line += f"; {tool} / streammerge = {by[tool].wall_s / sm.wall_s:.2f}x"
        if "peft" in by:
            line += (
                f"; PEFT / streammerge = {by['peft'].wall_s / sm.wall_s:.1f}x faster; "
                f"peak anon {fmt_gib(sm.peak_anon)} vs {fmt_gib(by['peft'].peak_anon)} GiB"
            )
        print(line)
    for r in results:
        if r.size in ("70b-slice", "70b-fp8-slice") and r.tool == "streammerge":
            print(projection_70b(r, startup))
    if args.batch:
        print(bench_batch(args.sizes.split(",")[0], args.batch, args.out_dir / "batch"))
    if args.json:
        doc = {"cache": args.cache, "repeat": args.repeat, "startup_s": round(startup, 3)}
        args.json.write_text(json.dumps({**doc, "results": [asdict(r) for r in results]}, indent=2))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
