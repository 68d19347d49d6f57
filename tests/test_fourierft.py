"""FourierFT adapters (issue 25): saved by PEFT itself (``FourierFTConfig``, random spectra at PEFT's seeded
frequencies), merged equal to PEFT's ``merge_and_unload()`` bit for bit with PEFT's merged logits, on Llama
(fp32, bf16, a frequency pattern, row blocks) and GPT-2 (``Conv1D``)."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base


def _fourier(model, path, **kw):
    from peft import FourierFTConfig

    return build_tuner_adapter(model, path, FourierFTConfig(**kw), seed=31, scale=0.01)


@pytest.mark.parametrize(
    ("arch", "dtype", "kw", "memory"),
    [
        ("llama", torch.float32, dict(n_frequency=50, target_modules=["q_proj", "down_proj"]), "1GiB"),
        ("llama", torch.bfloat16, dict(n_frequency=80, scaling=40.0, random_loc_seed=5, target_modules=["v_proj",
              "up_proj"], n_frequency_pattern={"up_proj": 30}), 1),
        ("gpt2", torch.float32, dict(n_frequency=60, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), 1),
    ],
)  # fmt: skip
def test_fourierft_equals_peft(tmp_path, arch, dtype, kw, memory):
    model = build_model(arch, dtype)
    base = save_base(model, tmp_path / "base")
    ad = _fourier(model, tmp_path / "ad", **kw)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"fourierft"}
