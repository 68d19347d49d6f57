"""--save-method gguf without llama.cpp: the file read back with gguf-py's GGUFReader (layout, keys,
types) and loaded by transformers (``gguf_file=``, which dequantizes with gguf-py) with the logits of the
merged_16bit output; refusals before anything is written; the Modelfile. Byte parity with llama.cpp's
converter and runs in llama.cpp are ``make test-gguf`` (scripts/gguf_parity.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_fixtures import VOCAB, bpe_tokenizer, gguf_pair
from helpers import load_base, sample_ids

import streammerge
from streammerge.errors import InputError

gguf = pytest.importorskip("gguf")

CASES = [  # arch, tokenizer, gguf type, transformers loads it
    ("llama", "spm", "f16", True),
    ("llama", "bpe", "q8_0", True),
    ("mistral", "spm", "bf16", True),
    ("qwen2", "bpe", "f32", True),
    ("qwen3", "bpe", "q8_0", True),
    ("gemma", "spm", "f16", False),
    ("gemma2", "spm", "bf16", True),
    ("gemma3", "spm", "q8_0", True),
    ("phi3", "spm", "f16", True),
]
# transformers' GGUF loader takes Qwen3's head_dim as 128 whatever the file says: a fixture with that
OVER = {"qwen3": {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128}}
TOL = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-5, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    cache = {}

    def get(arch: str, tok: str):
        if (arch, tok) not in cache:
            cache[arch, tok] = gguf_pair(tmp_path_factory.mktemp(f"{arch}-{tok}"), arch, tok, **OVER.get(arch, {}))
        return cache[arch, tok]

    return get


def _merge_both(tmp: Path, base: Path, adapter: Path, typ: str) -> tuple[Path, Path]:
    m16 = tmp / "m16" / "merged"
    streammerge.merge(base, adapter, m16, save_method="merged_16bit")
    out = tmp / "gg" / "merged"
    report = streammerge.merge(base, adapter, out, save_method="gguf", gguf_type=typ)
    (path,) = out.glob("*.gguf")
    assert report.shards[0]["file"] == path.name and report.shards[0]["bytes"] == path.stat().st_size
    return m16, path


@pytest.mark.parametrize("arch,tok,typ,loads", CASES, ids=[f"{a}-{t}-{q}" for a, t, q, _ in CASES])
def test_gguf_reads_back_and_matches_merged(pairs, tmp_path, arch, tok, typ, loads):
    base, adapter = pairs(arch, tok)
    m16, path = _merge_both(tmp_path, base, adapter, typ)
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    assert fields["general.file_type"] == int(_ftype(typ))
    assert fields["tokenizer.ggml.model"] == ("llama" if tok == "spm" else "gpt2")
    assert len(fields["tokenizer.ggml.tokens"]) == VOCAB
    assert "tokenizer.chat_template" in fields
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert all(types[n] == "F32" for n in types if n.endswith("norm.weight"))
    want = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[typ]
    assert types["blk.0.attn_qkv.weight" if arch == "phi3" else "blk.0.attn_q.weight"] == want
    assert path.name.endswith(f"-{want}.gguf")
    _check_tensors(r, m16, arch)
    if loads:
        _check_logits(path, m16, typ)


def _ftype(typ: str):
    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[typ]


def _check_tensors(r, m16: Path, arch: str) -> None:
    """Norms (F32, exact): the merged values, +1 for Gemma; the token embedding dequantized ~ merged."""
    from safetensors.torch import load_file

    (st,) = m16.glob("*.safetensors")
    sd = load_file(st)
    by = {t.name: t for t in r.tensors}
    norm = by["blk.0.attn_norm.weight"]
    want = sd["model.layers.0.input_layernorm.weight"].float() + (1.0 if arch.startswith("gemma") else 0.0)
    assert torch.equal(torch.from_numpy(np.array(norm.data)).reshape(want.shape), want)
    emb = by["token_embd.weight"]
    got = gguf.quants.dequantize(np.asarray(emb.data), emb.tensor_type).reshape(VOCAB, -1)
    assert np.allclose(got, sd["model.embed_tokens.weight"].float().numpy(), atol=2e-3)


def _check_logits(path: Path, m16: Path, typ: str) -> None:
    from transformers import AutoModelForCausalLM

    ids = sample_ids(VOCAB)
    ours = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = load_base(m16, torch.float32)
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert (a - b).abs().max().item() <= TOL[typ] * max(1.0, b.abs().max().item())


def test_wordlevel_tokenizer_is_refused_and_nothing_written(tmp_path):
    base, adapter = gguf_pair(tmp_path, "llama", "wordlevel")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="WordLevel"):
        streammerge.merge(base, adapter, out, save_method="gguf")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    base, adapter = gguf_pair(tmp_path, "qwen2", None)
    bpe_tokenizer(base, split=r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+")
    with pytest.raises(InputError, match="pre-tokenizer"):
        streammerge.merge(base, adapter, tmp_path / "out", save_method="gguf")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    from helpers import build_adapter, build_model, save_base

    model = build_model("gpt2")
    base = save_base(model, tmp_path / "base")
    bpe_tokenizer(base, vocab=160)
    adapter = build_adapter(model, tmp_path / "ad", r=4, target_modules=["c_attn"])
    with pytest.raises(InputError, match="GPT2LMHeadModel"):
        streammerge.merge(base, adapter, tmp_path / "out", save_method="gguf")
    assert not (tmp_path / "out").exists()


def test_kquant_without_llama_cpp_names_the_extra(pairs, tmp_path, monkeypatch):
    base, adapter = pairs("llama", "spm")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(InputError, match=r"streammerge\[llama-cpp\]"):
        streammerge.merge(base, adapter, tmp_path / "out", save_method="gguf", gguf_type="q4_k_m")
    assert not (tmp_path / "out").exists()


def test_gguf_type_needs_gguf_method_and_a_known_type(pairs, tmp_path):
    base, adapter = pairs("llama", "spm")
    with pytest.raises(InputError, match="only applies"):
        streammerge.merge(base, adapter, tmp_path / "o", gguf_type="q8_0")
    with pytest.raises(InputError, match="unknown GGUF type"):
        streammerge.merge(base, adapter, tmp_path / "o", save_method="gguf", gguf_type="q3_x")


def test_modelfile_and_cli(pairs, tmp_path):
    base, adapter = pairs("qwen2", "bpe")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "streammerge", "merge", str(base), str(adapter), str(out), "--save-method", "gguf"]
    res = subprocess.run([*cmd, "--gguf-type", "q8_0", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    (path,) = out.glob("*.gguf")
    assert sorted(p.name for p in out.iterdir()) == sorted([path.name, "Modelfile", "streammerge_report.json"])
    assert report["shards"][0]["file"] == path.name
    text = (out / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{path.name}\n")
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'PARAMETER stop "<|end_of_text|>"' in text  # the eos token


def test_dry_run_names_the_file(pairs, tmp_path):
    base, adapter = pairs("llama", "spm")
    report = streammerge.merge(base, adapter, tmp_path / "out", save_method="gguf", gguf_type="bf16", dry_run=True)
    assert report.shards[0]["file"].endswith("-BF16.gguf")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not __import__("importlib").util.find_spec("llama_cpp"), reason="needs streammerge[llama-cpp]")
def test_kquant_made_by_llama_cpp(pairs, tmp_path):
    base, adapter = pairs("llama", "spm")
    out = tmp_path / "out"
    report = streammerge.merge(base, adapter, out, save_method="gguf", gguf_type="q4_k_m")
    (path,) = out.glob("*.gguf")
    assert path.name.endswith("-Q4_K_M.gguf") and report.shards[0]["file"] == path.name
    r = gguf.GGUFReader(path)
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert not list(out.glob("*BF16*"))  # the 16-bit intermediate is gone


def test_batch_writes_gguf_beside_safetensors_in_one_pass(pairs, tmp_path):
    """A batch mixing a GGUF job and a merged_16bit job: the GGUF equals the single merge's, byte for byte."""
    from helpers import build_adapter, build_model

    from streammerge.batch import JobSpec, batch

    base, adapter = pairs("llama", "spm")
    other = build_adapter(
        build_model("llama", vocab_size=VOCAB), tmp_path / "ad2", seed=5, r=2, target_modules=["q_proj"]
    )
    jobs = [
        JobSpec("a", [str(adapter)], tmp_path / "b" / "merged", {"save_method": "gguf", "gguf_type": "q8_0"}),
        JobSpec("b", [str(other)], tmp_path / "b16" / "merged", {}),
    ]
    results = batch(base, jobs)
    assert [r.status for r in results] == ["ok", "ok"], results
    single = tmp_path / "single" / "merged"
    streammerge.merge(base, adapter, single, save_method="gguf", gguf_type="q8_0")
    (a,) = (tmp_path / "b" / "merged").glob("*.gguf")
    (b,) = single.glob("*.gguf")
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    assert (tmp_path / "b16" / "merged" / "model.safetensors").is_file()


