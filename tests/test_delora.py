"""DeLoRA adapters (issue 25): saved by PEFT itself (``DeloraConfig``, random factors), merged equal to
PEFT's ``merge_and_unload()`` bit for bit with PEFT's merged logits, on Llama (fp32, bf16 whole and in row
blocks) with a rank pattern."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base


def _delora(model, path, **kw):
    from peft import DeloraConfig

    return build_tuner_adapter(model, path, DeloraConfig(**kw), seed=19, scale=0.1)


@pytest.mark.parametrize(
    ("dtype", "kw", "memory"),
    [
        (torch.float32, dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), "1GiB"),
        (torch.bfloat16, dict(r=4, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2}), 1),
        (torch.bfloat16, dict(r=8, target_modules=["k_proj", "down_proj"]), "1GiB"),
    ],
)
def test_delora_equals_peft(tmp_path, dtype, kw, memory):
    model = build_model("llama", dtype)
    base = save_base(model, tmp_path / "base")
    ad = _delora(model, tmp_path / "ad", **kw)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"delora"}
