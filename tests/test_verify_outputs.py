"""``streammerge verify OUT`` on every output streammerge writes (issue 23, item 4): the kind is taken from
the report's options.save_method (from the files present without a report, which is itself a problem)
and printed; each kind passes its own rules, and a flipped byte or a deleted file fails with a problem
line naming the file. Outputs are made by ``streammerge.merge`` from transformers-saved bases (an FP8
one quantized by transformers' own quantizer, a gpt-oss MXFP4 one) and PEFT adapters."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_fixtures import gguf_pair
from helpers import build_adapter, build_model, save_base

import streammerge
from streammerge.cli import main

pytest.importorskip("gguf")
pytest.importorskip("bitsandbytes")

LABEL = {
    "merged_16bit": "merged_16bit output",
    "merged_16bit_sharded": "merged_16bit output",
    "merged_16bit_zstd": "merged_16bit (zstd) output",
    "merged_4bit": "merged_4bit output",
    "merged_fp8": "merged_fp8 output",
    "mxfp4": "mxfp4 output",
    "lora": "lora output",
    "gguf": "gguf output",
}
KINDS = list(LABEL)


def _mxfp4_base(root: Path) -> tuple[Path, Path]:
    """A gpt-oss checkpoint in its MXFP4 layout (experts packed by streammerge's encoder, as
    tests/test_mxfp4.py does) and a PEFT adapter on q_proj and the fused gate_up experts."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from streammerge.sinks.mxfp4 import encode

    cfg = tf.GptOssConfig(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(root / "dense")
    (root / "mxfp4").mkdir()
    sd = {}
    for k, v in load_file(root / "dense" / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            sd[k + "_blocks"], sd[k + "_scales"] = encode(v.transpose(1, 2))
        else:
            sd[k] = v
    save_file(sd, root / "mxfp4" / "model.safetensors", {"format": "pt"})
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    conf = json.loads((root / "dense" / "config.json").read_text())
    (root / "mxfp4" / "config.json").write_text(json.dumps(dict(conf, quantization_config=qc)))
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"])
    lora.target_parameters = ["mlp.experts.gate_up_proj"]
    get_peft_model(model.float(), lora).save_pretrained(root / "ad")
    return root / "mxfp4", root / "ad"


def _fp8_base(root: Path) -> tuple[Path, Path]:
    """A Llama quantized by transformers' FineGrainedFP8 quantizer (blocks of 128) and a PEFT adapter."""
    from test_fp8 import transformers_fp8

    over = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=64)
    model = build_model("llama", torch.bfloat16, **over)
    save_base(model, root / "b16")
    transformers_fp8(root / "b16", root / "fp8")
    build_adapter(model.float(), root / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    return root / "fp8", root / "ad"


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """kind -> (output, base, adapter), each made once by streammerge.merge (shared: copy before changing)."""
    root = tmp_path_factory.mktemp("verify_outputs")
    base, ad = gguf_pair(root, "llama", "spm")  # a tokenizer beside the base: GGUF-convertible
    fp8, fp8_ad = _fp8_base(root / "fp8")
    mx, mx_ad = _mxfp4_base(root / "mx")
    made = {}
    for kind, b, a, kw in [
        ("merged_16bit", base, ad, {}),
        ("merged_16bit_sharded", base, ad, {"shard_size": "60KB"}),
        ("merged_16bit_zstd", base, ad, {"shard_size": "60KB", "compress": "zstd"}),
        ("merged_4bit", base, ad, {"save_method": "merged_4bit"}),
        ("merged_fp8", fp8, fp8_ad, {"save_method": "merged_fp8"}),
        ("mxfp4", mx, mx_ad, {"save_method": "mxfp4"}),
        ("lora", base, ad, {"save_method": "lora"}),
        ("gguf", base, ad, {"save_method": "gguf"}),
    ]:
        out = root / "out" / kind
        streammerge.merge(b, a, out, **kw)
        made[kind] = (out, b, a)
    return made


def _kind(case: str) -> str:
    """The save method of a case (the sharded and zstd cases are merged_16bit outputs)."""
    return case.removesuffix("_sharded").removesuffix("_zstd")


def _verify(capsys, out: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", str(out), *extra])
    return code, capsys.readouterr().out


def _problems(text: str) -> list[str]:
    return [line[4:] for line in text.splitlines() if line.startswith("  - ")]


def _copy(outputs, kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / kind
    shutil.copytree(outputs[kind][0], dst)
    return dst


def _flip(path: Path, at: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", KINDS)
def test_verify_prints_the_kind_and_passes_each_output(outputs, capsys, kind):
    out = outputs[kind][0]
    code, text = _verify(capsys, out)
    assert code == 0, text
    assert text.splitlines()[0].startswith(f"{out}: OK: {LABEL[kind]}:"), text
    assert not _problems(text)
    if kind == "merged_16bit_zstd":
        assert sorted(p.name for p in out.glob("model-*")) and not list(out.glob("model-*.safetensors"))
    code, text = _verify(capsys, out, "--json")
    rep = json.loads(text)
    assert code == 0 and rep["ok"] and rep["kind_from"] == "report"
    assert rep["kind"] == _kind(kind)
    assert rep["checksums_checked"] == rep["files"] >= 1  # every weight file's checksum (lora's too)
    assert rep["compressed"] == (kind == "merged_16bit_zstd")


@pytest.mark.parametrize("kind", KINDS)
def test_verify_with_the_inputs(outputs, capsys, kind):
    out, base, ad = outputs[kind]
    code, text = _verify(capsys, out, "--base", str(base), "--adapter", str(ad), "--json")
    rep = json.loads(text)
    assert code == 0 and rep["ok"], rep["problems"]
    if kind == "gguf":  # read back only, as merge --verify; said so
        assert rep["recomputed"] == 0 and any("read back only" in n for n in rep["notes"])
    elif kind == "lora":  # every tensor compared with the input adapter's
        assert rep["recomputed"] == rep["tensors"] > 0
    else:
        assert rep["recomputed"] > 0


# kind -> (a file to flip one byte of, a file to delete); the glob picks the first match
DAMAGE = {
    "merged_16bit": ("model.safetensors", "config.json"),
    "merged_16bit_sharded": ("model-00002-*.safetensors", "model-00001-*.safetensors"),
    "merged_16bit_zstd": ("model-00002-*.safetensors.zst", "model-00003-*.safetensors.zst"),
    "merged_4bit": ("model.safetensors", "config.json"),
    "merged_fp8": ("model.safetensors", "model.safetensors"),
    "mxfp4": ("model.safetensors", "config.json"),
    "lora": ("adapter_model.safetensors", "adapter_config.json"),
    "gguf": ("*.gguf", "Modelfile"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_byte_or_a_deleted_file_fails_naming_the_file(outputs, capsys, tmp_path, kind):
    flip, delete = DAMAGE[kind]
    out = _copy(outputs, kind, tmp_path / "flip")
    target = sorted(out.glob(flip))[0]
    _flip(target)
    code, text = _verify(capsys, out)
    assert code == 1 and f"{out}: FAILED: {LABEL[kind]}:" in text, text
    assert any(str(target) in p and "checksum differs" in p for p in _problems(text)), text
    out = _copy(outputs, kind, tmp_path / "delete")
    target = sorted(out.glob(delete))[0]
    target.unlink()
    code, text = _verify(capsys, out)
    assert code == 1 and "FAILED" in text, text
    assert any(target.name in p for p in _problems(text)), text


def test_gguf_output_through_the_command_line(outputs):
    """The installed command on a GGUF output (before: 'missing config.json')."""
    out = outputs["gguf"][0]
    r = subprocess.run([sys.executable, "-m", "streammerge", "verify", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{out}: OK: gguf output: 1 file(s)" in r.stdout and "config.json" not in r.stdout + r.stderr


def test_gguf_modelfile_must_name_the_gguf_file(outputs, capsys, tmp_path):
    out = _copy(outputs, "gguf", tmp_path)
    mf = out / "Modelfile"
    text = mf.read_text()
    (gg,) = out.glob("*.gguf")
    assert f"FROM ./{gg.name}\n" in text
    mf.write_text(text.replace(f"FROM ./{gg.name}", "FROM ./another.gguf"))
    code, printed = _verify(capsys, out)
    assert code == 1 and any(str(mf) in p and "another.gguf" in p for p in _problems(printed)), printed


@pytest.mark.parametrize("kind", ["gguf", "lora", "merged_fp8", "mxfp4", "merged_4bit", "merged_16bit_zstd"])
def test_without_a_report_the_files_tell_the_kind_and_it_is_a_problem(outputs, capsys, tmp_path, kind):
    out = _copy(outputs, kind, tmp_path)
    (out / "streammerge_report.json").unlink()
    code, text = _verify(capsys, out)
    assert code == 1, text
    assert text.startswith(f"{out}: FAILED: {LABEL[kind]} (from the files present):"), text
    (line,) = _problems(text)  # only that: the rest of the output checks out
    assert line.startswith(f"{out / 'streammerge_report.json'}: missing") and f"checked as {_kind(kind)}," in line


def test_an_unknown_or_missing_kind_is_a_failure_naming_what_was_found(outputs, capsys, tmp_path):
    out = _copy(outputs, "merged_16bit", tmp_path)
    rp = out / "streammerge_report.json"
    report = json.loads(rp.read_text())
    report["options"]["save_method"] = "merged_2bit"
    rp.write_text(json.dumps(report))
    code, text = _verify(capsys, out)
    assert code == 1 and "merged_2bit" in _problems(text)[0] and "checked as merged_16bit" in _problems(text)[0]
    report["options"]["save_method"] = "gguf"  # a kind the files contradict
    rp.write_text(json.dumps(report))
    code, text = _verify(capsys, out)
    assert code == 1 and text.startswith(f"{out}: FAILED: gguf output:"), text
    assert "records a gguf output, but the files present are a merged_16bit one" in _problems(text)[0]
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"\0" * 8)
    (other / "streammerge_report.json").write_text(json.dumps({"options": {}}))
    code, text = _verify(capsys, other)
    assert code == 1 and "no output kind streammerge writes" in text.splitlines()[0], text
    (line,) = _problems(text)
    assert "records no options.save_method" in line and "found" in line and "weights.bin" in line
    code, text = _verify(capsys, tmp_path / "absent")
    assert code == 1 and "does not exist" in text


def test_lora_rules(outputs, capsys, tmp_path):
    """Strict JSON config; with the inputs, the tensors are the input adapter's (another adapter's are not)."""
    out, base, _ = outputs["lora"]
    other = build_adapter(
        build_model("llama", vocab_size=384), tmp_path / "other", seed=7, r=4, lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    code, text = _verify(capsys, out, "--base", str(base), "--adapter", str(other))
    assert code == 1 and any("differ from the input adapter's" in p for p in _problems(text)), text
    bad = _copy(outputs, "lora", tmp_path)
    cfg = bad / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_dropout": 0.0', '"lora_dropout": NaN'))
    code, text = _verify(capsys, bad)
    assert code == 1 and any(str(cfg) in p and "not strict JSON" in p for p in _problems(text)), text


def test_quantized_companions_are_checked(outputs, capsys, tmp_path):
    """An FP8 weight without its scale (the report gone too: nothing to compare checksums with)."""
    from safetensors.torch import load_file, save_file

    out = _copy(outputs, "merged_fp8", tmp_path)
    st = out / "model.safetensors"
    sd = load_file(st)
    gone = next(k for k in sd if k.endswith("_scale_inv"))
    del sd[gone]
    save_file(sd, st, {"format": "pt"})
    (out / "streammerge_report.json").unlink()
    code, text = _verify(capsys, out)
    assert code == 1 and any(gone in p for p in _problems(text)), text