def _quantized_base(tmp: Path, kind: str) -> tuple[Path, Path]:
    """A Llama quantized by transformers (bnb nf4, or FP8 blocks), saved with a SentencePiece tokenizer,
    and a PEFT adapter."""
    import transformers as tf
    from gguf_fixtures import spm_tokenizer
    from helpers import build_adapter, build_model, save_base
    from test_fp8 import _llama, transformers_fp8

    if kind == "fp8":
        model, vocab = _llama(512), 512
        save_base(model, tmp / "b16")
        transformers_fp8(tmp / "b16", tmp / "q")
    else:
        model, vocab = build_model("llama", torch.bfloat16, vocab_size=VOCAB), VOCAB
        save_base(model, tmp / "b16")
        qc = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        tf.AutoModelForCausalLM.from_pretrained(tmp / "b16", quantization_config=qc).save_pretrained(tmp / "q")
    spm_tokenizer(tmp / "q", vocab=vocab)
    ad = build_adapter(model.float(), tmp / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"])
    return tmp / "q", ad


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_gguf_from_quantized_bases_equals_merged_16bit(tmp_path, kind):
    """From a quantized base the GGUF holds the merged_16bit output's weights: same logits in transformers."""
    base, adapter = _quantized_base(tmp_path, kind)
    m16, path = _merge_both(tmp_path, base, adapter, "bf16")
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_BF16)
    _check_logits(path, m16, "f32")  # the bf16 values themselves: equal up to float32 rounding of the sums


def test_torch_conversions_are_byte_identical_to_gguf_py():
    """The sink's Q8_0 / F16 / BF16 in torch against gguf-py's numpy quantizers: zeros, ties, extremes."""
    from streammerge.sinks.gguf import q8_0

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-6, 4, 64).unsqueeze(1)
    x[0] = 0.0  # all-zero blocks
    x[1, :32] = torch.arange(32) - 15.5  # values landing on .5 after scaling
    x[2, 5] = 3.0e38  # huge: f16 scale overflows to inf
    x[3] = torch.tensor([1e-40, -1e-40] * 128)  # subnormals
    q = gguf.GGMLQuantizationType
    assert np.array_equal(q8_0(x.clone()).numpy(), gguf.quants.quantize(x.numpy(), q.Q8_0))
    assert np.array_equal(
        x.to(torch.bfloat16).view(torch.uint16).numpy(), gguf.quants.quantize(x.numpy(), q.BF16).view(np.uint16)
    )
    assert np.array_equal(x.to(torch.float16).numpy(), gguf.quants.quantize(x.numpy(), q.F16))
