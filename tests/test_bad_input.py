"""Bad input: a clear error naming the file/key, exit 1, and nothing at OUT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.errors import AdapterError, InputError, NonFiniteError, OutputError, StreamMergeError

ADAPTER_ST = "adapter_model.safetensors"


def _merge_fails(base, adapter, out, exc=StreamMergeError, match=None, **kw):
    with pytest.raises(exc) as e:
        streammerge.merge(base, adapter, out, **kw)
    if match:
        assert match in str(e.value), str(e.value)
    assert not out.exists(), "a failed run must leave nothing at OUT"
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()), "work dir left behind"
    return e.value


def _edit_adapter(adapter, fn):
    sd = load_file(adapter / ADAPTER_ST)
    sd = fn(sd)
    save_file(sd, adapter / ADAPTER_ST)


def _edit_config(adapter, **changes):
    p = adapter / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def test_shape_mismatch_names_key_and_shapes(pair_copy, tmp_path):
    base, ad = pair_copy
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _edit_adapter(ad, lambda sd: {**sd, key: torch.zeros(8, 48)})
    err = _merge_fails(base, ad, tmp_path / "out", AdapterError, "model.layers.0.self_attn.q_proj")
    assert "[64, 64]" in str(err) and "[8, 48]" in str(err)


def test_unmatched_keys_are_listed(pair_copy, tmp_path):
    base, ad = pair_copy
    extra = {
        "base_model.model.model.layers.0.self_attn.nope_proj.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.model.layers.0.self_attn.nope_proj.lora_B.weight": torch.zeros(64, 8),
    }
    _edit_adapter(ad, lambda sd: {**sd, **extra})
    err = _merge_fails(base, ad, tmp_path / "out", AdapterError, "match no tensor of the base")
    assert all(k in str(err) for k in extra)


def test_adapter_for_another_model_matches_nothing(pair_copy, tmp_path):
    base, ad = pair_copy
    _edit_adapter(ad, lambda sd: {k.replace("model.layers", "transformer.blocks"): v for k, v in sd.items()})
    _merge_fails(base, ad, tmp_path / "out", AdapterError, "12 of 12 adapter tensor(s) match no tensor")


def test_unknown_extra_tensor_is_an_error(pair_copy, tmp_path):
    base, ad = pair_copy
    _edit_adapter(ad, lambda sd: {**sd, "base_model.model.model.mystery.weight": torch.zeros(3)})
    _merge_fails(base, ad, tmp_path / "out", AdapterError, "model.mystery.weight")


def test_targeted_module_missing_from_file(pair_copy, tmp_path):
    base, ad = pair_copy
    _edit_adapter(ad, lambda sd: {k: v for k, v in sd.items() if "layers.1.self_attn.v_proj" not in k})
    _merge_fails(base, ad, tmp_path / "out", AdapterError, "model.layers.1.self_attn.v_proj")


def test_half_a_module_missing(pair_copy, tmp_path):
    base, ad = pair_copy
    _edit_adapter(ad, lambda sd: {k: v for k, v in sd.items() if "layers.1.self_attn.v_proj.lora_B" not in k})
    _merge_fails(base, ad, tmp_path / "out", AdapterError, "lacks lora_B")


def test_rank_disagrees_with_config(pair_copy, tmp_path):
    base, ad = pair_copy
    _edit_config(ad, r=4)
    _merge_fails(base, ad, tmp_path / "out", AdapterError, "do not have rank r=4")


def test_truncated_shard_names_file(pair_copy, tmp_path):
    base, ad = pair_copy
    shard = sorted(base.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _merge_fails(base, ad, tmp_path / "out", InputError, f"{shard}: not a valid safetensors file: file is truncated")


def test_corrupt_header(pair_copy, tmp_path):
    base, ad = pair_copy
    shard = sorted(base.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[10:14] = b"\xff\xff\xff\xff"
    shard.write_bytes(bytes(data))
    _merge_fails(base, ad, tmp_path / "out", InputError, str(shard))


def test_missing_shard(pair_copy, tmp_path):
    base, ad = pair_copy
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _merge_fails(base, ad, tmp_path / "out", InputError, f"names shard '{shard.name}', which does not exist")


def test_index_names_absent_tensor(pair_copy, tmp_path):
    base, ad = pair_copy
    p = base / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    first = next(iter(idx["weight_map"].values()))
    idx["weight_map"]["model.ghost.weight"] = first
    p.write_text(json.dumps(idx))
    _merge_fails(base, ad, tmp_path / "out", InputError, "model.ghost.weight")


def test_tensor_missing_from_index(pair_copy, tmp_path):
    base, ad = pair_copy
    p = base / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    del idx["weight_map"]["model.norm.weight"]
    p.write_text(json.dumps(idx))
    _merge_fails(base, ad, tmp_path / "out", InputError, "not listed in the index")


@pytest.mark.parametrize("missing", ["config.json", "adapter_config.json", ADAPTER_ST])
def test_missing_files(pair_copy, tmp_path, missing):
    base, ad = pair_copy
    (base / missing if missing == "config.json" else ad / missing).unlink()
    _merge_fails(base, ad, tmp_path / "out", StreamMergeError, missing)


def test_unknown_dtype(pair_copy, tmp_path):
    base, ad = pair_copy
    shard = sorted(base.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].replace(b'"BF16"', b'"XF16"', 1)
    shard.write_bytes(data[:8] + header + data[8 + n :])
    _merge_fails(base, ad, tmp_path / "out", InputError, "dtype 'XF16'")


def test_nan_in_adapter_is_an_error_unless_allowed(pair_copy, tmp_path):
    base, ad = pair_copy
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    def poison(sd):
        t = sd[key].clone()
        t[3, 2] = math.nan
        return {**sd, key: t}

    _edit_adapter(ad, poison)
    err = _merge_fails(base, ad, tmp_path / "out", NonFiniteError, key)
    assert "--allow-nonfinite" in str(err)
    streammerge.merge(base, ad, tmp_path / "out2", allow_nonfinite=True)


def test_merge_overflow_is_caught(pair_copy, tmp_path):
    base, ad = pair_copy
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    akey = key.replace("lora_B", "lora_A")
    _edit_adapter(ad, lambda sd: {**sd, key: sd[key] * 1e25, akey: sd[akey] * 1e25})
    _merge_fails(base, ad, tmp_path / "out", NonFiniteError, "model.layers.1.mlp.down_proj.weight")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"peft_type": "BOFT"}, "adapter type 'BOFT' is not supported"),
        ({"peft_type": "LOHA"}, "peft_type is LOHA but"),
        ({"peft_type": "IA3"}, "peft_type is IA3 but"),
        ({"init_lora_weights": "pissa_niter_4"}, "rewrites the base weights"),
        ({"init_lora_weights": "olora"}, "rewrites the base weights"),
        ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
        ({"r": "8"}, "'r' must be a positive integer"),
        ({"lora_alpha": -1}, "'lora_alpha' must be a positive finite number"),
        ({"use_rslora": "yes"}, "'use_rslora' must be true or false"),
        ({"rank_pattern": {"q_proj": "x"}}, "'rank_pattern' entry 'q_proj' must be a positive integer"),
        ({"rank_pattern": {"q_proj(": 4}}, "not a valid regular expression"),
    ],
)
def test_refused_configs(pair_copy, tmp_path, change, match):
    base, ad = pair_copy
    _edit_config(ad, **change)
    _merge_fails(base, ad, tmp_path / "out", AdapterError, match)


def test_output_inside_input_refused(pair_copy):
    base, ad = pair_copy
    with pytest.raises(OutputError, match="inside the input"):
        streammerge.merge(base, ad, base / "merged")
    with pytest.raises(OutputError, match="contains the input"):
        streammerge.merge(base, ad, base.parent, overwrite=True)


def test_existing_output_needs_overwrite(llama_pair, tmp_path):
    base, ad = llama_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        streammerge.merge(base, ad, out)
    assert (out / "keep.txt").exists()
    streammerge.merge(base, ad, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_empty_existing_output_is_fine(llama_pair, tmp_path):
    base, ad = llama_pair
    out = tmp_path / "out"
    out.mkdir()
    streammerge.merge(base, ad, out)
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()


def test_concurrent_run_on_same_output_is_refused(llama_pair, tmp_path):
    from streammerge.sinks.outdir import OutputLock

    base, ad = llama_pair
    out = tmp_path / "out"
    with OutputLock(out), pytest.raises(OutputError, match="another streammerge run is writing"):
        streammerge.merge(base, ad, out)
    assert not out.exists()
    streammerge.merge(base, ad, out)  # the lock is gone once its holder is done
    assert (out / "config.json").exists() and not (tmp_path / ".out.streammerge.lock").exists()


def test_hugging_face_cache_symlinks_are_followed(llama_pair, tmp_path):
    """A snapshot directory whose files are symlinks into a blobs directory, as the HF cache lays out."""
    import hashlib
    import os

    base, ad = llama_pair
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in base.iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    streammerge.merge(snap, ad, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_index_pointing_outside_is_refused(pair_copy, tmp_path):
    base, ad = pair_copy
    p = base / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "../elsewhere.safetensors"
    p.write_text(json.dumps(idx))
    _merge_fails(base, ad, tmp_path / "out", InputError, "points outside the checkpoint directory")


def test_inputs_are_never_modified(llama_pair, tmp_path):
    import hashlib

    base, ad = llama_pair

    def snapshot():
        return {
            p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for d in (base, ad)
            for p in sorted(d.iterdir())
        }

    before = snapshot()
    streammerge.merge(base, ad, tmp_path / "out", max_memory=1)
    streammerge.merge(base, ad, tmp_path / "out2", dtype="fp32")
    assert snapshot() == before
