"""End to end against PEFT: every merged tensor bit-identical to merge_and_unload(), output loads
in transformers, and its logits match the unmerged PEFT model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    assert_matches_state_dict,
    build_adapter,
    build_model,
    load_base,
    merge_and_compare,
    peft_merged,
    read_dir,
    save_base,
)

import streammerge

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_llama_bf16_sharded(tmp_path):
    model = build_model("llama", torch.bfloat16)
    base = save_base(model, tmp_path / "base", shard="60KB")
    assert (base / "model.safetensors.index.json").exists()
    adapter = build_adapter(model, tmp_path / "ad", r=8, lora_alpha=16, target_modules=[*ATTN_MLP, "lm_head"])
    report, out, _ = merge_and_compare(tmp_path, base, adapter, torch.bfloat16, shard_size="50KB")
    assert len(report.shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == files
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = read_dir(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in files:
        from safetensors import safe_open

        with safe_open(str(out / f), "pt") as g:
            n = sum(g.get_tensor(k).numel() * g.get_tensor(k).element_size() for k in g.keys())
        assert n <= 50_000 or len(list(safe_open(str(out / f), "pt").keys())) == 1
    rep = json.loads((out / "streammerge_report.json").read_text())
    assert rep["version"] == streammerge.__version__ and len(rep["modules"]) == 2 * 7 + 2  # + lm_head replace


def test_qwen2_fp16_bias_rslora_patterns(tmp_path):
    model = build_model("qwen2", torch.float16)
    base = save_base(model, tmp_path / "base")
    adapter = build_adapter(
        model,
        tmp_path / "ad",
        r=8,
        lora_alpha=12,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 4, "k_proj": 2},
        alpha_pattern={"v_proj": 3.5},
    )
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"]
    report, _, _ = merge_and_compare(tmp_path, base, adapter, torch.float16)
    by = {m["module"]: m for m in report.modules}
    assert by["model.layers.1.self_attn.q_proj"]["r"] == 4
    assert by["model.layers.0.self_attn.q_proj"]["r"] == 8
    assert by["model.layers.0.self_attn.k_proj"]["r"] == 2
    assert by["model.layers.0.self_attn.v_proj"]["alpha"] == 3.5
    assert by["model.layers.0.self_attn.v_proj"]["scaling"] == pytest.approx(3.5 / 8**0.5)


def test_scaling_of_one_matches_peft(tmp_path):
    """lora_alpha == r: the delta is not multiplied at all (x * 1.0 is x); still PEFT's bits."""
    model = build_model("llama", torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    adapter = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    report, _, _ = merge_and_compare(tmp_path, base, adapter, torch.bfloat16)
    assert {m["scaling"] for m in report.modules} == {1.0}


def test_qwen2_lora_bias(tmp_path):
    model = build_model("qwen2", torch.float32)
    base = save_base(model, tmp_path / "base")
    adapter = build_adapter(
        model, tmp_path / "ad", r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"]
    )
    merge_and_compare(tmp_path, base, adapter, torch.float32)
    ref_bias = load_base(base).state_dict()["model.layers.0.self_attn.q_proj.bias"]
    assert not torch.equal(read_dir(tmp_path / "out")["model.layers.0.self_attn.q_proj.bias"], ref_bias)


def test_gpt2_fp32_conv1d_fan_in_fan_out(tmp_path):
    model = build_model("gpt2", torch.float32)
    base = save_base(model, tmp_path / "base")
    adapter = build_adapter(
        model, tmp_path / "ad", r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]
    )
    report, _, _ = merge_and_compare(tmp_path, base, adapter, torch.float32)
    assert report.tensors_merged == 2 * 4


def test_bert_encoder(tmp_path):
    model = build_model("bert", torch.float32)
    base = save_base(model, tmp_path / "base")
    adapter = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=4, target_modules=["query", "value", "dense"])
    report, _, _ = merge_and_compare(tmp_path, base, adapter, torch.float32)
    assert report.tensors_merged >= 2 * 5


def test_dtype_conversion_matches_peft_loaded_in_that_dtype(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    adapter = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "out"
    streammerge.merge(base, adapter, out, dtype="bf16")
    ref = peft_merged(base, [adapter], dtype=torch.bfloat16)
    assert_matches_state_dict(out, ref.state_dict(), skip_missing={"lm_head.weight"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_adapter_name_in_keys_and_row_blocks(tmp_path):
    """Keys spelled ``lora_A.default.weight`` are accepted; tiny row blocks give identical bits."""
    from safetensors.torch import load_file, save_file

    model = build_model("llama", torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    adapter = build_adapter(model, tmp_path / "ad", r=8, lora_alpha=16, target_modules=ATTN_MLP)
    sd = load_file(adapter / "adapter_model.safetensors")
    renamed = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in sd.items()
    }
    save_file(renamed, adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    streammerge.merge(base, adapter, out, max_memory=1)  # one row per block
    save_file(sd, adapter / "adapter_model.safetensors")
    ref = peft_merged(base, [adapter], dtype=torch.bfloat16)
    assert_matches_state_dict(out, ref.state_dict())


def test_passthrough_is_byte_identical(tmp_path):
    from safetensors import safe_open

    model = build_model("gpt2", torch.float32)
    base = save_base(model, tmp_path / "base")
    adapter = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn"])
    out = tmp_path / "out"
    streammerge.merge(base, adapter, out)
    with safe_open(str(base / "model.safetensors"), "pt") as a, safe_open(str(out / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            if "c_attn.weight" not in k:
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
