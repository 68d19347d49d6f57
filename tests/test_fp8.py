"""FP8 block-scaled bases (issue 13): checkpoints made by transformers' own FineGrainedFP8 quantizer
(it runs on the CPU once its GPU check is skipped), adapters trained by PEFT on the dequantized model;
the reference is transformers' dequantizing load + PEFT's merge."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_matches_state_dict, logits, read_dir
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.errors import QuantError

IDS = torch.tensor([[1, 5, 17, 42, 99, 7]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(inter: int):
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.to(torch.bfloat16)


def transformers_fp8(src, dst) -> None:
    """Quantize the checkpoint ``src`` with transformers' FineGrainedFP8 quantizer (blocks of 128) and save
    it to ``dst``. The quantizer runs on the CPU; only its environment check asks for a GPU."""
    import transformers as tf
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    check = FineGrainedFP8HfQuantizer.validate_environment
    FineGrainedFP8HfQuantizer.validate_environment = lambda self, *a, **k: None
    try:
        qc = tf.FineGrainedFP8Config(weight_block_size=[128, 128])
        q = tf.AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, dtype=torch.bfloat16)
        q.save_pretrained(dst)
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = check


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """A bf16 Llama quantized by transformers' FP8 quantizer (blocks of 128) and saved; a PEFT adapter
    trained on its dequantized load."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("fp8")
    _llama(512).save_pretrained(root / "b16")
    transformers_fp8(root / "b16", root / "fp8")
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=ALL[:5])
    pm = get_peft_model(_dequantized(root / "fp8"), lora)
    pm.save_pretrained(root / "ad")
    return root


def _dequantized(path):
    import transformers as tf

    qc = tf.FineGrainedFP8Config(dequantize=True)
    return tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, dtype=torch.bfloat16).eval()


def _peft_merged(base, ad):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(_dequantized(base), str(ad)).eval()
    unmerged = logits(pm, IDS)
    return pm.merge_and_unload().eval(), unmerged


def test_fp8_base_merged_16bit_matches_dequantized_load_plus_peft(fp8_pair, tmp_path):
    import transformers as tf

    base, ad = fp8_pair / "fp8", fp8_pair / "ad"
    stored = read_dir(base)
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 4)
    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    ref, unmerged = _peft_merged(base, ad)
    assert_matches_state_dict(out, ref.state_dict())  # touched and untouched tensors alike
    ours = read_dir(out)
    assert not any(k.endswith("_scale_inv") for k in ours) and all(v.dtype == torch.bfloat16 for v in ours.values())
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = logits(merged.eval(), IDS)
    assert torch.equal(got, logits(ref, IDS))
    assert (got - unmerged).abs().max() <= 0.1
    assert report.merged_onto.startswith("dequantized FP8 block-scaled weights (14 tensors)")


