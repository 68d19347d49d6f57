"""VeRA adapters (issue 25): saved by PEFT itself (``VeraConfig`` with its shared projections, random
scaling vectors), merged equal to PEFT's ``merge_and_unload()`` bit for bit with PEFT's merged logits, on
Llama (fp32, bf16 whole and in row blocks) and GPT-2 (``Conv1D``); ``save_projection: false`` refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base

import streammerge
from streammerge.errors import AdapterError


def _vera(model, path, **kw):
    from peft import VeraConfig

    return build_tuner_adapter(model, path, VeraConfig(init_weights=False, **kw), seed=13, scale=0.1)


@pytest.mark.parametrize(
    ("arch", "dtype", "targets", "memory"),
    [
        ("llama", torch.float32, ["q_proj", "v_proj", "down_proj"], "1GiB"),
        ("llama", torch.bfloat16, ["q_proj", "up_proj", "down_proj"], "1GiB"),
        ("llama", torch.bfloat16, ["k_proj", "gate_proj"], 1),
        ("gpt2", torch.float32, ["c_attn", "c_fc"], 1),
    ],
)
def test_vera_equals_peft(tmp_path, arch, dtype, targets, memory):
    model = build_model(arch, dtype)
    base = save_base(model, tmp_path / "base")
    ad = _vera(model, tmp_path / "ad", r=8, target_modules=targets)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"vera"}


def test_vera_without_its_projections_is_refused(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _vera(model, tmp_path / "ad", r=8, target_modules=["q_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "save_projection": False}))
    with pytest.raises(AdapterError, match="save_projection is false"):
        streammerge.merge(base, ad, tmp_path / "out")
