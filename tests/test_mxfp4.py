"""MXFP4 bases (issue 13): gpt-oss's on-disk layout, checked by transformers' own dequantizing load
(``Mxfp4Config(dequantize=True)``, which runs on the CPU); LoRA by PEFT on that load, on attention and
on the expert parameters (``target_parameters``)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_matches_state_dict, logits, read_dir
from safetensors.torch import load_file, save_file
from test_moe import _model

import streammerge
from streammerge.errors import QuantError
from streammerge.formats.mxfp4 import decode
from streammerge.sinks.mxfp4 import encode

IDS = torch.tensor([[1, 5, 17, 42, 99, 7]])
QC = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def _pack(dense_dir, out_dir):
    """gpt-oss's MXFP4 layout from a dense checkpoint: experts [E, in, out] packed as [E, out, in/32, 16]
    codes and [E, out, in/32] scales. (transformers packs only with triton kernels on a GPU; the file is
    written here with streammerge's encoder, and what it means is read back by transformers' loader.)"""
    out_dir.mkdir()
    sd = {}
    for k, v in load_file(dense_dir / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            sd[k + "_blocks"], sd[k + "_scales"] = encode(v.transpose(1, 2))
        else:
            sd[k] = v
    save_file(sd, out_dir / "model.safetensors", {"format": "pt"})
    cfg = json.loads((dense_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps(dict(cfg, quantization_config=QC)))
    return out_dir


def _dequantized(path):
    import transformers as tf

    qc = tf.Mxfp4Config(dequantize=True)
    return tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("mx")
    _model("gpt_oss", torch.bfloat16).save_pretrained(root / "dense")
    _pack(root / "dense", root / "mxfp4")
    for name, extra in (("ad", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), ("ad_attn", [])):
        torch.manual_seed(3)
        cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj"])
        cfg.target_parameters = extra or None
        get_peft_model(_dequantized(root / "mxfp4"), cfg).save_pretrained(root / name)
    return root


def test_decode_matches_transformers_loader(mx):
    """Our decoding of the stored experts is what transformers' dequantizing loader gives, bit for bit."""
    stored = load_file(mx / "mxfp4" / "model.safetensors")
    model = _dequantized(mx / "mxfp4")
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            ours = decode(stored[k + "_blocks"], stored[k + "_scales"]).transpose(1, 2).to(torch.bfloat16)
            assert torch.equal(ours, v), k


def test_mxfp4_base_merged_16bit_matches_dequantized_load_plus_peft(mx, tmp_path):
    import transformers as tf
    from peft import PeftModel

    out = tmp_path / "out"
    report = streammerge.merge(mx / "mxfp4", mx / "ad", out)
    pm = PeftModel.from_pretrained(_dequantized(mx / "mxfp4"), str(mx / "ad")).eval()
    unmerged = logits(pm, IDS)
    ref = pm.merge_and_unload().eval()
    assert_matches_state_dict(out, ref.state_dict())
    assert set(read_dir(out)) == set(read_dir(mx / "dense"))  # the dense gpt-oss layout
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = logits(merged.eval(), IDS)
    assert torch.equal(got, logits(ref, IDS)) and (got - unmerged).abs().max() <= 0.1
    assert report.merged_onto == "dequantized MXFP4 weights (4 tensors)"


def test_save_method_mxfp4(mx, tmp_path):
    """Untouched experts are copied byte for byte; merged ones re-packed, and transformers' loader reads
    back exactly the packed values (the re-packing error is bounded by MXFP4's own)."""
    streammerge.merge(mx / "mxfp4", mx / "ad_attn", tmp_path / "attn", save_method="mxfp4")
    stored, ours = read_dir(mx / "mxfp4"), read_dir(tmp_path / "attn")
    assert set(ours) == set(stored)
    assert all(torch.equal(ours[k], stored[k]) for k in stored if k.endswith(("_blocks", "_scales")))
    streammerge.merge(mx / "mxfp4", mx / "ad", tmp_path / "m16")
    rep = streammerge.merge(mx / "mxfp4", mx / "ad", tmp_path / "m4", save_method="mxfp4", max_memory="1MiB")
    m4, m16 = read_dir(tmp_path / "m4"), read_dir(tmp_path / "m16")
    loaded = _dequantized(tmp_path / "m4").state_dict()
    for k in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        ours = decode(m4[k + "_blocks"], m4[k + "_scales"]).transpose(1, 2).to(torch.bfloat16)
        assert torch.equal(loaded[k], ours)
        assert torch.equal(m4[k + "_blocks"], encode(m16[k].transpose(1, 2))[0])  # the merged values, packed
        err = (ours.float() - m16[k].float()).abs() / m16[k].float().abs().amax()
        assert 0 < float(err.max()) < 0.25
    assert json.loads((tmp_path / "m4" / "config.json").read_text())["quantization_config"] == QC
    assert any("re-packed as MXFP4" in n for n in rep.notes)
    from streammerge.verify import verify

    vr = verify(tmp_path / "m4", mx / "mxfp4", [mx / "ad"])
    assert vr.ok and vr.recomputed > 0, vr.problems


def test_encoder_round_trips_representable_groups():
    """Groups whose largest value is +-6 times their scale are representable as stored: packing them
    again gives the same bytes (the e8m0 scale and every e2m1 code, -0 included)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 4, 32), generator=g, dtype=torch.uint8)
    codes[..., 0] = 7  # +6 in every group
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(8, 4, 16)
    scales = torch.randint(100, 150, (8, 4), generator=g, dtype=torch.uint8)
    values = decode(packed.unsqueeze(0), scales.unsqueeze(0))[0]
    again, again_scales = encode(values)
    assert torch.equal(again, packed) and torch.equal(again_scales, scales)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda sd: sd.pop("model.layers.1.mlp.experts.down_proj_scales"), "have no 'model.layers.1.mlp.experts"),
        (lambda sd: sd["model.layers.0.mlp.experts.down_proj_scales"].view(-1).__setitem__(5, 255), "NaN code"),
    ],
)
def test_bad_mxfp4_checkpoints_are_refused(mx, tmp_path, edit, match):
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(mx / "mxfp4" / "model.safetensors")
    edit(sd)
    save_file(sd, bad / "model.safetensors", {"format": "pt"})
    (bad / "config.json").write_text((mx / "mxfp4" / "config.json").read_text())
    with pytest.raises(QuantError, match=match):
        streammerge.merge(bad, mx / "ad", tmp_path / "out")
    assert not (tmp_path / "out").exists()
