"""PEFT's saved embedding layers, in the flows users run (issue 12, case 1): a vocabulary resized for
new tokens, then ``modules_to_save`` on the embeddings, LoRA on the embeddings, or trainable tokens;
with and without tied embeddings. Adapters are written by PEFT's own ``save_pretrained`` from a base
loaded with ``from_pretrained`` (so PEFT sees the resize and saves the full layers under its several
spellings); the reference is PEFT's loaded model on the resized base."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_matches_state_dict, build_model, load_base, logits, save_base
from safetensors import safe_open

import streammerge
from streammerge.errors import AdapterError

NEW_VOCAB = 168
IDS = torch.tensor([[1, 5, 163, 7, 167, 160]])
FLOWS = {
    "modules_to_save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "lora_on_embeddings": dict(target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    "trainable_tokens": dict(target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 10, 160, 165]),
}


def _adapter(base, path, tie: bool, flow: str, resize: bool = True):
    """Resize (as users do for new tokens), wrap with PEFT, train (random updates), save."""
    from peft import LoraConfig, get_peft_model

    model = load_base(base)
    if resize:
        model.resize_token_embeddings(NEW_VOCAB)
    torch.manual_seed(7)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **FLOWS[flow]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(path)
    return path


def _keys(ad) -> set[str]:
    with safe_open(str(ad / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


def _reference(base, ad, resize: bool = True, both_sides: bool = False):
    """PEFT's merged state dict and its unmerged model's logits. With LoRA on both sides of a tie PEFT's
    merge puts both updates into the one shared tensor (its merged logits then drift by ~20 from its
    unmerged model); the reference is then what the unmerged model computes: each side its own update."""
    from peft import PeftModel

    model = load_base(base)
    if resize:
        model.resize_token_embeddings(NEW_VOCAB)  # PEFT's loader needs the resized base
    pm = PeftModel.from_pretrained(model, str(ad)).eval()
    unmerged = logits(pm, IDS if resize else IDS % 160)
    if both_sides:
        inner = pm.base_model.model
        sides = {"model.embed_tokens.weight": inner.model.embed_tokens, "lm_head.weight": inner.lm_head}
        own = {k: (m.base_layer.weight + m.get_delta_weight("default")).detach() for k, m in sides.items()}
    sd = dict(pm.merge_and_unload().state_dict())
    if both_sides:
        assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])  # PEFT kept the tie
        sd.update(own)
    return sd, unmerged


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_resized_vocabulary_flows_match_peft(tmp_path, tie, flow):
    base = save_base(build_model("llama", torch.float32, tie_word_embeddings=tie), tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad", tie, flow)
    keys = _keys(ad)
    if flow == "modules_to_save":  # the three spellings PEFT writes after a resize
        for m in ("base_model.model.model.embed_tokens", "base_model.model.lm_head"):
            assert {f"{m}.weight", f"{m}.modules_to_save.weight", f"{m}.original_module.weight"} <= keys
    elif flow == "lora_on_embeddings":
        assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    else:
        assert "base_model.model.model.embed_tokens.token_adapter.base_layer.weight" in keys

    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    both_sides_of_tie = tie and flow == "lora_on_embeddings"
    ref, unmerged = _reference(base, ad, both_sides=both_sides_of_tie)
    assert_matches_state_dict(out, ref, skip_missing={"lm_head.weight"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == NEW_VOCAB
    import transformers as tf

    merged, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (logits(merged, IDS) - unmerged).abs().max() <= 1e-4
    if both_sides_of_tie:
        assert cfg["tie_word_embeddings"] is False and any("both sides of tied" in n for n in report.notes)
    if flow == "modules_to_save":
        assert cfg["tie_word_embeddings"] is False  # two trained copies: untied, as PEFT's merge
        assert any("superseded by" in n for n in report.notes)


def test_lora_on_tied_embeddings_without_resize(tmp_path):
    """Targeted embeddings make PEFT save ``base_layer`` copies even when nothing was resized."""
    base = save_base(build_model("llama", torch.float32, tie_word_embeddings=True), tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad", True, "lora_on_embeddings", resize=False)
    assert "base_model.model.lm_head.base_layer.weight" in _keys(ad)
    streammerge.merge(base, ad, tmp_path / "out")
    ref, unmerged = _reference(base, ad, resize=False, both_sides=True)
    assert_matches_state_dict(tmp_path / "out", ref)
    assert (logits(load_base(tmp_path / "out"), IDS % 160) - unmerged).abs().max() <= 1e-4


def test_unnamed_modules_to_save_copy_alone_is_refused(tmp_path):
    """PEFT's loader needs the plain ``<m>.weight`` beside ``<m>.modules_to_save.weight``; so do we."""
    from safetensors.torch import load_file, save_file

    base = save_base(build_model("llama", torch.float32), tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad", False, "modules_to_save")
    sd = load_file(ad / "adapter_model.safetensors")
    del sd["base_model.model.lm_head.weight"]
    save_file(sd, ad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="no trained copy beside it"):
        streammerge.merge(base, ad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
