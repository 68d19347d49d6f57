"""VB-LoRA adapters (issue 25): saved by PEFT itself (``VBLoRAConfig``, random logits and bank), merged equal
to PEFT's ``merge_and_unload()`` bit for bit with PEFT's merged logits, on Llama (fp32, bf16, row blocks) and
GPT-2 (``Conv1D``); ``save_only_topk_weights`` refused."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base

import streammerge
from streammerge.errors import AdapterError


def _vblora(model, path, **kw):
    from peft import VBLoRAConfig

    return build_tuner_adapter(model, path, VBLoRAConfig(**kw), seed=43, scale=0.5)


@pytest.mark.parametrize(
    ("arch", "dtype", "kw", "memory"),
    [
        ("llama", torch.float32, dict(r=4, vector_length=16, num_vectors=32, target_modules=["q_proj", "down_proj"]),
         "1GiB"),
        ("llama", torch.bfloat16, dict(r=4, vector_length=32, num_vectors=16, topk=3, target_modules=["v_proj",
         "up_proj"]), 1),
        ("gpt2", torch.float32, dict(r=4, vector_length=16, num_vectors=32, target_modules=["c_attn", "c_fc"],
         fan_in_fan_out=True), 1),
    ],
)  # fmt: skip
def test_vblora_equals_peft(tmp_path, arch, dtype, kw, memory):
    model = build_model(arch, dtype)
    base = save_base(model, tmp_path / "base")
    ad = _vblora(model, tmp_path / "ad", **kw)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"vblora"}


def test_vblora_topk_only_is_refused(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _vblora(model, tmp_path / "ad", r=4, vector_length=16, num_vectors=32, target_modules=["q_proj"],
                 save_only_topk_weights=True)  # fmt: skip
    with pytest.raises(AdapterError, match="save_only_topk_weights is set"):
        streammerge.merge(base, ad, tmp_path / "out")
