"""Reading checkpoints: validated safetensors headers, shard indexes, zero-copy mmap views.

This module and :mod:`streammerge.sink` are the only places that touch tensor files.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

#: safetensors dtype name -> (item size in bytes, torch dtype or None when torch lacks it).
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
    "F8_E8M0": (1, getattr(torch, "float8_e8m0fnu", None)),
    "I16": (2, torch.int16),
    "U16": (2, getattr(torch, "uint16", None)),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I32": (4, torch.int32),
    "U32": (4, getattr(torch, "uint32", None)),
    "F32": (4, torch.float32),
    "I64": (8, torch.int64),
    "U64": (8, getattr(torch, "uint64", None)),
    "F64": (8, torch.float64),
    "C64": (8, getattr(torch, "complex64", None)),
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
TORCH_TO_ST = {v[1]: k for k, v in DTYPES.items() if v[1] is not None}
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

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"
ARCHIVE_SEP = "::"  # "archive.tar.zst::member.safetensors": a tensor file inside an archive
SINGLE_NAME = "model.safetensors"
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


def _skip_read(f, skip: int, n: int) -> bytearray:
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


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face model directory: config, shard headers and every tensor's location."""

    path: str
    config: dict
    tensors: dict[str, TensorRef]  # in file order: shard by shard, offset by offset
    shard_files: tuple[str, ...]
    sharded: bool
    aux: dict | None = None  # a .tar.zst archive's small files (config, tokenizer, ...), by name

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_json(path: Path, what: str, error_cls: type = InputError) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error_cls(f"{path}: missing {what}", hint=f"{path.parent} must contain {path.name}") from None
    except OSError as e:
        raise error_cls(f"{path}: cannot read {what}: {e.strerror or e}") from e
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise error_cls(f"{path}: {what} is not valid JSON ({e})", hint="fix or re-create the file") from None
    if not isinstance(obj, dict):
        raise error_cls(f"{path}: {what} must be a JSON object, found {type(obj).__name__}")
    return obj


class _DirView:
    """The files of a checkpoint directory."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> str:
        return str(self.root / name)

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def json(self, name: str, what: str) -> dict:
        return read_json(self.root / name, what)

    def header(self, name: str) -> ShardHeader:
        return parse_header(self.root / name)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir())


class _ArchiveView:
    """The files of a ``.tar.zst`` checkpoint archive, read in one streaming pass: small files kept in
    memory, safetensors members reduced to their validated headers (tensors are read later, streaming)."""

    SMALL = 64 * 2**20

    def __init__(self, archive: Path):
        import tarfile

        import zstandard

        self.archive = archive
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, ShardHeader] = {}
        self.members: dict[str, str] = {}
        try:
            with open(archive, "rb") as fh, _tar_stream(fh) as tf:
                for ti in tf:
                    if not ti.isfile():
                        continue
                    name = Path(ti.name).name
                    if name in self.members:
                        raise InputError(f"{archive}: holds two files named {name!r}")
                    self.members[name] = ti.name
                    f = tf.extractfile(ti)
                    if name.endswith(".safetensors"):
                        self.headers[name] = parse_header_stream(f"{archive}{ARCHIVE_SEP}{ti.name}", f, ti.size)
                    elif ti.size <= self.SMALL:
                        self.files[name] = f.read()
        except (OSError, tarfile.TarError, zstandard.ZstdError) as e:
            raise InputError(f"{archive}: not a readable .tar.zst archive ({e})") from None

    def path(self, name: str) -> str:
        return f"{self.archive}{ARCHIVE_SEP}{self.members.get(name, name)}"

    def has(self, name: str) -> bool:
        return name in self.headers or name in self.files

    def json(self, name: str, what: str) -> dict:
        if name not in self.files:
            raise InputError(f"{self.archive}: missing {what}", hint=f"the archive must contain {name}")
        try:
            obj = json.loads(self.files[name].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{self.path(name)}: {what} is not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{self.path(name)}: {what} must be a JSON object")
        return obj

    def header(self, name: str) -> ShardHeader:
        return self.headers[name]

    def names(self) -> list[str]:
        return sorted(self.members)


def _tar_stream(fh):
    import tarfile

    import zstandard

    return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True), mode="r|")


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Index a base checkpoint (a directory, or a ``.tar.zst`` archive of one): validate config,
    index and every shard header."""
    root = Path(path)
    if root.is_file() and root.name.endswith(".tar.zst"):
        view = _ArchiveView(root)
        ckpt = _assemble(view, root)
        return Checkpoint(ckpt.path, ckpt.config, ckpt.tensors, ckpt.shard_files, ckpt.sharded, view.files)
    if not root.is_dir():
        raise InputError(
            f"{root}: base checkpoint directory not found", hint="pass a local Hugging Face model directory"
        )
    return _assemble(_DirView(root), root)


