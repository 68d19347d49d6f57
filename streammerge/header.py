"""safetensors headers: dtypes, tensor locations, and validated header parsing (plain or zstd files)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

#: safetensors dtype name -> (item size in bytes, the name of the torch dtype; torch may lack some).
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
    "C64": (8, "complex64"),
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (None where this torch lacks it). Imports torch:
    reading headers and planning do not need it."""
    import torch

    return getattr(torch, DTYPES[name][1], None)


def st_dtype(dtype) -> str | None:
    """The safetensors name of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    return next((k for k, v in DTYPES.items() if v[1] == name), None)


#: user-facing names accepted by ``--dtype`` and written to config.json.
DTYPE_ALIASES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
}
CONFIG_DTYPE_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
FLOAT_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
ARCHIVE_SEP = "::"  # "archive.tar.zst::member.safetensors": a tensor file inside an archive
MAX_NDIM = 16


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live. ``offset`` is absolute in ``file``; -1 for pickled tensors."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardHeader:
    """A validated safetensors header."""

    path: str
    data_start: int
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bad(path: Path | str, what: str, error_cls=InputError) -> Exception:
    return error_cls(
        f"{path}: not a valid safetensors file: {what}",
        hint="the file is truncated or corrupt; re-download or re-save it",
    )


ZSTD_WHOLE_FILE = 128 * 2**20  # compressed files up to this size are decompressed whole (adapters)


def is_zst(path: Path | str) -> bool:
    return str(path).endswith(".zst")


def _read_exact(f, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            chunk = f.read(min(n - len(out), 64 << 20))
        except OSError:
            raise
        except Exception as e:  # zstandard.ZstdError: corrupt compressed data
            raise OSError(f"corrupt compressed data ({e})") from None
        if not chunk:
            break
        out += chunk
    return out


def skip_read(f, skip: int, n: int) -> bytearray:
    """Discard ``skip`` bytes of a forward-only stream, then read ``n`` (fewer at its end)."""
    while skip > 0:
        got = len(f.read(min(skip, 64 << 20)))
        if not got:
            break
        skip -= got
    return _read_exact(f, n)


def _zst_open(path: Path, f, error_cls: type):
    """(decompressed size or None, a stream reader) for a zstd-compressed file."""
    import zstandard

    first = f.read(18)
    f.seek(0)
    try:
        size = zstandard.frame_content_size(first)
    except zstandard.ZstdError:
        raise _bad(path, "not a zstd frame", error_cls) from None
    return (size if size >= 0 else None), zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)


def parse_header(path: Path | str, error_cls: type = InputError) -> ShardHeader:
    """Read and validate a safetensors header without reading tensor data.

    Checks the header length against the file size, the JSON structure, dtypes, shapes, and that
    the data offsets tile the data region exactly (no gaps, overlaps, or bytes past the end).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if is_zst(path):
                size, f = _zst_open(path, f, error_cls)
            else:
                size = path.stat().st_size
            return parse_header_stream(str(path), f, size, error_cls)
    except OSError as e:
        raise error_cls(
            f"{path}: cannot read: {e.strerror or e}", hint="check that the file exists and is readable"
        ) from e


def parse_header_stream(path: str, f, size: int | None, error_cls: type = InputError) -> ShardHeader:
    """``parse_header`` on an open stream positioned at the file's start (``size`` None: unknown)."""
    head = _read_exact(f, 8)
    if len(head) < 8:
        raise _bad(path, f"file is {size} bytes, shorter than the 8-byte length prefix", error_cls)
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or (size is not None and n > size - 8):
        raise _bad(path, f"header length {n} exceeds the file size ({size} bytes) or 100 MB", error_cls)
    raw = _read_exact(f, n)
    if len(raw) != n:
        raise _bad(path, "header is truncated", error_cls)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(path, f"header is not valid UTF-8 JSON ({type(e).__name__})", error_cls) from None
    if not isinstance(obj, dict):
        raise _bad(path, "header is not a JSON object", error_cls)
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad(path, "__metadata__ must map strings to strings", error_cls)
    data_start = 8 + n
    data_len = size - data_start if size is not None else None  # unknown for a zstd frame without its size
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorRef] = {}
    for name, info in obj.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"entry {name!r} must have exactly dtype, shape, data_offsets", error_cls)
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise error_cls(
                f"{path}: tensor {name!r} has dtype {dtype!r}, which streammerge does not support",
                hint=f"supported dtypes: {', '.join(DTYPES)}",
            )
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape)
        ):
            raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}", error_cls)
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise _bad(path, f"tensor {name!r} has invalid data_offsets {offs!r}", error_cls)
        begin, end = offs
        expected = numel(shape) * DTYPES[dtype][0]
        if not 0 <= begin <= end or end - begin != expected:
            raise _bad(
                path, f"tensor {name!r}: data_offsets {offs} hold {end - begin} bytes, expected {expected}", error_cls
            )
        spans.append((begin, end, name))
        tensors[name] = TensorRef(name, path, dtype, tuple(shape), data_start + begin, expected)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise _bad(path, f"tensor {name!r} at {begin} {what}", error_cls)
        pos = end
    if data_len is not None and pos != data_len:
        if pos > data_len:
            raise _bad(path, f"file is truncated: tensors need {pos} data bytes, file has {data_len}", error_cls)
        raise _bad(path, f"{data_len - pos} trailing bytes after the last tensor", error_cls)
    return ShardHeader(path, data_start, tensors, meta)
