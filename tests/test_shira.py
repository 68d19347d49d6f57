"""SHiRA adapters (issue 25): saved by PEFT itself (``ShiraConfig``, random sparse entries), merged equal to
PEFT's ``merge_and_unload()`` bit for bit with PEFT's merged logits, on Llama (fp32, bf16 whole and in row
blocks) and Qwen2."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base


def _shira(model, path, **kw):
    from peft import ShiraConfig

    return build_tuner_adapter(model, path, ShiraConfig(**kw), seed=17, scale=0.1)


@pytest.mark.parametrize(
    ("arch", "dtype", "targets", "memory"),
    [
        ("llama", torch.float32, ["q_proj", "v_proj", "down_proj"], "1GiB"),
        ("llama", torch.bfloat16, ["q_proj", "up_proj", "down_proj"], 1),
        ("qwen2", torch.bfloat16, ["k_proj", "o_proj", "gate_proj"], "1GiB"),
    ],
)
def test_shira_equals_peft(tmp_path, arch, dtype, targets, memory):
    model = build_model(arch, dtype)
    base = save_base(model, tmp_path / "base")
    ad = _shira(model, tmp_path / "ad", r=2, target_modules=targets)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"shira"}
