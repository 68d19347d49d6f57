"""Byte-for-byte check of ``--save-method gguf`` against llama.cpp's own converter, and a run in llama.cpp.

For each case (architecture x tokenizer x GGUF type): a tiny base saved by transformers with a real
tokenizer, a PEFT adapter, then (1) streammerge --save-method gguf, (2) streammerge merged_16bit followed
by ``convert_hf_to_gguf.py --outtype TYPE`` from the llama.cpp tree given, (3) a byte comparison (on a
difference: which key or tensor). With ``--run`` each file is also loaded by llama.cpp
(llama-cpp-python) and its logits compared with transformers' on the merged_16bit output.

The BPE cases use the real Llama-3 and Qwen2 vocabularies shipped in llama.cpp's ``models/`` folder
(rebuilt as tokenizer.json by transformers), since the converter only accepts BPE tokenizers whose
pre-tokenizer hash it knows. ``make test-gguf`` fetches llama.cpp (the llama-cpp-python sdist) and runs
this script.

    python scripts/gguf_parity.py --llama-cpp vendor/llama.cpp [--run] [--keep DIR] [--case NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# name: (arch, tokenizer, gguf type)
CASES = {
    "llama-spm-f16": ("llama", "spm", "f16"),
    "llama-spm-bf16": ("llama", "spm", "bf16"),
    "llama-spm-q8_0": ("llama", "spm", "q8_0"),
    "llama-spm-f32": ("llama", "spm", "f32"),
    "llama-spm-auto": ("llama", "spm", "auto"),
    "llama3-bpe-bf16": ("llama", "llama-bpe", "bf16"),
    "llama3-bpe-q8_0": ("llama", "llama-bpe", "q8_0"),
    "mistral-spm-bf16": ("mistral", "spm", "bf16"),
    "qwen2-bpe-f16": ("qwen2", "qwen2", "f16"),
    "qwen2-bpe-q8_0": ("qwen2", "qwen2", "q8_0"),
    "qwen3-bpe-bf16": ("qwen3", "qwen2", "bf16"),
    "gemma-spm-f16": ("gemma", "spm", "f16"),
    "gemma2-spm-bf16": ("gemma2", "spm", "bf16"),
    "gemma3-spm-q8_0": ("gemma3", "spm", "q8_0"),
    "gemma3-spm-bf16": ("gemma3", "spm", "bf16"),
    "phi3-spm-f16": ("phi3", "spm", "f16"),
    "phi3-spm-q8_0": ("phi3", "spm", "q8_0"),
    "qwen2-bpe-q4_k_m": ("qwen2", "qwen2", "q4_k_m"),  # needs llama-cpp-python: its quantizer on both sides
}


# llama.cpp vs transformers, max |logit difference| allowed per type (llama.cpp multiplies bf16 weights with
# bf16-rounded activations; kernels and accumulation order differ)
LOGIT_TOL = {"f32": 2e-3, "f16": 5e-3, "bf16": 5e-2, "auto": 5e-2, "q8_0": 1e-1, "q4_k_m": 1.0}


def real_bpe(d: Path, llama_cpp: Path, name: str) -> int:
    """A tokenizer.json rebuilt by transformers from llama.cpp's ``ggml-vocab-NAME.gguf``; returns its size."""
    from gguf_fixtures import CHATML
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_cpp / "models"), gguf_file=f"ggml-vocab-{name}.gguf")
    tok.chat_template = CHATML
    d.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(d))
    return len(tok)


def build_case(tmp: Path, arch: str, tokenizer: str, llama_cpp: Path) -> tuple[Path, Path]:
    import torch
    from gguf_fixtures import gguf_pair

    if tokenizer in ("spm", "bpe"):
        return gguf_pair(tmp, arch, tokenizer)
    n = real_bpe(tmp / "tok", llama_cpp, tokenizer)
    base, adapter = gguf_pair(tmp, arch, None, dtype=torch.bfloat16, vocab=n)
    for f in (tmp / "tok").iterdir():
        f.rename(base / f.name)
    return base, adapter


