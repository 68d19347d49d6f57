"""Every adapter feature against PEFT: DoRA, embedding LoRA, modules_to_save, resized vocabularies,
trainable tokens, tied embeddings, several adapters, .bin adapters and named subfolders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import (
    assert_matches_state_dict,
    build_adapter,
    build_model,
    load_base,
    logits,
    merge_and_compare,
    peft_merged,
    peft_unmerged,
    read_dir,
    sample_ids,
    save_base,
)

import streammerge
from streammerge.errors import AdapterError


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_linear(tmp_path, dtype):
    model = build_model("llama", dtype)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj"])
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype)
    assert {m["kind"] for m in report.modules} == {"dora"}


def test_dora_fan_in_fan_out_gpt2(tmp_path):
    model = build_model("gpt2", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(
        model, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]
    )
    merge_and_compare(tmp_path, base, ad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_lora_two_roundings(tmp_path, dtype):
    model = build_model("llama", dtype)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"])
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype)
    assert "embedding" in {m["kind"] for m in report.modules}


def test_dora_embedding(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"])
    merge_and_compare(tmp_path, base, ad, torch.float32)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_modules_to_save_and_bias(tmp_path, bias):
    model = build_model("qwen2", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(
        model,
        tmp_path / "ad",
        r=4,
        lora_alpha=8,
        bias=bias,
        target_modules=["q_proj", "k_proj"],
        modules_to_save=["post_attention_layernorm"],
    )
    report, _, _ = merge_and_compare(tmp_path, base, ad, torch.float32)
    kinds = [m["kind"] for m in report.modules]
    assert "replace" in kinds


def test_trainable_tokens_list_and_dict(tmp_path):
    model = build_model("llama", torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(
        model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 7, 150]
    )
    merge_and_compare(tmp_path, base, ad, torch.bfloat16)
    ad2 = build_adapter(
        model,
        tmp_path / "ad2",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        trainable_token_indices={"embed_tokens": [1, 2]},
    )
    shutil.rmtree(tmp_path / "out")
    merge_and_compare(tmp_path, base, ad2, torch.bfloat16)


def test_tied_gemma_lora_on_embedding_and_lm_head_keeps_tie(tmp_path):
    model = build_model("gemma", torch.float32)
    base = save_base(model, tmp_path / "base")
    assert "lm_head.weight" not in read_dir(base)
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    ref = peft_merged(base, [ad])
    assert_matches_state_dict(out, ref.state_dict(), skip_missing={"lm_head.weight"})
    merged = load_base(out)
    # a tie holds one matrix, so the lm_head delta reaches the input embedding too: PEFT's merged model
    # (which we match) differs from its unmerged one here; the report says so
    ids = sample_ids(merged.config.vocab_size)
    assert torch.equal(logits(merged, ids), logits(ref, ids))
    assert any("shared tensor" in n for n in report.notes)
    assert "lm_head.weight" not in read_dir(out)
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is not False
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_tied_modules_to_save_unties(tmp_path):
    model = build_model("gemma", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(
        model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    tensors = read_dir(out)
    assert "lm_head.weight" in tensors
    assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    merged = load_base(out)
    ids = sample_ids(merged.config.vocab_size)
    unmerged = logits(peft_unmerged(base, ad), ids)
    assert (logits(merged, ids) - unmerged).abs().max() <= 1e-4
    assert any("tie_word_embeddings" in n for n in report.notes)


def test_ensure_weight_tying_applies_delta_once(tmp_path):
    model = build_model("gemma", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(
        model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True
    )
    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    merged = load_base(out)
    ids = sample_ids(merged.config.vocab_size)
    unmerged = logits(peft_unmerged(base, ad), ids)
    torch.testing.assert_close(logits(merged, ids), unmerged, rtol=1e-5, atol=1e-3)
    assert any("applied once" in n for n in report.notes)
    # PEFT's own merge adds the delta twice and drifts far from its unmerged model
    assert (logits(peft_merged(base, [ad]), ids) - unmerged).abs().max() > 1.0


def test_resized_vocabulary_with_new_tokens(tmp_path):
    """Embedding and lm_head take the adapter's shape, vocab_size follows, the adapter's tokenizer wins."""
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    (base / "tokenizer_config.json").write_text(json.dumps({"from": "base"}))
    (base / "special_tokens_map.json").write_text(json.dumps({"from": "base"}))
    model.resize_token_embeddings(176)
    with torch.no_grad():
        model.model.embed_tokens.weight[160:] = torch.randn(16, 64) * 0.02
        model.lm_head.weight[160:] = torch.randn(16, 64) * 0.02
    ad = build_adapter(
        model,
        tmp_path / "ad",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    (ad / "tokenizer_config.json").write_text(json.dumps({"from": "adapter"}))
    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 176
    t = read_dir(out)
    assert t["model.embed_tokens.weight"].shape == (176, 64) and t["lm_head.weight"].shape == (176, 64)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert json.loads((out / "special_tokens_map.json").read_text()) == {"from": "base"}
    # PEFT needs the base resized before loading the adapter; then merged tensors and logits must agree
    from peft import PeftModel

    ref_base = load_base(base)
    ref_base.resize_token_embeddings(176)
    pm = PeftModel.from_pretrained(ref_base, str(ad))
    ids = torch.tensor([[3, 160, 175, 170, 5, 168]])
    unmerged = logits(pm, ids)
    ref = pm.merge_and_unload()
    assert_matches_state_dict(out, ref.state_dict())
    merged = load_base(out)
    assert (logits(merged, ids) - unmerged).abs().max() <= 1e-4
    assert any("vocab_size" in n for n in report.notes)


def test_several_adapters_weighted(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    a1 = build_adapter(model, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    a2 = build_adapter(model, tmp_path / "a2", seed=2, r=8, lora_alpha=8, target_modules=["v_proj", "down_proj"])
    out = tmp_path / "out"
    streammerge.merge(base, f"{a1}:0.7", out, adapters=[f"{a2}:0.3"])
    got = read_dir(out)
    # reference: PEFT delta weights, weighted and summed in fp32, one rounding
    from peft import PeftModel

    ref = load_base(base).state_dict()
    for ad, w in ((a1, 0.7), (a2, 0.3)):
        pm = PeftModel.from_pretrained(load_base(base), str(ad))
        for name, mod in pm.named_modules():
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
                key = name.replace("base_model.model.", "") + ".weight"
                ref[key] = ref[key].float() + mod.get_delta_weight("default") * w
    for k, v in got.items():
        assert torch.equal(v, ref[k].to(v.dtype)), k


def test_two_adapters_replacing_same_module_is_an_error(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    a1 = build_adapter(model, tmp_path / "a1", seed=1, **kw)
    a2 = build_adapter(model, tmp_path / "a2", seed=2, **kw)
    with pytest.raises(AdapterError, match="replaced by both"):
        streammerge.merge(base, a1, tmp_path / "out", adapters=[a2])


def test_bin_adapter_and_named_subfolder(tmp_path):
    from safetensors.torch import load_file

    model = build_model("mistral", torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    ref = peft_merged(base, [ad], dtype=torch.bfloat16).state_dict()
    named = tmp_path / "named" / "my_adapter"
    named.mkdir(parents=True)
    shutil.copy(ad / "adapter_config.json", named)
    torch.save(load_file(ad / "adapter_model.safetensors"), named / "adapter_model.bin")
    streammerge.merge(base, tmp_path / "named", tmp_path / "out")
    assert_matches_state_dict(tmp_path / "out", ref)


def test_malicious_bin_is_refused(tmp_path, llama_pair):
    import pickle

    base, ad = llama_pair
    bad = tmp_path / "bad"
    shutil.copytree(ad, bad)
    (bad / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(bad / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(AdapterError, match="cannot be read safely"):
        streammerge.merge(base, bad, tmp_path / "out")


@pytest.mark.parametrize(
    ("arch", "dtype", "targets"),
    [
        ("mistral", torch.bfloat16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ("qwen3", torch.bfloat16, ["q_proj", "v_proj", "down_proj"]),
        ("gemma", torch.bfloat16, ["q_proj", "o_proj", "up_proj"]),
        ("phi3", torch.float16, ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]),
        ("gpt2", torch.float32, ["c_attn", "c_proj", "c_fc"]),
        ("bert", torch.float32, ["query", "key", "value", "dense"]),
    ],
)
def test_architectures(tmp_path, arch, dtype, targets):
    model = build_model(arch, dtype)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    merge_and_compare(tmp_path, base, ad, dtype)


def test_mixtral_style_moe_with_per_expert_linear_adapter(tmp_path):
    """transformers v4-era adapters target each expert's w1/w2/w3 Linear; the checkpoint on disk keeps
    per-expert tensors, so the merge is per tensor. Checked against a dense reference and by loading."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    sd = load_file(base / "model.safetensors")
    ad = tmp_path / "ad"
    ad.mkdir()
    r, alpha = 4, 8
    lora, expected = {}, dict(sd)
    for name, w in sd.items():
        if name.endswith((".w1.weight", ".w2.weight", ".w3.weight", "q_proj.weight")):
            m = name[: -len(".weight")]
            a = torch.randn(r, w.shape[1]) * 0.1
            b = torch.randn(w.shape[0], r) * 0.1
            lora[f"base_model.model.{m}.lora_A.weight"], lora[f"base_model.model.{m}.lora_B.weight"] = a, b
            expected[name] = (w.float() + (b @ a) * (alpha / r)).to(w.dtype)
    save_file(lora, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "target_modules": ["w1", "w2", "w3", "q_proj"],
            }
        )
    )
    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    assert report.tensors_merged == 2 * (4 * 3 + 1)
    got = read_dir(out)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    ref_dir = tmp_path / "ref"
    shutil.copytree(base, ref_dir)
    save_file(expected, ref_dir / "model.safetensors", metadata={"format": "pt"})
    ids = sample_ids(128)
    assert torch.equal(logits(load_base(out), ids), logits(load_base(ref_dir), ids))
