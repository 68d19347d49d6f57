"""LoHa and LoKr adapters (issue 25): saved by PEFT itself (``LoHaConfig`` / ``LoKrConfig`` +
``get_peft_model`` + random factors + ``save_pretrained``), merged equal to PEFT's ``merge_and_unload()`` bit
for bit with PEFT's merged logits, in row blocks too (a small ``max_memory``), with rank and alpha
patterns, LoKr's whole and decomposed factors, and ``modules_to_save``."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, build_tuner_adapter, merge_and_compare, save_base

import streammerge
from streammerge.errors import AdapterError


def _adapter(model, path, kind: str, **kw):
    from peft import LoHaConfig, LoKrConfig

    cfg = (LoHaConfig if kind == "loha" else LoKrConfig)(init_weights=False, **kw)
    return build_tuner_adapter(model, path, cfg, seed=7, scale=0.05)


CASES = [
    ("loha", torch.float32, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("loha", torch.bfloat16, dict(r=8, alpha=4, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2},
                                  alpha_pattern={"q_proj": 16})),
    ("lokr", torch.float32, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("lokr", torch.bfloat16, dict(r=2, alpha=3, target_modules=["k_proj", "gate_proj"], decompose_both=True,
                                  decompose_factor=8)),
    ("lokr", torch.float16, dict(r=16, alpha=16, target_modules=["o_proj", "down_proj"], modules_to_save=["lm_head"])),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "dtype", "kw"), CASES)
@pytest.mark.parametrize("memory", ["1GiB", 1])
def test_lycoris_equals_peft(tmp_path, kind, dtype, kw, memory):
    model = build_model("llama", dtype)
    base = save_base(model, tmp_path / "base")
    ad = _adapter(model, tmp_path / "ad", kind, **kw)
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} - {"replace"} == {kind}


def test_lycoris_refusals(tmp_path):
    import json

    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _adapter(model, tmp_path / "ad", "loha", r=4, alpha=8, target_modules=["q_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(AdapterError, match="does not fit its base weight"):
        streammerge.merge(base, ad, tmp_path / "o1")
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "alpha": float("nan")}))
    with pytest.raises(AdapterError, match="'alpha' must be a positive finite number"):
        streammerge.merge(base, ad, tmp_path / "o2")


def test_inspect_and_report_name_the_type_and_its_parameters(tmp_path):
    from streammerge.cli.inspect import describe

    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = _adapter(model, tmp_path / "ad", "loha", r=4, alpha=8, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    info = describe(str(ad))
    assert info["peft_type"] == "LOHA"
    assert {(m["kind"], m["r"], m["alpha"], m["scaling"]) for m in info["modules"]} == {("loha", 2, 8, 4.0)}
    report = streammerge.merge(base, ad, tmp_path / "out", dry_run=True)
    assert {(m["kind"], m["r"], m["scaling"]) for m in report.modules} == {("loha", 2, 4.0)}
