"""The safetensors sink: a header-first incremental shard writer (``O_DIRECT`` staging, zstd archives).

The ``safetensors`` library only serializes whole dicts. Here every output name, dtype and shape is
known from the plan, so a shard's header is written first and tensor bytes are streamed after it in
order, one block at a time; the writer checks that exactly the announced bytes arrive.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..source import DTYPES, numel
from ..version import __version__
from .outdir import (
    Digest,
    check_output,
    commit_work_dir,
    copy_file,
    discard_work_dir,
    file_checksum,
    io_error,
    prepare_work_dir,
    write_json,
)

HEADER_ALIGN = 8
DIRECT_ALIGN = 4096  # O_DIRECT: file offsets, lengths and buffer addresses in multiples of this
STAGE_BYTES = 32 * 1024 * 1024  # the O_DIRECT staging buffers, both halves (part of the --max-memory budget)


def build_header(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length prefix plus the JSON header (space-padded to 8 bytes, as safetensors does)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in specs:
        n = numel(shape) * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % HEADER_ALIGN)
    return len(raw).to_bytes(8, "little") + raw


class DirectFile:
    """A write-only file written with ``O_DIRECT``, past the page cache: bytes are gathered in two
    page-aligned staging buffers; while one fills, an I/O thread hashes the other (``digest``) and
    writes it to the disk in one large aligned write. The last partial block is written after
    ``O_DIRECT`` is cleared. ``open`` returns None where the filesystem refuses ``O_DIRECT`` (tmpfs,
    some FUSE); the caller then writes buffered. Bytes arrive by ``write`` (copied in) or are produced
    in place: ``reserve`` lends the next free part of a staging buffer, ``commit`` appends it."""

    def __init__(self, fd: int, stage_bytes: int = STAGE_BYTES, digest: Digest | None = None):
        half = max(DIRECT_ALIGN, stage_bytes // 2 // DIRECT_ALIGN * DIRECT_ALIGN)
        self._fd = fd
        self._digest = digest
        self._bufs = [mmap.mmap(-1, half) for _ in range(2)]
        self._mvs = [memoryview(b) for b in self._bufs]
        self._arrs = [np.frombuffer(b, dtype=np.uint8) for b in self._bufs]
        self._cur = 0
        self._fill = 0
        self._direct = True
        self._pending: Future | None = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="streammerge-io")

    @classmethod
    def open(cls, path: Path, stage_bytes: int = STAGE_BYTES, digest: Digest | None = None) -> DirectFile | None:
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        try:
            return cls(fd, stage_bytes, digest)
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        src = np.frombuffer(mv, dtype=np.uint8)
        off = 0
        while off < mv.nbytes:
            k = min(mv.nbytes - off, len(self._mvs[self._cur]) - self._fill)
            # numpy copies without the GIL (a memoryview slice assignment holds it for the whole memcpy,
            # stalling the merging thread between its torch calls)
            np.copyto(self._arrs[self._cur][self._fill : self._fill + k], src[off : off + k])
            off += k
            self.commit(k)

    def reserve(self, n: int, align: int = 1) -> memoryview | None:
        """The next ``n`` bytes of the staging buffer, to be filled in place and then ``commit``-ted;
        None when fewer than ``n`` are left in it or its fill is not a multiple of ``align``."""
        buf = self._mvs[self._cur]
        if len(buf) - self._fill < n or self._fill % align:
            return None
        return buf[self._fill : self._fill + n]

    def commit(self, k: int) -> None:
        """``k`` more bytes of the staging buffer are filled: when it is full, it goes to the disk."""
        self._fill += k
        buf = self._mvs[self._cur]
        if self._fill == len(buf):
            self._wait()
            self._pending = self._io.submit(self._write_all, buf)
            self._cur ^= 1
            self._fill = 0

    def _wait(self) -> None:
        """Let the write in flight finish (and raise its error, if it failed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_all(self, mv: memoryview) -> None:
        if self._digest is not None:
            self._digest.update(mv)
        done = 0
        while done < len(mv):
            try:
                k = os.write(self._fd, mv[done:])
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                self._buffered()  # the device wants a larger alignment than ours: write buffered
                continue
            if k <= 0:
                raise OSError(errno.EIO, "write returned 0")
            done += k
            if k % DIRECT_ALIGN and self._direct:  # a short, unaligned write: go on buffered
                self._buffered()

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def flush(self) -> None:
        """Write everything staged: the aligned part directly, the tail buffered."""
        self._wait()
        buf, n = self._mvs[self._cur], self._fill
        aligned = n // DIRECT_ALIGN * DIRECT_ALIGN
        if aligned:
            self._write_all(buf[:aligned])
        if n > aligned:
            if self._direct:
                self._buffered()
            self._write_all(buf[aligned:n])
        self._fill = 0

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        self._io.shutdown(wait=True)  # the I/O thread may still be reading a buffer
        self._arrs = []  # numpy's views hold exports of the buffers
        try:
            for mv, b in zip(self._mvs, self._bufs, strict=True):
                try:
                    mv.release()
                    b.close()
                except BufferError:
                    pass  # a view is still alive (an error's traceback): the buffer goes with it
        finally:
            os.close(fd)


class ShardWriter:
    """Streams the tensors of one shard, in the announced order, behind a header written first.
    Plain shards are written with ``O_DIRECT`` where the filesystem allows it (``direct``)."""

    def __init__(
        self,
        path: Path | str,
        specs: list[tuple[str, str, tuple[int, ...]]],
        metadata=None,
        zstd_level: int | None = None,
        checksum: str = "xxh3",
        direct: bool = True,
        stage_bytes: int = STAGE_BYTES,
        head: bytes | None = None,
        sizes: list[tuple[str, int]] | None = None,
    ):
        """``head`` and ``sizes`` (name, bytes): another file format's header and tensor sizes instead
        of a safetensors header built from ``specs`` (the GGUF sink)."""
        self.path = Path(path)
        self._specs = sizes if sizes is not None else [(n, numel(s) * DTYPES[dt][0]) for n, dt, s in specs]
        self._i = 0
        self._left = self._specs[0][1] if self._specs else 0
        header = head if head is not None else build_header(specs, metadata)
        self._algo = checksum
        self._hash = Digest(checksum)
        self._raw = None
        try:
            # an O_DIRECT file hashes its staging buffers on its I/O thread, as they go to the disk
            direct_file = DirectFile.open(self.path, stage_bytes, self._hash) if direct and zstd_level is None else None
            self.direct = direct_file is not None
            self._f = direct_file or open(self.path, "wb")  # noqa: SIM115 - held open across write() calls
            if not self.direct:
                self._hash.update(header)
            if zstd_level is not None:
                import zstandard

                total = len(header) + sum(n for _, n in self._specs)
                self._raw = self._f
                cctx = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, threads=-1)
                self._f = cctx.stream_writer(self._raw, size=total, closefd=False)
            self._f.write(header)
        except OSError as e:
            raise io_error(self.path, e) from e
        self.bytes_written = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._i < len(self._specs) and self._left == 0:
            self._i += 1
            self._left = self._specs[self._i][1] if self._i < len(self._specs) else 0

    def _expect(self, name: str, nbytes: int) -> None:
        """Bytes for ``name`` are next, and no more than it has left."""
        if self._i >= len(self._specs) or self._specs[self._i][0] != name:
            expected = self._specs[self._i][0] if self._i < len(self._specs) else "nothing"
            raise OutputError(f"{self.path}: writer got bytes for {name!r}, expected {expected!r}")
        if nbytes > self._left:
            raise OutputError(f"{self.path}: {name!r} got {nbytes} bytes, only {self._left} left to write")

    def _advance(self, nbytes: int) -> None:
        self._left -= nbytes
        self.bytes_written += nbytes
        if self._left == 0:
            self._i += 1
            self._left = self._specs[self._i][1] if self._i < len(self._specs) else 0
            self._skip_empty()

    def write(self, name: str, data) -> None:
        """Append bytes (any buffer: bytes, memoryview, numpy array) belonging to tensor ``name``."""
        mv = memoryview(data).cast("B")
        self._expect(name, mv.nbytes)
        try:
            self._f.write(mv)
        except OSError as e:
            raise io_error(self.path, e) from e
        if not self.direct:
            self._hash.update(mv)
        self._advance(mv.nbytes)

    def reserve(self, name: str, nbytes: int, align: int = 1) -> memoryview | None:
        """Where the next ``nbytes`` of ``name`` can be produced in place (the ``O_DIRECT`` staging
        buffer), to be ``commit``-ted; None when that is not possible (not ``O_DIRECT``, the staging
        buffer has less room left, or its fill is not a multiple of ``align``): then ``write`` them."""
        self._expect(name, nbytes)
        return self._f.reserve(nbytes, align) if self.direct else None

    def commit(self, name: str, nbytes: int) -> None:
        """The ``nbytes`` lent by ``reserve`` are filled."""
        self._expect(name, nbytes)
        try:
            self._f.commit(nbytes)
        except OSError as e:
            raise io_error(self.path, e) from e
        self._advance(nbytes)

    def close(self) -> None:
        """Check completeness, flush and fsync."""
        if self._i < len(self._specs):
            self._f.close()
            raise OutputError(f"{self.path}: closed before {self._specs[self._i][0]!r} was complete")
        try:
            if self._raw is not None:
                import zstandard

                self._f.flush(zstandard.FLUSH_FRAME)
                self._f.close()
                self._f = self._raw
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            raise io_error(self.path, e) from e
        if self._raw is not None:  # the journal and report hold the hash of the file on disk
            self._file_digest = file_checksum(self.path, self._algo)

    @property
    def checksum(self) -> str:
        """``ALGO:HEX`` of the finished file as it is on disk (for a compressed shard: compressed)."""
        return getattr(self, "_file_digest", None) or self._hash.hexdigest()

    def abort(self) -> None:
        try:
            self._f.close()
            if self._raw is not None:
                self._raw.close()
        except OSError:
            pass