def _quantize_blocks(w: torch.Tensor, b0: int = 128, b1: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' FP8 quantizer arithmetic with cropped edge blocks (DeepSeek's layout): test-only,
    for shapes transformers' quantizer cannot write (it leaves them unquantized)."""
    o, i = w.shape
    so, si = -(-o // b0), -(-i // b1)
    padded = torch.zeros(so * b0, si * b1)
    padded[:o, :i] = w.float()
    blocks = padded.reshape(so, b0, si, b1)
    amax = blocks.abs().amax(dim=(-3, -1))
    scales = torch.where(amax > 0, 448.0 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    q = torch.clamp(blocks * scales[:, None, :, None], -448, 448).to(torch.float8_e4m3fn)
    return q.reshape(so * b0, si * b1)[:o, :i].contiguous(), (1.0 / scales).float()


def test_shapes_that_are_not_block_multiples(tmp_path):
    """DeepSeek-V3 has [576, 7168] weights with [5, 56] scales; transformers' loader refuses (or silently
    misreads) such shapes, so the reference is the block-wise rule with cropped edges, dequantized here
    by hand into a dense checkpoint that PEFT merges onto. (The FP8 file is hand-written: no tool at
    hand writes these shapes.)"""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = _llama(320)  # gate/up [320, 256], down [256, 320]: 2.5 blocks
    model.save_pretrained(tmp_path / "b16")
    sd = load_file(tmp_path / "b16" / "model.safetensors")
    fp8, dense = {}, {}
    for k, v in sd.items():
        if v.dim() == 2 and ".layers." in k:
            q, s = _quantize_blocks(v)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            se = s.repeat_interleave(128, 0)[: v.shape[0]].repeat_interleave(128, 1)[:, : v.shape[1]]
            dense[k] = (q.float() * se).to(torch.bfloat16)
        else:
            fp8[k] = dense[k] = v
    for name, tensors in (("fp8", fp8), ("dense", dense)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", {"format": "pt"})
        cfg = json.loads((tmp_path / "b16" / "config.json").read_text())
        if name == "fp8":
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
            cfg["quantization_config"]["activation_scheme"] = "dynamic"
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    import transformers as tf

    torch.manual_seed(2)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["gate_proj", "down_proj"])
    get_peft_model(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), lora).save_pretrained(tmp_path / "ad")
    streammerge.merge(tmp_path / "fp8", tmp_path / "ad", tmp_path / "out")
    ref = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), str(tmp_path / "ad"))
    assert_matches_state_dict(tmp_path / "out", ref.merge_and_unload().state_dict())


