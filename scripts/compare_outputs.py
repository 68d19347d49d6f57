"""Before/after check for refactors: the same merges run by two versions of streammerge must write
byte-identical files.

Builds the fixtures once (tiny transformers models with PEFT adapters covering every adapter feature
and stored format, and the synthetic bench model), runs every case with the code of git revision
``--against`` (checked out in a temporary worktree) and with the working tree, and compares the
sha256 of every output file (the report, which holds timings and paths, is compared without them).
Each case's wall time (in-process, same fixtures, warm page cache) is printed for both versions.

    python scripts/compare_outputs.py --against HEAD~3            # exit 1 on any difference
    python scripts/compare_outputs.py --against main --bench none  # tiny fixtures only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = r"""
import hashlib, json, sys, time
from pathlib import Path
import streammerge
cases, root = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
VOLATILE = {"seconds", "peak_rss_bytes", "peak_anon_bytes", "bytes_read", "free_disk_bytes", "work_buffer_bytes",
            "out", "version", "device"}
result = {"module": streammerge.__file__}
for c in cases:
    out = root / c["name"]
    t = time.perf_counter()
    try:
        streammerge.merge(c["base"], c["adapters"], out, **c["kwargs"])
        result.setdefault("seconds", {})[c["name"]] = time.perf_counter() - t
    except streammerge.StreamMergeError as e:
        result[c["name"]] = {"error": str(e).splitlines()[0]}
        continue
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            if p.name == "streammerge_report.json":
                rep = {k: v for k, v in json.loads(p.read_text()).items() if k not in VOLATILE}
                files[p.name] = hashlib.sha256(json.dumps(rep, sort_keys=True).encode()).hexdigest()
            else:
                files[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    result[c["name"]] = files
print(json.dumps(result))
"""


def build_fixtures(root: Path, bench: str) -> list[dict]:
    """Write the fixtures under ``root`` and return the cases (name, base, adapters, merge kwargs)."""
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import build_adapter, build_model, save_base

    cases: list[dict] = []

    def case(name: str, base: Path, adapters: list, **kw) -> None:
        cases.append({"name": name, "base": str(base), "adapters": [str(a) for a in adapters], "kwargs": kw})

    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    allp = [*attn, "gate_proj", "up_proj", "down_proj"]
    m = build_model("llama", torch.bfloat16, intermediate_size=96)
    b = save_base(m, root / "llama", shard="150KB")
    case("llama_sharded", b, [build_adapter(m, root / "llama_ad", r=4, lora_alpha=8, target_modules=allp)])
    case("llama_out_shards", b, [root / "llama_ad"], shard_size="100KB", dtype="fp32")
    case(
        "llama_two_weighted",
        b,
        [f"{root / 'llama_ad'}:0.7", f"{build_adapter(m, root / 'l2', seed=5, r=2, target_modules=attn)}:0.3"],
    )
    case("llama_dora", b, [build_adapter(m, root / "dora", r=4, use_dora=True, target_modules=allp)])
    emb = build_adapter(m, root / "emb", r=4, target_modules=["embed_tokens", "lm_head", "q_proj"])
    case("llama_embed_lora", b, [emb])
    mts = build_adapter(m, root / "mts", r=4, target_modules=attn, modules_to_save=["lm_head"])
    case("llama_modules_to_save", b, [mts])
    tok = build_adapter(m, root / "tok", r=4, target_modules=attn, trainable_token_indices=[3, 7, 100])
    case("llama_tokens", b, [tok])
    case("llama_lora_method", b, [root / "llama_ad"], save_method="lora")
    case("llama_merged_4bit", b, [root / "llama_ad"], save_method="merged_4bit")
    case("llama_zstd", b, [root / "llama_ad"], compress="zstd")

    q = build_model("qwen2", torch.float16)
    qb = save_base(q, root / "qwen2")
    qa = build_adapter(q, root / "qwen2_ad", r=4, lora_alpha=16, use_rslora=True, lora_bias=True,
                       target_modules=["q_proj", "k_proj", "v_proj"], rank_pattern={"v_proj": 2},
                       alpha_pattern={"q_proj": 3.5})  # fmt: skip
    case("qwen2_bias_rslora_patterns", qb, [qa])
    g = build_model("gpt2", torch.float32)
    case(
        "gpt2_conv1d",
        save_base(g, root / "gpt2"),
        [build_adapter(g, root / "gpt2_ad", r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)],
    )
    ge = build_model("gemma", torch.bfloat16)
    gb = save_base(ge, root / "gemma")
    case("gemma_tied_embed", gb, [build_adapter(ge, root / "gemma_ad", r=4, target_modules=["embed_tokens", "q_proj"])])

    bnb = tf.BitsAndBytesConfig
    quantized = (
        ("nf4", bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16), torch.bfloat16),
        ("fp4", bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float16),
         torch.float16),
        ("int8", bnb(load_in_8bit=True), torch.float16),
    )  # fmt: skip
    for name, qc, dt in quantized:
        qm = tf.AutoModelForCausalLM.from_pretrained(b, quantization_config=qc, dtype=dt)
        qm.save_pretrained(root / name)
        case(f"{name}_merged_16bit", root / name, [root / "llama_ad"])
        if name != "int8":
            case(f"{name}_merged_4bit", root / name, [root / "llama_ad"], save_method="merged_4bit")

    if bench != "none":
        from streammerge.synthetic import write_synthetic_llama

        sys.path.insert(0, str(ROOT / "scripts"))
        from bench import PRESETS

        hidden, inter, layers, heads, kv, vocab, shards = PRESETS[bench]
        bb, ba = write_synthetic_llama(root / "bench", hidden, inter, layers, vocab, kv, heads, shards=shards, r=16)
        for method in ("merged_16bit", "merged_4bit", "lora"):
            case(f"bench_{method}", bb, [ba], save_method=method)
    return cases


def run_version(tree: Path, cases_file: Path, out_root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cp = subprocess.run(
        [sys.executable, "-c", RUNNER, str(cases_file), str(out_root)],
        env=env,
        capture_output=True,
        text=True,
        cwd=out_root,
    )
    if cp.returncode:
        sys.stderr.write(cp.stderr)
        raise SystemExit(f"the run of {tree} failed")
    return json.loads(cp.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision whose outputs are the reference")
    ap.add_argument("--bench", default="default", help="bench preset to include (small, default, none)")
    ap.add_argument("--keep", type=Path, help="keep the fixtures and outputs in this directory")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="sm-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    fixtures = work / "fixtures"
    fixtures.mkdir(exist_ok=True)
    cases = build_fixtures(fixtures, args.bench)
    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps(cases))
    ref_tree = work / "ref-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref_tree), args.against], check=True)
    try:
        results = {}
        for label, tree in (("reference", ref_tree), ("current", ROOT)):
            out = work / label
            out.mkdir(exist_ok=True)
            results[label] = run_version(tree, cases_file, out)
            print(f"{label}: {results[label].pop('module')}", file=sys.stderr)
            results[label + "_seconds"] = results[label].pop("seconds", {})
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_tree)], check=False)
    bad = 0
    for c in cases:
        ref, cur = results["reference"][c["name"]], results["current"][c["name"]]
        same = ref == cur
        bad += not same
        files = len(cur) if "error" not in cur else 0
        t_ref = results["reference_seconds"].get(c["name"], 0.0)
        t_cur = results["current_seconds"].get(c["name"], 0.0)
        timing = f"{t_ref:7.2f} s -> {t_cur:7.2f} s ({t_cur / t_ref:.2f}x)" if t_ref else ""
        print(f"{'same' if same else 'DIFFERENT':<9} {c['name']:<28} {files:>2} files  {timing}")
        if not same:
            for k in sorted(set(ref) | set(cur)):
                if ref.get(k) != cur.get(k):
                    print(f"    {k}: {ref.get(k)} != {cur.get(k)}")
    digest = hashlib.sha256(json.dumps(results["current"], sort_keys=True).encode()).hexdigest()[:16]
    print(f"{len(cases) - bad} of {len(cases)} cases byte-identical (outputs digest {digest})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
