"""(IA)^3 adapters (issue 25, first of PEFT's other tuner types): saved by PEFT itself
(``IA3Config`` + ``get_peft_model`` + random vectors + ``save_pretrained``), merged equal to PEFT's
``merge_and_unload()`` bit for bit, with PEFT's merged logits; on Llama (fp32, bf16, sharded), Qwen2 (output
side with a bias), GPT-2 (``Conv1D``), and with ``modules_to_save``."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, read_dir, save_base

import streammerge
from streammerge.errors import AdapterError


def _ia3(model, path, **kw):
    from peft import IA3Config

    kw.setdefault("init_ia3_weights", False)  # random vectors, not ones
    return build_tuner_adapter(model, path, IA3Config(**kw), seed=5, scale=0.1)


@pytest.mark.parametrize(
    ("arch", "dtype", "targets", "feedforward", "shard"),
    [
        ("llama", torch.float32, ["k_proj", "v_proj", "down_proj"], ["down_proj"], None),
        ("llama", torch.bfloat16, ["q_proj", "up_proj", "down_proj"], ["up_proj", "down_proj"], "60KB"),
        ("qwen2", torch.bfloat16, ["k_proj", "v_proj", "o_proj", "gate_proj"], ["gate_proj"], None),
        ("gpt2", torch.float32, ["c_attn", "c_fc", "c_proj"], ["c_fc"], None),
        ("llama", torch.float16, r".*\.(v_proj|down_proj)", r".*\.down_proj", None),
    ],
)
def test_ia3_equals_peft(tmp_path, arch, dtype, targets, feedforward, shard):
    model = build_model(arch, dtype)
    base = save_base(model, tmp_path / "base", shard=shard)
    ad = _ia3(model, tmp_path / "ad", target_modules=targets, feedforward_modules=feedforward)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype)
    kinds = {m["kind"] for m in report.modules}
    assert kinds == {"ia3"}


def test_ia3_with_modules_to_save(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _ia3(model, tmp_path / "ad", target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
              modules_to_save=["lm_head"])  # fmt: skip
    merge_and_compare(tmp_path, base, ad, torch.float32)


def test_ia3_refusals(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _ia3(model, tmp_path / "ad", target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(AdapterError, match="cannot be merged with a weight"):
        streammerge.merge(base, f"{ad}:0.5", tmp_path / "o1")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["feedforward_modules"] = ["v_proj", "down_proj"]  # v_proj's vector is output-side: it no longer fits
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"does not fit .model\.layers\.0\.self_attn\.v_proj\.weight."):
        streammerge.merge(base, ad, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_ia3_lora_output_and_verify(tmp_path):
    from streammerge.verify import verify_output

    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _ia3(model, tmp_path / "ad", target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    out = tmp_path / "out"
    streammerge.merge(base, ad, out, save_method="lora")
    assert set(read_dir(out)) == set(read_dir(ad))
    vr = verify_output(out, base, [ad])
    assert vr.ok, vr.problems
    merged = tmp_path / "merged"
    streammerge.merge(base, ad, merged)
    vr = verify_output(merged, base, [ad])
    assert vr.ok and vr.recomputed > 0, vr.problems