def _corrupt(fp8_pair, tmp_path, edit_tensors=None, edit_config=None):
    base = tmp_path / "bad"
    base.mkdir()
    sd = load_file(fp8_pair / "fp8" / "model.safetensors")
    if edit_tensors:
        edit_tensors(sd)
    save_file(sd, base / "model.safetensors", {"format": "pt"})
    cfg = json.loads((fp8_pair / "fp8" / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (base / "config.json").write_text(json.dumps(cfg))
    return base


SCALE = "model.layers.1.self_attn.o_proj.weight_scale_inv"


@pytest.mark.parametrize(
    ("tensors", "config", "match"),
    [
        (lambda sd: sd.pop(SCALE), None, "o_proj.weight' has no 'model.layers.1.self_attn.o_proj.weight_scale_inv"),
        (lambda sd: sd.__setitem__(SCALE, sd[SCALE][:, :1].contiguous()), None, r"needs scales \[2, 2\]"),
        (
            None,
            lambda c: c["quantization_config"].__setitem__("weight_block_size", [64, 64]),
            r"in blocks of \[64, 64\] needs scales",
        ),
        (None, lambda c: c["quantization_config"].__setitem__("fmt", "e5m2"), "fmt 'e5m2' is not supported"),
        (lambda sd: sd[SCALE].__setitem__((0, 1), float("nan")), None, "NaN, Inf or negative"),
        (None, lambda c: c.__setitem__("quantization_config", {"quant_method": "gptq", "bits": 4}), "with GPTQ"),
        (None, lambda c: c["quantization_config"].__setitem__("quant_method", "awq"), "with AWQ"),
    ],
)
def test_bad_fp8_checkpoints_are_refused_naming_the_tensor(fp8_pair, tmp_path, tensors, config, match):
    from streammerge.cli import main

    base = _corrupt(fp8_pair, tmp_path, tensors, config)
    with pytest.raises(QuantError, match=match):
        streammerge.merge(base, fp8_pair / "ad", tmp_path / "out")
    assert main(["merge", str(base), str(fp8_pair / "ad"), str(tmp_path / "out"), "-q"]) == 1
    assert not (tmp_path / "out").exists()


def test_merged_fp8_keeps_the_base_fp8(fp8_pair, tmp_path):
    """Untouched FP8 weights and scales are copied byte for byte; merged weights equal transformers' own
    FP8 quantizer run over the merged_16bit output; transformers loads the result as an FP8 checkpoint."""
    import transformers as tf

    base, ad = fp8_pair / "fp8", fp8_pair / "ad"
    streammerge.merge(base, ad, tmp_path / "m16")
    report = streammerge.merge(base, ad, tmp_path / "m8", save_method="merged_fp8", max_memory="4MiB")
    ours, stored = read_dir(tmp_path / "m8"), read_dir(base)
    assert set(ours) == set(stored)
    touched = {m["tensor"] for m in report.modules}
    for k, v in ours.items():
        assert v.dtype == stored[k].dtype, k
        if k.removesuffix("_scale_inv") not in touched:
            assert torch.equal(v.view(torch.uint8), stored[k].view(torch.uint8)), k
    transformers_fp8(tmp_path / "m16", tmp_path / "tq")
    theirs = read_dir(tmp_path / "tq")
    for k in touched:
        for name in (k, k + "_scale_inv"):
            assert torch.equal(ours[name].view(torch.uint8), theirs[name].view(torch.uint8)), name
    assert json.loads((tmp_path / "m8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    m8, m16 = _dequantized(tmp_path / "m8"), tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m16").eval()
    w8 = m8.model.layers[0].mlp.gate_proj.weight.float()
    w16 = m16.model.layers[0].mlp.gate_proj.weight.float()
    assert 0 < (w8 - w16).abs().max() <= 0.07 * w16.abs().max()  # e4m3: 3 mantissa bits
    assert (logits(m8, IDS) - logits(m16, IDS)).abs().max() < 1.0
    assert any("merged_fp8" in n for n in report.notes)
    from streammerge.verify import verify

    vr = verify(tmp_path / "m8", base, [ad])  # recomputes every tensor, re-quantized ones included
    assert vr.ok and vr.recomputed == len([k for k in stored if not k.endswith("_scale_inv")]), vr.problems


def test_merged_fp8_needs_an_fp8_base(fp8_pair, tmp_path):
    with pytest.raises(QuantError, match="holds no FP8 weight"):
        streammerge.merge(fp8_pair / "b16", fp8_pair / "ad", tmp_path / "out", save_method="merged_fp8")


@pytest.mark.parametrize("scale_shape", [(), (1,), (1, 1)])
def test_per_tensor_scales(fp8_pair, tmp_path, scale_shape):
    """One scale for a whole weight (no weight_block_size), stored as [], [1] or [1, 1]: decoded as a
    single block; merged_fp8 keeps the stored shape. (Hand-written FP8 file: transformers' quantizer
    writes block scales only.)"""
    import transformers as tf
    from peft import LoraConfig, PeftModel, get_peft_model

    name = "model.layers.0.self_attn.q_proj.weight"
    dense = load_file(fp8_pair / "b16" / "model.safetensors")
    q, s = _quantize_blocks(dense[name], *dense[name].shape)
    cfg = json.loads((fp8_pair / "b16" / "config.json").read_text())
    for d, tensors, qc in (
        ("fp8", {**dense, name: q, name + "_scale_inv": s.reshape(scale_shape)}, {"quant_method": "fp8"}),
        ("ref", {**dense, name: (q.float() * s.reshape(())).to(torch.bfloat16)}, None),
    ):
        (tmp_path / d).mkdir()
        save_file(tensors, tmp_path / d / "model.safetensors", {"format": "pt"})
        (tmp_path / d / "config.json").write_text(json.dumps(dict(cfg, quantization_config=qc) if qc else cfg))
    torch.manual_seed(4)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ref"), lora).save_pretrained(tmp_path / "ad")
    streammerge.merge(tmp_path / "fp8", tmp_path / "ad", tmp_path / "out")
    ref = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ref"), str(tmp_path / "ad"))
    assert_matches_state_dict(tmp_path / "out", ref.merge_and_unload().state_dict())
    streammerge.merge(tmp_path / "fp8", tmp_path / "ad", tmp_path / "m8", save_method="merged_fp8")
    assert read_dir(tmp_path / "m8")[name + "_scale_inv"].shape == scale_shape
