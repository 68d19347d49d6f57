"""C3A adapters (issue 25): saved by PEFT itself (``C3AConfig``, random kernels), merged equal to PEFT's
``merge_and_unload()`` bit for bit with PEFT's merged logits, on Llama fp32 and bf16, whole and in blocks."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base


def _c3a(model, path, **kw):
    from peft import C3AConfig

    return build_tuner_adapter(model, path, C3AConfig(**kw), seed=41, scale=0.5)


@pytest.mark.parametrize(
    ("dtype", "kw", "memory"),
    [
        (torch.float32, dict(block_size=16, target_modules=["q_proj", "v_proj", "down_proj"]), "1GiB"),
        (torch.bfloat16, dict(block_size=32, target_modules=["q_proj", "up_proj"]), 1),
    ],
)
def test_c3a_equals_peft(tmp_path, dtype, kw, memory):
    model = build_model("llama", dtype)
    base = save_base(model, tmp_path / "base")
    ad = _c3a(model, tmp_path / "ad", **kw)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"c3a"}
