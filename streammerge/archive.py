"""Compressed inputs: ``*.safetensors.zst`` files and ``.tar.zst`` checkpoint archives, read by
streaming decompression in file order (one tensor held at a time)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError
from .header import ARCHIVE_SEP, ZSTD_WHOLE_FILE, ShardHeader, TensorRef, parse_header_stream, skip_read


class ArchiveView:
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
            with open(archive, "rb") as fh, tar_stream(fh) as tf:
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


def tar_stream(fh):
    import tarfile

    import zstandard

    return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True), mode="r|")


class ZstFile:
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
            data = skip_read(self._stream, ref.offset - self.pos, ref.nbytes)
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


class TarZstFile:
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
        self._tf = tar_stream(self._fh)
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
            data = skip_read(self._mf, ref.offset - self.pos, ref.nbytes)
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
