"""Hostile input: the safetensors header parser never crashes, hangs or over-allocates; every
malformed file is an InputError that names it. Property-based (hypothesis)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streammerge
from streammerge.errors import InputError
from streammerge.source import parse_header

CASES = {"n": 0}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "F8_E4M3", "Q4", "", "f32"]),
        "shape": st.lists(st.integers(-3, 2**40), max_size=4),
        "data_offsets": st.lists(st.integers(-5, 2**40), min_size=0, max_size=3),
    }
)


def _check(tmp_path, blob: bytes) -> None:
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(blob)
    CASES["n"] += 1
    try:
        h = parse_header(p)
    except InputError as e:
        assert str(p) in str(e)
        return
    # accepted: then it really is consistent
    size = p.stat().st_size
    for t in h.tensors.values():
        assert h.data_start <= t.offset <= t.offset + t.nbytes <= size


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5), data=st.binary(max_size=64))
def test_structured_headers(tmp_path, header, data):
    raw = json.dumps(header).encode()
    _check(tmp_path, struct.pack("<Q", len(raw)) + raw + data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.integers(0, 2**64 - 1), body=st.binary(max_size=256))
def test_random_bytes_and_lengths(tmp_path, prefix, body):
    _check(tmp_path, struct.pack("<Q", prefix) + body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 200_000), junk=st.binary(max_size=16))
def test_deep_nesting_and_bad_utf8(tmp_path, depth, junk):
    raw = b"[" * depth + junk + b"]" * depth
    _check(tmp_path, struct.pack("<Q", len(raw)) + raw)


def test_report_case_count():
    """Runs last in this file: how many malformed inputs the parser survived (printed with -s)."""
    print(f"fuzzed safetensors headers: {CASES['n']} cases")
    assert CASES["n"] >= 1000


# --- adapter_config.json ----------------------------------------------------------------------------

CONFIG_CASES = {"n": 0}
_any = st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
_values = _any | st.lists(_any, max_size=3) | st.dictionaries(st.text(max_size=8), _any, max_size=3)
FIELDS = [
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "use_dora",
    "lora_bias",
    "target_modules",
    "modules_to_save",
    "trainable_token_indices",
    "layers_to_transform",
    "exclude_modules",
    "init_lora_weights",
    "bias",
    "peft_type",
    "ensure_weight_tying",
    "layer_replication",
]


@pytest.fixture(scope="module")
def fuzz_pair(tmp_path_factory):
    from helpers import build_adapter, build_model, save_base

    root = tmp_path_factory.mktemp("fz")
    model = build_model("llama", torch.float32)
    base = save_base(model, root / "base")
    ad = build_adapter(model, root / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    return base, ad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), _values, min_size=1, max_size=4))
def test_adapter_config_wrong_types_and_values(fuzz_pair, tmp_path_factory, changes):
    """Any mix of wrong types/values in adapter_config.json is a clear StreamMergeError or a valid plan,
    never an unhandled exception."""
    import shutil

    from streammerge.errors import StreamMergeError

    base, ad = fuzz_pair
    d = tmp_path_factory.mktemp("cfg")
    shutil.copy(ad / "adapter_model.safetensors", d)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    CONFIG_CASES["n"] += 1
    try:
        streammerge.merge(base, d, d / "out", dry_run=True)
    except StreamMergeError as e:
        assert str(d) in str(e) or "adapter" in str(e).lower() or "lora" in str(e).lower(), str(e)


def test_report_config_case_count():
    print(f"fuzzed adapter configs: {CONFIG_CASES['n']} cases")
    assert CONFIG_CASES["n"] >= 300