def _assemble(view, root: Path) -> Checkpoint:
    config = view.json("config.json", "config.json")
    index_path = view.path(INDEX_NAME)
    tensors: dict[str, TensorRef] = {}
    if view.has(INDEX_NAME):
        index = view.json(INDEX_NAME, "shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index_path}: has no 'weight_map' object", hint="re-save the checkpoint")
        files = []
        for f in weight_map.values():
            if not isinstance(f, str):
                raise InputError(f"{index_path}: weight_map values must be file names, found {f!r}")
            if f not in files:
                files.append(f)
        headers = {}
        for f in files:
            # a bare file name: no path components, so the index cannot point outside the directory; the
            # file itself may be a symlink (the Hugging Face cache links snapshots to blobs)
            if "/" in f or "\\" in f or f.startswith(".") or f != Path(f).name:
                raise InputError(f"{index_path}: shard name {f!r} points outside the checkpoint directory")
            if not view.has(f):
                raise InputError(
                    f"{index_path}: names shard {f!r}, which does not exist",
                    hint="the download is incomplete; fetch the missing shard",
                )
            headers[f] = view.header(f)
        missing = [k for k, f in weight_map.items() if k not in headers[f].tensors]
        if missing:
            raise InputError(
                f"{index_path}: {len(missing)} tensor(s) listed in the index are absent from their shard",
                details=[f"{k} (expected in {weight_map[k]})" for k in missing],
                hint="the index and shards are from different saves; re-download the checkpoint",
            )
        extra = [f"{k} (in {f})" for f, h in headers.items() for k in h.tensors if weight_map.get(k) != f]
        if extra:
            raise InputError(
                f"{index_path}: {len(extra)} tensor(s) in the shards are not listed in the index",
                details=extra,
                hint="the index and shards are from different saves; re-download the checkpoint",
            )
        for f in files:
            for ref in sorted(headers[f].tensors.values(), key=lambda r: r.offset):
                tensors[ref.name] = ref
        return Checkpoint(str(root), config, tensors, tuple(view.path(f) for f in files), True)
    single = SINGLE_NAME
    if not view.has(single) and view.has(SINGLE_NAME + ".zst"):
        single = SINGLE_NAME + ".zst"
    if not view.has(single):
        found = [n for n in view.names() if Path(n).suffix in {".safetensors", ".bin", ".pt", ".gguf"}]
        raise InputError(
            f"{root}: no {SINGLE_NAME} or {INDEX_NAME}",
            hint=(f"found {', '.join(found)}; " if found else "")
            + "streammerge reads safetensors checkpoints; convert .bin checkpoints with transformers first",
        )
    header = view.header(single)
    for ref in sorted(header.tensors.values(), key=lambda r: r.offset):
        tensors[ref.name] = ref
    return Checkpoint(str(root), config, tensors, (view.path(single),), False)


def stored_refs(src) -> list[TensorRef]:
    """The stored tensors behind a plan source: a TensorRef, or the parts of a quantized weight."""
    return [src] if isinstance(src, TensorRef) else [v for v in vars(src).values() if isinstance(v, TensorRef)]


