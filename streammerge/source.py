"""Reading checkpoints: shard indexes, configs, and zero-copy mmap views of tensors.

This module (with :mod:`streammerge.header` and :mod:`streammerge.archive`) and the sinks are the only
places that touch tensor files.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .archive import ArchiveView, TarZstFile, ZstFile
from .errors import InputError
from .header import (
    ARCHIVE_SEP,
    CONFIG_DTYPE_NAME,
    DTYPE_ALIASES,
    DTYPES,
    FLOAT_DTYPES,
    FLOAT_NAMES,
    ShardHeader,
    TensorRef,
    is_zst,
    numel,
    parse_header,
    st_dtype,
    torch_dtype,
)

COPY_CHUNK = 64 * 1024 * 1024  # bytes of a pass-through tensor handed to the writer at a time

__all__ = [
    "CONFIG_DTYPE_NAME",
    "DTYPES",
    "DTYPE_ALIASES",
    "FLOAT_DTYPES",
    "Checkpoint",
    "Reader",
    "TensorRef",
    "numel",
    "open_checkpoint",
    "parse_header",
    "st_dtype",
    "torch_dtype",
]
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


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


def config_dtype(config: dict) -> str | None:
    """The model dtype config.json declares (``dtype`` or ``torch_dtype``, also under ``text_config``)."""
    for cfg in (config, config.get("text_config") or {}):
        name = cfg.get("dtype", cfg.get("torch_dtype")) if isinstance(cfg, dict) else None
        if isinstance(name, str) and name in FLOAT_NAMES:
            return FLOAT_NAMES[name]
    return None


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


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Index a base checkpoint (a directory, or a ``.tar.zst`` archive of one): validate config,
    index and every shard header."""
    root = Path(path)
    if root.is_file() and root.name.endswith(".tar.zst"):
        view = ArchiveView(root)
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


def tensor_bytes(t) -> memoryview:
    """A tensor's bytes (moved to the CPU, made contiguous) as a flat memoryview."""
    import torch

    return memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


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
        self._zst: dict[str, ZstFile] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._fds: dict[str, int] = {}
        self._pickled: dict[str, dict] = {}
        self.bytes_read = 0
        #: also drop finished tensors from the page cache (for a base larger than the RAM could cache)
        self.drop_behind = drop_behind

    def register_pickled(self, file: str, tensors: dict) -> None:
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

    def chunks(self, ref: TensorRef, chunk: int = COPY_CHUNK):
        """A tensor's stored bytes as views of the map, ``chunk`` bytes at a time (for pass-through)."""
        for off in range(0, ref.nbytes, chunk):
            yield self.raw(ref, off, min(chunk, ref.nbytes - off))

    def _zst_tensor_bytes(self, ref: TensorRef) -> memoryview:
        key = ref.file.split(ARCHIVE_SEP, 1)[0]
        z = self._zst.get(key)
        if z is None:
            z = self._zst[key] = TarZstFile(key) if ARCHIVE_SEP in ref.file else ZstFile(ref.file)
        return z.tensor_bytes(ref)

    def tensor(self, ref: TensorRef):
        """The whole tensor as a zero-copy torch view (a CPU tensor of its stored dtype)."""
        if ref.offset < 0:
            self.bytes_read += ref.nbytes
            return self._pickled[ref.file][ref.name]
        import torch

        tdtype = torch_dtype(ref.dtype)
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


def split_adapter_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight). A path that exists as given is never split."""
    m = re.fullmatch(r"(.+):([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)", spec)
    if m and not Path(spec).exists():
        return m.group(1), float(m.group(2))
    return spec, 1.0


def drop_behind_if_large(reader: Reader, ckpt: Checkpoint, notes: list[str] | None = None) -> None:
    """A base larger than half the RAM cannot stay cached until a next run anyway: drop each tensor's
    pages from the page cache once it is merged, so the merge does not push out what other programs
    keep cached (the output bypasses the cache already, with O_DIRECT)."""
    import psutil

    ram = psutil.virtual_memory().total
    if ckpt.total_bytes > ram // 2:
        reader.drop_behind = True
        if notes is not None:
            notes.append(
                f"the base ({ckpt.total_bytes / 1e9:.1f} GB) is larger than half the RAM ({ram / 1e9:.1f} GB): "
                "its pages leave the page cache as they are merged"
            )
