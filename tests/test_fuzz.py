"""Hostile input: the safetensors header parser never crashes, hangs or over-allocates; every
malformed file is an InputError that names it. Property-based (hypothesis)."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
