"""Issue 23 regressions: adapter_config fields read exactly as PEFT reads them, or refused by name.

Each test failed on main before the fix: fan_in_fan_out on nn.Linear (a silently wrong merge), use_dora
without magnitudes (a silently wrong merge), non-finite alphas and weights, usage errors' exit code, the
first line of stderr, a weight of 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_adapter, build_model, merge_and_compare, save_base
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.cli import main
from streammerge.errors import AdapterError

ADAPTER_ST = "adapter_model.safetensors"


def _set(ad: Path, **changes) -> None:
    p = ad / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("targets", [["q_proj", "o_proj"], ["q_proj", "k_proj", "up_proj"]])
def test_fan_in_fan_out_on_linear_is_ignored_as_peft_does(tmp_path, targets):
    """Square targets were merged transposed (exit 0, wrong weights); non-square ones were refused."""
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=targets)
    _set(ad, fan_in_fan_out=True)  # as some training scripts write it; PEFT warns and ignores it on nn.Linear
    report, _, _ = merge_and_compare(tmp_path, base, ad, torch.float32)
    (warning,) = [w for w in report.warnings if "fan_in_fan_out" in w]
    assert "is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False" in warning


def test_fan_in_fan_out_false_on_conv1d_is_set_as_peft_does(tmp_path):
    model = build_model("gpt2", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])
    _set(ad, fan_in_fan_out=False)
    report, _, _ = merge_and_compare(tmp_path, base, ad, torch.float32)
    assert any("target module is `Conv1D`. Setting fan_in_fan_out to True" in w for w in report.warnings)


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    model = build_model("llama", torch.float32)
    base = save_base(model, root / "base")
    ad = build_adapter(model, root / "ad", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    return base, ad


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_use_dora_without_magnitudes_is_refused(dora, tmp_path):
    base, ad = dora
    ad = _copy(ad, tmp_path / "ad")
    sd = load_file(ad / ADAPTER_ST)
    save_file({k: v for k, v in sd.items() if "magnitude" not in k}, ad / ADAPTER_ST)
    with pytest.raises(AdapterError, match="use_dora=true but 4 module") as e:
        streammerge.merge(base, ad, tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_magnitudes_without_use_dora_are_refused(dora, tmp_path):
    base, ad = dora
    ad = _copy(ad, tmp_path / "ad")
    _set(ad, use_dora=False)
    with pytest.raises(AdapterError, match="use_dora=false"):
        streammerge.merge(base, ad, tmp_path / "out")


@pytest.mark.parametrize(
    ("field", "text", "name"),
    [
        ("lora_alpha", "NaN", "'lora_alpha'"),
        ("lora_alpha", "Infinity", "'lora_alpha'"),
        ("lora_alpha", "-Infinity", "'lora_alpha'"),
        ("alpha_pattern", '{"q_proj": NaN}', "'alpha_pattern' entry 'q_proj'"),
        ("alpha_pattern", '{"q_proj": Infinity}', "'alpha_pattern' entry 'q_proj'"),
        ("rank_pattern", '{"q_proj": 4.5}', "'rank_pattern' entry 'q_proj'"),
    ],
)
@pytest.mark.parametrize("method", ["merged_16bit", "lora", "dry_run"])
def test_non_finite_config_numbers_are_refused_by_name(pair_copy, tmp_path, field, text, name, method):
    base, ad = pair_copy
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.pop(field, None)
    body = json.dumps(cfg)
    (ad / "adapter_config.json").write_text(body[:-1] + f', "{field}": {text}}}')
    out = tmp_path / "out"
    kw = {"dry_run": True} if method == "dry_run" else {"save_method": method}
    with pytest.raises(AdapterError) as e:
        streammerge.merge(base, ad, out, **kw)
    first = str(e.value).splitlines()[0]
    assert name in first and ("finite" in first or "integer" in first), first
    assert not out.exists()


def test_infinite_adapter_weight_is_refused(pair_copy, tmp_path):
    base, ad = pair_copy
    rc = main(["merge", str(base), f"{ad}:1e309", str(tmp_path / "out"), "--quiet"])
    assert rc == 1
    with pytest.raises(AdapterError, match="weight inf is not a finite number"):
        streammerge.merge(base, f"{ad}:1e309", tmp_path / "out")


def test_weight_zero_warns(pair_copy, tmp_path):
    base, ad = pair_copy
    report = streammerge.merge(base, f"{ad}:0", tmp_path / "out")
    assert any("weight 0 merges nothing" in w for w in report.warnings)


@pytest.mark.parametrize(
    "extra",
    [["--gguf-type", "q8_0"], ["--save-method", "gguf", "--gguf-type", "q9_9"], ["--quant-type", "nf4"]],
)
def test_option_conflicts_are_usage_errors(pair_copy, tmp_path, extra):
    base, ad = pair_copy
    assert main(["merge", str(base), str(ad), str(tmp_path / "out"), "--quiet", *extra]) == 2
    assert not (tmp_path / "out").exists()


def test_first_stderr_line_is_the_cause(pair_copy, tmp_path):
    """With a file-size limit the write fails; the cause comes first, the resume hint after it."""
    import resource

    base, ad = pair_copy

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    cmd = [sys.executable, "-m", "streammerge", "merge", str(base), str(ad), str(tmp_path / "out"), "--no-direct-io"]
    env = {**os.environ, "PYTHONPATH": str(Path(streammerge.__file__).parent.parent)}
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, env=env, timeout=120)
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "File too large" in lines[0], p.stderr
    assert "--resume" in p.stderr and "partial output kept" not in lines[0]


@pytest.mark.parametrize("arch", ["gpt2", "openai-gpt", "llama", "qwen2"])
def test_conv1d_table_matches_the_modules_transformers_builds(arch):
    import transformers as tf
    from transformers.pytorch_utils import Conv1D

    from streammerge.conversions import is_conv1d

    if arch == "openai-gpt":
        model = tf.OpenAIGPTLMHeadModel(tf.OpenAIGPTConfig(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    else:
        model = build_model(arch)
    model_type = model.config.model_type
    for name, module in model.named_modules():
        if isinstance(module, (Conv1D, torch.nn.Linear)):
            assert is_conv1d(model_type, name) == isinstance(module, Conv1D), name


def test_tokens_and_modules_to_save_on_one_layer_are_refused(tmp_path):
    """Found by the PEFT-oracle fuzz (seed 3): PEFT saves such an adapter, but its model cannot run a forward
    pass and its merge_and_unload leaves wrapper keys behind; streammerge merged it silently."""
    model = build_model("llama", torch.float32)
    base = save_base(model, tmp_path / "base")
    ad = build_adapter(
        model, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
        trainable_token_indices=[0, 3],
    )  # fmt: skip
    with pytest.raises(AdapterError, match="'modules_to_save' and 'trainable_token_indices' both train"):
        streammerge.merge(base, ad, tmp_path / "out")


def test_all_zero_lora_b_is_a_warning(pair_copy, tmp_path):
    """An adapter whose lora_B is all zero (saved before training, or with init_lora_weights=True) changes
    nothing: merged, with a warning naming the tensor."""
    base, ad = pair_copy
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    sd = load_file(ad / ADAPTER_ST)
    save_file({**sd, key: torch.zeros_like(sd[key])}, ad / ADAPTER_ST)
    report = streammerge.merge(base, ad, tmp_path / "out")
    assert any(key in w and "all zero" in w for w in report.warnings), report.warnings
