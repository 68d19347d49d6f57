"""The header-first writer against the safetensors library, and the header validator."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streammerge.errors import InputError, OutputError
from streammerge.sinks.safetensors import DirectFile, ShardWriter, build_header
from streammerge.source import Reader, parse_header

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.int32,
    torch.float64,
]


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        shape = [(3, 5), (7,), (), (2, 0, 3), (4, 4, 2)][i % 5]
        t = torch.randn(shape, generator=g) * 10
        out[f"t{i}.{dt}".replace("torch.", "")] = t.to(dt)
    return out


def _st(dt: torch.dtype) -> str:
    from streammerge.source import st_dtype, torch_dtype

    name = st_dtype(dt)
    assert torch_dtype(name) is dt  # the two maps agree
    return name


def test_writer_round_trip_with_safe_open(tmp_path):
    tensors = _tensors()
    specs = [(k, _st(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    w = ShardWriter(tmp_path / "a.safetensors", specs, {"format": "pt"})
    for k, v in tensors.items():
        raw = v.contiguous().reshape(-1).view(torch.uint8).numpy()
        # stream in uneven pieces to prove incremental writes
        for i in range(0, len(raw), 7):
            w.write(k, raw[i : i + 7])
    w.close()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as g:
        assert g.metadata() == {"format": "pt"}
        assert set(g.keys()) == set(tensors)
        for k, v in tensors.items():
            got = g.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(
                got.view(torch.uint8) if v.dtype.itemsize == 1 else got,
                v.view(torch.uint8) if v.dtype.itemsize == 1 else v,
            )
    # our own validator accepts it, and reads the same bytes back through the mmap
    h = parse_header(tmp_path / "a.safetensors")
    r = Reader()
    for k, v in tensors.items():
        assert bytes(r.raw(h.tensors[k])) == v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    r.close()


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_writers_write_the_same_bytes_as_the_library(tmp_path, direct):
    # sizes around the 4 KiB alignment and a small staging buffer, so every path of the staging
    # (fill, drain, carry-over, aligned tail, unaligned tail) is taken
    g = torch.Generator().manual_seed(1)
    tensors = {
        f"t{n}": torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8) for n in (4095, 1, 8192, 12289, 0, 4096)
    }
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"format": "pt"})
    specs = [(k, "U8", tuple(v.shape)) for k, v in tensors.items()]
    mine, buffered = tmp_path / "mine.safetensors", tmp_path / "buffered.safetensors"
    for path, d in ((mine, direct), (buffered, False)):
        w = ShardWriter(path, specs, {"format": "pt"}, direct=d, stage_bytes=8192)
        if d and not w.direct:
            pytest.skip("this filesystem refuses O_DIRECT")
        assert w.direct == d
        for k, v in tensors.items():
            raw = v.numpy()
            for i in range(0, len(raw), 3000):
                w.write(k, raw[i : i + 3000])
        w.close()
    assert mine.read_bytes() == buffered.read_bytes()
    with safe_open(str(mine), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "lib.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    assert mine.stat().st_size == 8 + len(build_header(specs, {"format": "pt"})) - 8 + sum(map(len, tensors.values()))


def test_direct_io_falls_back_where_the_filesystem_refuses_it(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    w = ShardWriter(tmp_path / "a.safetensors", [("x", "F32", (3,))], direct=True)
    assert not w.direct
    w.write("x", torch.arange(3, dtype=torch.float32).numpy())
    w.close()
    assert torch.equal(load_file(tmp_path / "a.safetensors")["x"], torch.arange(3, dtype=torch.float32))


def _through_direct_file(tmp_path, monkeypatch, nbytes: int, stage: int, fake_write) -> list[int]:
    """Write random bytes through a DirectFile whose ``os.write`` is ``fake_write(real_write, fd, buf)``;
    check the file holds exactly them; return the sizes ``os.write`` was asked for."""
    data = os.urandom(nbytes)
    path = tmp_path / "x.bin"
    f = DirectFile.open(path, stage)
    if f is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    real_write, calls = os.write, []

    def recording(fd, buf):
        calls.append(len(buf))
        return fake_write(real_write, fd, buf)

    monkeypatch.setattr(os, "write", recording)
    f.write(data)
    f.flush()
    f.close()
    assert path.read_bytes() == data
    return calls


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")
def test_direct_file_survives_short_writes(tmp_path, monkeypatch):
    def half(real_write, fd, buf):  # the kernel may write less than asked: half, on an aligned boundary
        n = len(buf) // 2 // 4096 * 4096 or len(buf)
        return real_write(fd, memoryview(buf)[:n])

    assert len(_through_direct_file(tmp_path, monkeypatch, 3 * 8192 + 100, 8192, half)) > 4


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")
def test_direct_file_goes_buffered_when_the_device_refuses_the_alignment(tmp_path, monkeypatch):
    import fcntl

    def picky(real_write, fd, buf):  # as a device with a logical block larger than 4 KiB would
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, buf)

    _through_direct_file(tmp_path, monkeypatch, 5 * 8192 + 7, 16384, picky)


def test_header_is_padded_and_parses_like_the_library(tmp_path):
    raw = build_header([("x", "F32", (3,))], None)
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0 and json.loads(raw[8:])["x"]["data_offsets"] == [0, 12]


def test_writer_rejects_wrong_order_and_short_tensors(tmp_path):
    w = ShardWriter(tmp_path / "b.safetensors", [("a", "F32", (2,)), ("b", "F32", (2,))])
    with pytest.raises(OutputError, match="expected 'a'"):
        w.write("b", b"\0" * 8)
    w.write("a", b"\0" * 8)
    with pytest.raises(OutputError, match="only 8 left"):
        w.write("b", b"\0" * 12)
    with pytest.raises(OutputError, match="closed before 'b'"):
        w.close()


def test_reader_accepts_library_files(tmp_path):
    t = {"w": torch.randn(4, 3).to(torch.bfloat16), "i": torch.arange(5)}
    save_file(t, tmp_path / "c.safetensors")
    h = parse_header(tmp_path / "c.safetensors")
    r = Reader()
    assert torch.equal(r.tensor(h.tensors["w"]), t["w"]) and torch.equal(r.tensor(h.tensors["i"]), t["i"])
    r.close()


def _write_raw(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


BAD = {
    "short": (b"", None, b"", "shorter than the 8-byte"),
    "huge_len": (b"{}", 2**62, b"", "exceeds the file size"),
    "not_json": (b"{nope", None, b"", "not valid UTF-8 JSON"),
    "bad_utf8": (b"\xff\xfe", None, b"", "not valid UTF-8 JSON"),
    "not_object": (b"[1,2]", None, b"", "not a JSON object"),
    "bad_dtype": ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, None, b"\0", "dtype 'Q7'"),
    "bad_shape": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, None, b"\0" * 4, "invalid shape"),
    "size_mismatch": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, None, b"\0" * 4, "expected 8"),
    "overlap": (
        {
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
        },
        None,
        b"\0" * 6,
        "overlaps",
    ),
    "gap": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, None, b"\0" * 4, "gap"),
    "truncated": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, None, b"\0" * 10, "truncated"),
    "trailing": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, None, b"\0" * 5, "trailing"),
    "extra_field": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, None, b"\0", "exactly"),
    "deep": (b"[" * 100000 + b"]" * 100000, None, b"", "not valid UTF-8 JSON"),
    "bad_meta": ({"__metadata__": {"a": 1}}, None, b"", "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_header_validation_names_the_file(tmp_path, case):
    header, length, data, msg = BAD[case]
    p = tmp_path / f"{case}.safetensors"
    if case == "short":
        p.write_bytes(b"\1\2")
    else:
        _write_raw(p, header, data, length)
    with pytest.raises(InputError) as e:
        parse_header(p)
    assert msg in str(e.value) and str(p) in str(e.value)
