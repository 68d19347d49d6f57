"""HRA adapters (issue 25): saved by PEFT itself (``HRAConfig``, random reflections), merged equal to PEFT's
``merge_and_unload()`` bit for bit with PEFT's merged logits, with and without Gram-Schmidt, on Llama (fp32,
bf16 whole and in row blocks); refused with a weight or combined with another adapter on one tensor."""

from __future__ import annotations

import pytest
import torch
from helpers import build_adapter, build_model, build_tuner_adapter, merge_and_compare, save_base

import streammerge
from streammerge.errors import AdapterError


def _hra(model, path, **kw):
    from peft import HRAConfig

    return build_tuner_adapter(model, path, HRAConfig(**kw), seed=23, scale=0.1)


@pytest.mark.parametrize(
    ("dtype", "kw", "memory"),
    [
        (torch.float32, dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), "1GiB"),
        (torch.bfloat16, dict(r=6, target_modules=["q_proj", "up_proj"], apply_GS=True), 1),
        (torch.bfloat16, dict(r=2, target_modules=["k_proj", "down_proj"]), 1),
    ],
)
def test_hra_equals_peft(tmp_path, dtype, kw, memory):
    model = build_model("llama", dtype)
    base = save_base(model, tmp_path / "base")
    ad = _hra(model, tmp_path / "ad", **kw)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"hra"}


def test_hra_refusals(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _hra(model, tmp_path / "ad", r=2, target_modules=["q_proj"])
    lora = build_adapter(model, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="cannot be merged with a weight"):
        streammerge.merge(base, f"{ad}:0.5", tmp_path / "o1")
    with pytest.raises(AdapterError, match="rotates the whole weight"):
        streammerge.merge(base, ad, tmp_path / "o2", adapters=[str(lora)])
