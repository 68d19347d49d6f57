"""AdaLoRA adapters (issue 25): trained for a few steps with PEFT's own rank allocator
(``update_and_allocate``), so the saved ``rank_pattern`` prunes each module to its own rank, saved by PEFT
and merged equal to PEFT's ``merge_and_unload()`` bit for bit with PEFT's merged logits; Llama (fp32, bf16,
row blocks), GPT-2 (``Conv1D``, column blocks)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_model, merge_and_compare, save_base

import streammerge
from streammerge.errors import AdapterError


def _adalora(model, path, vocab: int = 160, **kw):
    """An AdaLoRA adapter the way training leaves it: a few optimizer steps with the rank allocator."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(11)
    cfg = AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, total_step=8, tinit=1, tfinal=2, deltaT=1,
                        init_lora_weights=False, **kw)  # fmt: skip
    pm = get_peft_model(model, cfg)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, vocab, (2, 12))
    for step in range(8):
        pm(input_ids=ids, labels=ids).loss.float().backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(path)
    pm.unload()
    return path


@pytest.mark.parametrize(
    ("arch", "dtype", "targets", "memory"),
    [
        ("llama", torch.float32, ["q_proj", "v_proj", "down_proj"], "1GiB"),
        ("llama", torch.bfloat16, ["k_proj", "o_proj", "up_proj"], 1),
        ("gpt2", torch.float32, ["c_attn", "c_fc"], 1),
    ],
)
def test_adalora_equals_peft(tmp_path, arch, dtype, targets, memory):
    model = build_model(arch, torch.float32)
    ad = _adalora(model, tmp_path / "ad", target_modules=targets)
    base = save_base(model.to(dtype), tmp_path / "base")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert len({sum(m) for m in cfg["rank_pattern"].values()}) > 1  # pruned to different ranks
    report, _, _ = merge_and_compare(tmp_path, base, ad, dtype, max_memory=memory)
    assert {m["kind"] for m in report.modules} == {"adalora"}


def test_adalora_rank_pattern_must_fit(tmp_path):
    model = build_model("llama", torch.float32)
    ad = _adalora(model, tmp_path / "ad", target_modules=["q_proj"])
    base = save_base(model, tmp_path / "base")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    name = next(iter(cfg["rank_pattern"]))
    cfg["rank_pattern"][name] = [True] * 6
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="rank_pattern mask's 6"):
        streammerge.merge(base, ad, tmp_path / "out")


@pytest.mark.parametrize(
    "ptype",
    ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT", "CARTRIDGE",
     "POLY", "XLORA"],
)  # fmt: skip
def test_types_that_change_no_weight_are_refused_by_name(pair_copy, tmp_path, ptype):
    base, ad = pair_copy
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": ptype}))
    with pytest.raises(AdapterError, match=f"peft_type {ptype} has no merged form"):
        streammerge.merge(base, ad, tmp_path / "out")


def test_prompt_tuning_saved_by_peft_is_refused(tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path / "pt"
    )
    with pytest.raises(AdapterError, match="PROMPT_TUNING has no merged form"):
        streammerge.merge(base, tmp_path / "pt", tmp_path / "out")
