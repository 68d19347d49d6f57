"""MiSS adapters (issue 25): saved by PEFT itself (``MissConfig``, random blocks), merged equal to PEFT's
``merge_and_unload()`` bit for bit with PEFT's merged logits, default and ``mini`` forms, input widths that
are and are not multiples of r, Llama fp32 and bf16, whole and in row blocks; the ``bat`` form refused."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base

import streammerge
from streammerge.errors import AdapterError


def _miss(model, path, **kw):
    from peft import MissConfig

    return build_tuner_adapter(model, path, MissConfig(**kw), seed=37, scale=0.05)


@pytest.mark.parametrize(
    ("dtype", "kw", "memory"),
    [
        (torch.float32, dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"]), "1GiB"),
        (torch.bfloat16, dict(r=12, target_modules=["q_proj", "up_proj"]), 1),
        (torch.bfloat16, dict(r=4, target_modules=["o_proj", "gate_proj"], init_weights="mini", mini_r=16), 1),
    ],
)
def test_miss_equals_peft(tmp_path, dtype, kw, memory):
    model = build_model("llama", dtype)
    base = save_base(model, tmp_path / "base")
    ad = _miss(model, tmp_path / "ad", **kw)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"miss"}


def test_miss_bat_is_refused(tmp_path):
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _miss(model, tmp_path / "ad", r=8, target_modules=["q_proj"], init_weights="bat")
    with pytest.raises(AdapterError, match="init_weights 'bat'"):
        streammerge.merge(base, ad, tmp_path / "out")