class Reader:
    """Zero-copy access to tensors: one read-only private mmap per file, opened lazily.

    Tensors returned are read-only views of the page cache and cost no anonymous memory. The map
    is shared and read-only, so it does not count against ``RLIMIT_DATA`` either; callers copy
    before modifying (torch cannot mark a tensor read-only, so this is a rule of this package).
    """

    def __init__(self, drop_behind: bool = False) -> None:
        self._zst: dict[str, _ZstFile] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._fds: dict[str, int] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self.bytes_read = 0
        #: also drop finished tensors from the page cache (for a base larger than the RAM could cache)
        self.drop_behind = drop_behind

    def register_pickled(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        self._pickled[file] = tensors

    def _map(self, file: str) -> mmap.mmap:
        m = self._maps.get(file)
        if m is None:
            fd = os.open(file, os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except BaseException:
                os.close(fd)
                raise
            self._maps[file] = m
            self._fds[file] = fd
        return m

    def raw(self, ref: TensorRef, start: int = 0, length: int | None = None) -> memoryview:
        """The bytes ``[start, start+length)`` of a tensor, as a view of the map."""
        length = ref.nbytes - start if length is None else length
        self.bytes_read += length
        if ARCHIVE_SEP in ref.file or is_zst(ref.file):
            return self._zst_tensor_bytes(ref)[start : start + length]
        return memoryview(self._map(ref.file))[ref.offset + start : ref.offset + start + length]

    def _zst_tensor_bytes(self, ref: TensorRef) -> memoryview:
        key = ref.file.split(ARCHIVE_SEP, 1)[0]
        z = self._zst.get(key)
        if z is None:
            z = self._zst[key] = _TarZstFile(key) if ARCHIVE_SEP in ref.file else _ZstFile(ref.file)
        return z.tensor_bytes(ref)

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """The whole tensor as a zero-copy torch view (a CPU tensor of its stored dtype)."""
        if ref.offset < 0:
            self.bytes_read += ref.nbytes
            return self._pickled[ref.file][ref.name]
        tdtype = DTYPES[ref.dtype][1]
        if tdtype is None:
            raise InputError(
                f"{ref.file}: tensor {ref.name!r} has dtype {ref.dtype}, which this torch cannot compute on"
            )
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=tdtype)
        self.bytes_read += ref.nbytes
        if ARCHIVE_SEP in ref.file or is_zst(ref.file):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                flat = torch.frombuffer(self._zst_tensor_bytes(ref), dtype=torch.uint8)
            return flat.view(tdtype).view(ref.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": we never write to these views
            flat = torch.frombuffer(self._map(ref.file), dtype=torch.uint8, count=ref.nbytes, offset=ref.offset)
        return flat.view(tdtype).view(ref.shape)

    def prefetch(self, src, limit: int | None = None) -> None:
        """Ask the kernel to start reading a tensor that is needed next (``MADV_WILLNEED``): with a
        cold page cache its disk reads overlap the merge of the tensor before it. ``limit``: at most
        this many bytes of each stored tensor (its start)."""
        for ref in stored_refs(src):
            if ARCHIVE_SEP in ref.file or is_zst(ref.file) or ref.offset < 0 or ref.nbytes == 0:
                continue
            m = self._map(ref.file)
            start = ref.offset - ref.offset % mmap.PAGESIZE
            try:
                end = ref.offset + (ref.nbytes if limit is None else min(ref.nbytes, limit))
                m.madvise(mmap.MADV_WILLNEED, start, min(len(m), end) - start)
            except (OSError, ValueError, AttributeError):
                pass

    def release(self, src) -> None:
        """Drop this process's page mappings of a finished tensor (``src``: a TensorRef or a plan
        source holding several), so RSS stays small. The data stays in the page cache, unless
        ``drop_behind``: then it leaves the cache too (``POSIX_FADV_DONTNEED``)."""
        for ref in stored_refs(src):
            z = self._zst.get(ref.file.split(ARCHIVE_SEP, 1)[0])
            if z is not None:
                z.drop(ref)
            m = self._maps.get(ref.file)
            if m is None or ref.offset < 0 or not hasattr(mmap, "MADV_DONTNEED"):
                continue
            start = ref.offset - ref.offset % mmap.PAGESIZE
            end = min(len(m), ref.offset + ref.nbytes)
            if end > start:
                try:
                    m.madvise(mmap.MADV_DONTNEED, start, end - start)
                    if self.drop_behind:
                        os.posix_fadvise(self._fds[ref.file], start, end - start, os.POSIX_FADV_DONTNEED)
                except (OSError, ValueError, AttributeError):
                    pass

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the map is released with it
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()
        for z in self._zst.values():
            z.close()
        self._zst.clear()


class _ZstFile:
    """Tensors of a zstd-compressed safetensors file, by streaming decompression: the plan visits
    tensors in file order, so the stream only moves forward (a step back restarts it). One tensor is
    held decompressed at a time; small files (adapters) are decompressed whole once."""

    def __init__(self, path: str):
        import zstandard

        self.path = path
        self._zstd = zstandard
        self._whole: bytes | None = None
        self._fh = None
        self._stream = None
        self.pos = 0
        self._cur: tuple[str, memoryview] | None = None
        if os.path.getsize(path) <= ZSTD_WHOLE_FILE:
            with open(path, "rb") as f:
                self._whole = self._read_all(f)

    def _read_all(self, f) -> bytes:
        try:
            return self._zstd.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
        except self._zstd.ZstdError as e:
            raise InputError(f"{self.path}: corrupt compressed data ({e})") from None

    def _reopen(self) -> None:
        self.close()
        self._fh = open(self.path, "rb")  # noqa: SIM115 - held across calls, closed in close()
        self._stream = self._zstd.ZstdDecompressor().stream_reader(self._fh, read_across_frames=True)
        self.pos = 0

    def tensor_bytes(self, ref: TensorRef) -> memoryview:
        if self._whole is not None:
            return memoryview(self._whole)[ref.offset : ref.offset + ref.nbytes]
        if self._cur is not None and self._cur[0] == ref.name:
            return self._cur[1]
        if self._stream is None or ref.offset < self.pos:
            self._reopen()
        try:
            data = _skip_read(self._stream, ref.offset - self.pos, ref.nbytes)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read {ref.name!r}: {e}") from None
        if len(data) != ref.nbytes:
            raise InputError(f"{self.path}: truncated: {ref.name!r} ends past the end of the data")
        self.pos = ref.offset + ref.nbytes
        self._cur = (ref.name, memoryview(data))
        return self._cur[1]

    def drop(self, ref: TensorRef) -> None:
        if self._cur is not None and self._cur[0] == ref.name:
            self._cur = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = self._stream = None


def split_adapter_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight). A path that exists as given is never split."""
    m = re.fullmatch(r"(.+):([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)", spec)
    if m and not Path(spec).exists():
        return m.group(1), float(m.group(2))
    return spec, 1.0


class _TarZstFile:
    """Tensors inside a ``.tar.zst`` archive, read by streaming through it: members and offsets are
    visited in archive order (a step back restarts the stream); one tensor is held at a time."""

    def __init__(self, archive: str):
        self.archive = archive
        self._fh = None
        self._tf = None
        self._member: str | None = None
        self._mf = None
        self.pos = 0
        self._passed: set[str] = set()
        self._cur: tuple[str, memoryview] | None = None

    def _reopen(self) -> None:
        self.close()
        self._fh = open(self.archive, "rb")  # noqa: SIM115 - held across calls, closed in close()
        self._tf = _tar_stream(self._fh)
        self._member, self._mf, self.pos, self._passed = None, None, 0, set()

    def tensor_bytes(self, ref: TensorRef) -> memoryview:
        member = ref.file.split(ARCHIVE_SEP, 1)[1]
        if self._cur is not None and self._cur[0] == ref.file + ARCHIVE_SEP + ref.name:
            return self._cur[1]
        try:
            if self._tf is None or member in self._passed or (member == self._member and ref.offset < self.pos):
                self._reopen()
            while self._member != member:
                if self._member is not None:
                    self._passed.add(self._member)
                ti = self._tf.next()
                if ti is None:
                    raise InputError(f"{self.archive}: member {member!r} not found")
                if ti.isfile():
                    self._member, self._mf, self.pos = ti.name, self._tf.extractfile(ti), 0
            data = _skip_read(self._mf, ref.offset - self.pos, ref.nbytes)
        except Exception as e:  # OSError, EOFError, tarfile.TarError, zstandard.ZstdError
            if isinstance(e, InputError):
                raise
            raise InputError(f"{ref.file}: cannot read {ref.name!r}: {e}") from None
        if len(data) != ref.nbytes:
            raise InputError(f"{ref.file}: truncated: {ref.name!r} ends past the end of the member")
        self.pos = ref.offset + ref.nbytes
        self._cur = (ref.file + ARCHIVE_SEP + ref.name, memoryview(data))
        return self._cur[1]

    def drop(self, ref: TensorRef) -> None:
        if self._cur is not None and self._cur[0] == ref.file + ARCHIVE_SEP + ref.name:
            self._cur = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = self._tf = self._mf = None
