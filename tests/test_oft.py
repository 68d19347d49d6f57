"""OFT adapters (issue 25): saved by PEFT itself (``OFTConfig``, random rotations), merged equal to PEFT's
``merge_and_unload()`` bit for bit with PEFT's merged logits: Cayley-Neumann and exact Cayley, shared
blocks, COFT; Llama fp32 and bf16, whole and in blocks."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base


def _oft(model, path, **kw):
    from peft import OFTConfig

    return build_tuner_adapter(model, path, OFTConfig(**kw), seed=29, scale=0.05)


@pytest.mark.parametrize(
    ("dtype", "kw", "memory"),
    [
        (torch.float32, dict(oft_block_size=16, r=0, target_modules=["q_proj", "v_proj", "down_proj"]), "1GiB"),
        (torch.bfloat16, dict(oft_block_size=8, r=0, target_modules=["q_proj", "up_proj"]), 1),
        (torch.float32, dict(oft_block_size=8, r=0, target_modules=["k_proj"], use_cayley_neumann=False), "1GiB"),
        (torch.bfloat16, dict(oft_block_size=16, r=0, target_modules=["o_proj", "gate_proj"], block_share=True), 1),
        (torch.float32, dict(oft_block_size=8, r=0, target_modules=["q_proj"], coft=True, eps=1e-3), "1GiB"),
    ],
)
def test_oft_equals_peft(tmp_path, dtype, kw, memory):
    model = build_model("llama", dtype)
    base = save_base(model, tmp_path / "base")
    ad = _oft(model, tmp_path / "ad", **kw)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"oft"}