def convert(llama_cpp: Path, model: Path, outtype: str, dst: Path) -> Path:
    """The converter's file; for a k-quant, its auto file quantized by llama.cpp (llama-quantize's path)."""
    from streammerge.options import KQUANTS
    from streammerge.sinks.gguf import quantize

    dst.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    kq = outtype in KQUANTS
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model), "--outtype", "auto" if kq else outtype]
    subprocess.run([*cmd, "--outfile", str(dst)], env=env, check=True, capture_output=True)
    (f,) = dst.glob("*.gguf")
    if kq:
        q = f.with_name(f.name.replace("-BF16", f"-{outtype.upper()}"))
        quantize(f, q, outtype)
        f.unlink()
        f = q
    return f


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two GGUF files: keys (value or order) and tensors (type, shape, bytes)."""
    import numpy as np
    from gguf import GGUFReader

    ra, rb = GGUFReader(a), GGUFReader(b)
    out = []
    ka, kb = list(ra.fields), list(rb.fields)
    if ka != kb:
        out.append(f"keys differ: only ours {sorted(set(ka) - set(kb))}, only theirs {sorted(set(kb) - set(ka))}")
    for k in ka:
        if k in rb.fields and ra.fields[k].contents() != rb.fields[k].contents():
            out.append(f"key {k}: ours {str(ra.fields[k].contents())[:80]} theirs {str(rb.fields[k].contents())[:80]}")
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    if list(ta) != list(tb):
        out.append(f"tensor order/names differ: ours {list(ta)[:6]}..., theirs {list(tb)[:6]}...")
    for name, t in ta.items():
        u = tb.get(name)
        if u is None:
            continue
        if t.tensor_type != u.tensor_type or list(t.shape) != list(u.shape):
            out.append(
                f"tensor {name}: ours {t.tensor_type.name}{list(t.shape)} theirs {u.tensor_type.name}{list(u.shape)}"
            )
        elif not np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)):
            out.append(f"tensor {name}: bytes differ")
    return out or ["files differ outside keys and tensor data (layout, padding)"]


def run_in_llama_cpp(path: Path, merged16: Path, gguf_type: str) -> float:
    """Max |logit difference| between llama.cpp on the GGUF and transformers on merged_16bit."""
    import numpy as np
    import torch
    from helpers import load_base
    from llama_cpp import Llama

    ids = [1, 17, 40, 99, 123, 7, 64, 250]
    llm = Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=64, seed=0)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
    model = load_base(merged16, torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(ours - ref).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree (convert_hf_to_gguf.py)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="run only these (default: all)")
    ap.add_argument("--run", action="store_true", help="also load each file in llama.cpp and compare logits")
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary directory)")
    args = ap.parse_args()
    import streammerge

    failed = 0
    with tempfile.TemporaryDirectory(prefix="gguf-parity-") as tmpdir:
        root = args.keep or Path(tmpdir)
        for name in args.case or CASES:
            arch, tok, typ = CASES[name]
            tmp = root / name
            tmp.mkdir(parents=True, exist_ok=True)
            base, adapter = build_case(tmp, arch, tok, args.llama_cpp)
            streammerge.merge(base, adapter, tmp / "m16" / "merged", save_method="merged_16bit")
            streammerge.merge(base, adapter, tmp / "ours" / "merged", save_method="gguf", gguf_type=typ)
            (ours,) = (tmp / "ours" / "merged").glob("*.gguf")
            theirs = convert(args.llama_cpp, tmp / "m16" / "merged", typ, tmp / "theirs")
            same = ours.read_bytes() == theirs.read_bytes()
            line = f"{name:18s} {'identical' if same else 'DIFFERENT'} ({ours.stat().st_size} bytes, {ours.name})"
            if args.run:
                err = run_in_llama_cpp(ours, tmp / "m16" / "merged", typ)
                line += f"; llama.cpp vs transformers max |dlogit| {err:.2e}"
                if err > LOGIT_TOL[typ]:
                    line += f" ABOVE {LOGIT_TOL[typ]:.0e}"
                    same = False
            print(line, flush=True)
            failed += not same
            if ours.read_bytes() != theirs.read_bytes():
                for d in differences(ours, theirs)[:12]:
                    print(f"    {d}")
    print(
        f"{len(args.case or CASES) - failed} of {len(args.case or CASES)} identical (and, with --run, within tolerance)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
