"""The working set is a few tensors: a real merge under ``prlimit --data`` on a model several times
larger than the cap (RLIMIT_DATA caps anonymous memory; the mmap'd input does not count)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from streammerge.synthetic import write_synthetic_llama

CAP = 450 * 2**20


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_merge_under_data_cap_on_model_three_times_larger(tmp_path):
    base, ad = write_synthetic_llama(tmp_path, hidden=2048, inter=5632, layers=14, vocab=32000, kv_heads=4, heads=16)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert size > 3 * CAP
    out = tmp_path / "out"
    cmd = [
        "prlimit",
        f"--data={CAP}",
        sys.executable,
        "-m",
        "streammerge",
        "merge",
        str(base),
        str(ad),
        str(out),
        "--shard-size",
        "400MB",
        "--json",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["work_buffer_bytes"] <= 128 * 2**20  # the default --max-memory budget
    # a control: the same cap is really binding (allocating the model's size fails under it)
    ctl = subprocess.run(
        [
            "prlimit",
            f"--data={CAP}",
            sys.executable,
            "-c",
            f"import torch; torch.empty({size}, dtype=torch.uint8).fill_(1)",
        ],
        capture_output=True,
    )
    assert ctl.returncode != 0
    # check every tensor: adapted ones against a dense reference, the rest byte for byte
    from safetensors.torch import load_file

    lora = load_file(ad / "adapter_model.safetensors")
    where = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) >= 3
    seen = 0
    for f in files:
        with safe_open(str(f), "pt") as g:
            for k in g.keys():
                got = g.get_tensor(k)
                with safe_open(str(base / where[k]), "pt") as b:
                    src = b.get_tensor(k)
                m = "base_model.model." + k[: -len(".weight")]
                if f"{m}.lora_A.weight" in lora:
                    delta = (lora[f"{m}.lora_B.weight"] @ lora[f"{m}.lora_A.weight"]) * 2.0
                    src = (src.float() + delta).to(torch.bfloat16)
                assert torch.equal(got, src), k
                seen += 1
    assert seen == 14 * 9 + 3


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_fused_moe_experts_merge_one_expert_block_at_a_time_under_cap(tmp_path):
    """Fused experts [64, 2048, 1024]: the 3-D tensor alone is 537 MB in fp32, more than the cap, so it
    can only be merged in expert blocks; the model is 1.8x the cap."""
    from streammerge.synthetic import write_synthetic_moe

    experts, inter, hidden, r = 64, 1024, 1024, 8
    base, ad = write_synthetic_moe(tmp_path, hidden=hidden, inter=inter, experts=experts, layers=2, r=r)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert size > 1.5 * CAP and experts * 2 * inter * hidden * 4 > CAP
    out = tmp_path / "out"
    cmd = ["prlimit", f"--data={CAP}", sys.executable, "-m", "streammerge", "merge", str(base), str(ad), str(out)]
    proc = subprocess.run([*cmd, "--json", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["work_buffer_bytes"] <= 128 * 2**20
    from safetensors.torch import load_file

    lora = load_file(ad / "adapter_model.safetensors")
    m = "base_model.model.model.layers.1.mlp.experts"
    a = lora[f"{m}.base_layer.lora_A.weight"].reshape(experts, r, hidden)
    b = lora[f"{m}.base_layer.lora_B.weight"].reshape(2 * inter, r, experts)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    with (
        safe_open(str(out / "model.safetensors"), "pt") as f,
        safe_open(str(base / "model-00002-of-00002.safetensors"), "pt") as g,
    ):
        got, w0 = f.get_slice(name), g.get_slice(name)
        for e in (0, 37, experts - 1):  # PEFT's per-expert update, rounded to bf16, then added
            want = w0[e : e + 1][0] + ((b[:, :, e] @ a[e]) * 2.0).to(torch.bfloat16)
            assert torch.equal(got[e : e + 1][0], want), e


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_fp8_base_merges_under_data_cap(tmp_path):
    """An FP8 block-scaled model twice the cap's size, merged to bf16 under the cap; a merged weight
    checked against the block-wise dequantization plus the LoRA update."""
    base, ad = write_synthetic_llama(
        tmp_path, hidden=2048, inter=5632, layers=16, vocab=32000, kv_heads=4, heads=16, fp8=True
    )
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert size > 2 * CAP
    out = tmp_path / "out"
    cmd = ["prlimit", f"--data={CAP}", sys.executable, "-m", "streammerge", "merge", str(base), str(ad), str(out)]
    proc = subprocess.run([*cmd, "--shard-size", "400MB", "--json", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["merged_onto"].startswith("dequantized FP8 block-scaled weights (112 tensors)")
    from safetensors.torch import load_file

    lora = load_file(ad / "adapter_model.safetensors")
    where = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    out_where = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    k = "model.layers.15.mlp.down_proj.weight"
    with safe_open(str(base / where[k]), "pt") as f:
        q, s = f.get_tensor(k), f.get_tensor(k + "_scale_inv")
    with safe_open(str(out / out_where[k]), "pt") as f:
        got = f.get_tensor(k)
    scale = s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
    m = "base_model.model." + k[: -len(".weight")]
    delta = (lora[f"{m}.lora_B.weight"] @ lora[f"{m}.lora_A.weight"]) * 2.0
    want = ((q.float() * scale).to(torch.bfloat16).float() + delta).to(torch.bfloat16)
    assert torch.equal(got, want)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")
def test_gguf_q8_0_under_data_cap(tmp_path):
    """--save-method gguf (Q8_0: converted, permuted and quantized on the way) under the same cap on a
    model three times its size; two merged tensors checked against gguf-py's own quantization of the
    dense reference (rope-permuted for attn_k)."""
    import gguf
    import numpy as np
    from gguf_fixtures import spm_tokenizer
    from safetensors.torch import load_file

    base, ad = write_synthetic_llama(tmp_path, hidden=2048, inter=5632, layers=14, vocab=32000, kv_heads=4, heads=16)
    spm_tokenizer(base)  # 384 pieces: the converter pads the rest of the 32000 ids with [PADi]
    out = tmp_path / "out"
    cmd = ["prlimit", f"--data={CAP}", sys.executable, "-m", "streammerge", "merge", str(base), str(ad), str(out)]
    proc = subprocess.run([*cmd, "--save-method", "gguf", "--gguf-type", "q8_0", "--json", "--no-progress"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["work_buffer_bytes"] <= 128 * 2**20
    (path,) = out.glob("*.gguf")
    r = gguf.GGUFReader(path)
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 32000 and len(r.tensors) == 14 * 9 + 3
    by = {t.name: t for t in r.tensors}
    lora = load_file(ad / "adapter_model.safetensors")
    where = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for k, name, heads in (("model.layers.13.self_attn.k_proj.weight", "blk.13.attn_k.weight", 4),
                           ("model.layers.13.mlp.down_proj.weight", "blk.13.ffn_down.weight", 0)):  # fmt: skip
        with safe_open(str(base / where[k]), "pt") as b:
            src = b.get_tensor(k)
        m = "base_model.model." + k[: -len(".weight")]
        delta = (lora[f"{m}.lora_B.weight"] @ lora[f"{m}.lora_A.weight"]) * 2.0
        want = (src.float() + delta).to(torch.bfloat16).float()
        if heads:  # llama.cpp's rope order: each head's two halves interleaved
            want = want.reshape(heads, 2, want.shape[0] // heads // 2, -1).transpose(1, 2).reshape(want.shape)
        expect = gguf.quants.quantize(want.numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(by[name].data).reshape(expect.shape), expect), name
