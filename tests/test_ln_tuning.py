"""LN tuning (issue 25): the tuned normalisation layers PEFT saves replace the base's, as PEFT's
``merge_and_unload()`` swaps them in; Qwen2 (norms with weights only) in bf16, GPT-2 (LayerNorm with biases)
in fp32; a targeted layer missing from the file is an error."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.errors import AdapterError


def _ln(model, path, targets):
    from peft import LNTuningConfig

    return build_tuner_adapter(model, path, LNTuningConfig(target_modules=targets), seed=3, scale=0.1)


@pytest.mark.parametrize(
    ("arch", "dtype", "targets"),
    [("qwen2", torch.bfloat16, ["input_layernorm", "norm"]), ("gpt2", torch.float32, ["ln_1", "ln_f"])],
)
def test_ln_tuning_equals_peft(tmp_path, arch, dtype, targets):
    model = build_model(arch, dtype)
    base = save_base(model, tmp_path / "base")
    ad = _ln(model, tmp_path / "ad", targets)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype)
    assert {m["kind"] for m in report.modules} == {"replace"}


def test_ln_tuning_missing_layer_is_an_error(tmp_path):
    model = build_model("qwen2", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _ln(model, tmp_path / "ad", ["input_layernorm"])
    sd = load_file(ad / "adapter_model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.1." not in k}, ad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="targets 1 module"):
        streammerge.merge(base, ad, tmp_path / "out")