MIN_STAGE_BYTES = 256 * 1024  # a writer's staging when many share the budget: two 128 KiB halves


def staging_bytes(opts) -> int:
    """The writer's O_DIRECT staging, out of the ``--max-memory`` budget: 32 MiB, or a quarter of a
    small budget (none when writing compressed or buffered)."""
    if not opts.direct_io or opts.compress is not None:
        return 0
    return min(STAGE_BYTES, opts.block_bytes // 4)


def open_shard_writer(path: Path, shard, opts, sharing: int = 1) -> ShardWriter:
    """The writer of one planned shard with the run's compression, checksum and O_DIRECT staging;
    ``sharing``: how many writers are open at once and split the staging budget (a batch's jobs)."""
    return ShardWriter(
        path,
        [o for j in shard.jobs for o in j.outputs],
        {"format": "pt", "streammerge": __version__},
        opts.compress,
        opts.checksum,
        opts.direct_io,
        max(MIN_STAGE_BYTES, staging_bytes(opts) // sharing),
    )


def decompress_dir(src: Path, dst: Path, overwrite: bool = False) -> list[str]:
    """Restore a ``--compress`` output: every ``*.safetensors.zst`` decompressed, the index renamed
    back, other files copied; byte-identical to the uncompressed output. Atomic like a merge."""
    import zstandard

    if not src.is_dir():
        raise OutputError(f"{src}: not a directory")
    check_output(dst, [src], overwrite)
    work = prepare_work_dir(dst)
    done = []
    try:
        for p in sorted(src.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.name.endswith(".safetensors.zst"):
                target = work / p.name[: -len(".zst")]
                try:
                    with open(p, "rb") as fin, open(target, "wb") as fout:
                        zstandard.ZstdDecompressor().copy_stream(fin, fout, write_size=8 << 20)
                        fout.flush()
                        os.fsync(fout.fileno())
                except zstandard.ZstdError as e:
                    raise OutputError(f"{p}: corrupt compressed data ({e})") from None
                except OSError as e:
                    raise io_error(target, e) from e
                done.append(target.name)
            elif p.name == "model.safetensors.index.json":
                index = json.loads(p.read_text(encoding="utf-8"))
                wm = index.get("weight_map", {})
                index["weight_map"] = {k: v[:-4] if v.endswith(".zst") else v for k, v in wm.items()}
                write_json(work / p.name, index)
            else:
                copy_file(p, work / p.name)
        commit_work_dir(work, dst)
    except BaseException:
        discard_work_dir(work)
        raise
    return done
