"""Vision-language models (issue 12, case 3): transformers 5.24 saves Qwen2-VL, Qwen2.5-VL, Llava,
Gemma 3 and Mllama in the transformers-4 key layout while PEFT adapters name the transformers-5 module
tree; streammerge maps one to the other through the architecture's key conversion rules, for LoRA on
the language model and on the vision tower, and writes the base's own layout."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_matches_state_dict, logits, read_dir
from safetensors.torch import save_file

import streammerge
from streammerge.conversions import RULES, to_module_tree
from streammerge.errors import AdapterError

TXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    max_position_embeddings=256,
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
IDS = torch.tensor([[1, 5, 17, 42, 99, 7]])


def _build(arch: str):
    """A tiny random model of ``arch`` and the modules its LoRA targets (language and vision)."""
    import transformers as tf

    mrope = {"type": "mrope", "mrope_section": [2, 2, 4]}
    if arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3)
        cfg = tf.Qwen2VLConfig(text_config=dict(TXT, rope_scaling=mrope, head_dim=16), vision_config=vision)
        return tf.Qwen2VLForConditionalGeneration, cfg, ["q_proj", "v_proj", "qkv"]
    if arch == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, in_channels=3)
        vision.update(fullatt_block_indexes=[1], window_size=56)
        cfg = tf.Qwen2_5_VLConfig(text_config=dict(TXT, rope_scaling=mrope, head_dim=16), vision_config=vision)
        return tf.Qwen2_5_VLForConditionalGeneration, cfg, ["q_proj", "v_proj", "qkv"]
    if arch == "llava":
        vision = tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        cfg = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**TXT), image_token_index=150)
        return tf.LlavaForConditionalGeneration, cfg, ["q_proj", "v_proj"]
    if arch == "gemma3":
        vision = tf.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        text = tf.Gemma3TextConfig(**dict(TXT, head_dim=16, sliding_window=32))
        cfg = tf.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=150, boi_token_index=151
        )
        return tf.Gemma3ForConditionalGeneration, cfg, ["q_proj", "v_proj"]
    vision = tf.MllamaVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        vision_output_dim=64,
        intermediate_layers_indices=[0],
        max_num_tiles=4,
    )
    text = tf.MllamaTextConfig(**dict(TXT, num_hidden_layers=3, cross_attention_layers=[1], pad_token_id=0))
    return (
        tf.MllamaForConditionalGeneration,
        tf.MllamaConfig(vision_config=vision, text_config=text),
        ["q_proj", "v_proj"],
    )


def _fixture(tmp_path, arch: str):
    """Base saved by transformers' save_pretrained; adapter by PEFT on the base loaded from it."""
    from peft import LoraConfig, get_peft_model

    cls, cfg, targets = _build(arch)
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base = tmp_path / "base"
    model.save_pretrained(base)
    pm = get_peft_model(cls.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "ad")
    return cls, base, tmp_path / "ad"


def _peft_merged(cls, base, ad):
    from peft import PeftModel

    return PeftModel.from_pretrained(cls.from_pretrained(base), str(ad)).merge_and_unload().eval()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "llava", "gemma3", "mllama"])
def test_vlm_adapter_onto_transformers_saved_checkpoint(tmp_path, arch):
    cls, base, ad = _fixture(tmp_path, arch)
    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    ref = _peft_merged(cls, base, ad)
    ref.save_pretrained(tmp_path / "ref")  # the base's own (transformers-4) key layout
    ours, theirs = read_dir(out), read_dir(tmp_path / "ref")
    assert set(ours) == set(theirs)
    assert_matches_state_dict(out, theirs)
    merged, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(logits(merged.eval(), IDS), logits(ref, IDS))
    vision = [m for m in report.modules if m["tensor"].startswith(("visual.", "vision_tower.", "vision_model."))]
    language = [m for m in report.modules if m not in vision]
    assert vision and language, "LoRA on both the vision tower and the language model"
    assert all(f"{arch} key conversion" in m["rule"] for m in report.modules)


def test_inspect_and_dry_run_show_the_rule_of_each_module(tmp_path, capsys):
    from streammerge.cli import main

    _, base, ad = _fixture(tmp_path, "llava")
    assert main(["inspect", str(ad), "--base", str(base), "--json"]) == 0
    mapping = json.loads(capsys.readouterr().out)["mapping"]
    vision = next(m for m in mapping if m["module"].startswith("model.vision_tower."))
    assert vision["tensor"] == vision["module"].replace("model.vision_tower.", "vision_tower.") + ".weight"
    assert "^vision_tower\\. -> model.vision_tower." in vision["rule"]
    assert main(["merge", str(base), str(ad), str(tmp_path / "out"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "<- model.language_model.layers.0.self_attn.q_proj" in plan and "llava key conversion" in plan


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_vlm_checkpoint_in_module_tree_layout_is_written_in_that_layout(tmp_path, arch):
    """The Hub holds both layouts: a base written with the in-memory (transformers-5) names merges too,
    and the output keeps its names."""
    cls, base, ad = _fixture(tmp_path, arch)
    v5 = tmp_path / "v5"
    v5.mkdir()
    model = cls.from_pretrained(base)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, v5 / "model.safetensors", {"format": "pt"})
    (v5 / "config.json").write_text((base / "config.json").read_text())
    streammerge.merge(v5, ad, tmp_path / "out")
    ours = read_dir(tmp_path / "out")
    assert set(ours) == set(model.state_dict())
    assert_matches_state_dict(tmp_path / "out", _peft_merged(cls, base, ad).state_dict())


def test_ambiguous_conversion_is_an_error_naming_the_candidates(tmp_path):
    """A checkpoint holding one tensor under both layouts cannot be matched without guessing."""
    _, base, ad = _fixture(tmp_path, "qwen2_vl")
    from safetensors.torch import load_file

    sd = load_file(base / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    sd["model.language_model.layers.0.self_attn.q_proj.weight"] = sd[key].clone()
    save_file(sd, base / "model.safetensors", {"format": "pt"})
    with pytest.raises(AdapterError, match="several checkpoint modules") as e:
        streammerge.merge(base, ad, tmp_path / "out")
    assert "model.language_model.layers.0.self_attn.q_proj or model.layers.0.self_attn.q_proj" in str(e.value)


def test_rules_against_transformers_own_conversion():
    """Checkpoint names land on the real module tree, and module-tree names pass through unchanged."""
    samples = {
        "qwen2_vl": ["model.layers.1.mlp.up_proj", "visual.blocks.0.attn.qkv", "lm_head", "model.embed_tokens"],
        "llava": [
            "language_model.model.layers.1.self_attn.q_proj",
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1",
        ],
        "mllama": ["language_model.model.layers.0.self_attn.q_proj", "vision_model.transformer.layers.0.mlp.fc1"],
    }
    for arch, names in samples.items():
        cls, cfg, _ = _build(arch)
        with torch.device("meta"):
            model = cls(cfg)
        for name in names:
            ours, _ = to_module_tree(name, RULES[arch])
            assert ours + ".weight" in dict(model.named_parameters()), (arch, name, ours)
            assert to_module_tree(ours, RULES[arch])[0] == ours  # the module tree's spelling is a fixed point
