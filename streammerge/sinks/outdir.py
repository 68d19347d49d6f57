"""The output directory: a hidden work directory published atomically, its journal (for resume), the
lock on OUT, checksums, and the small files beside the weights. Shared by every sink."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

from ..errors import OutputError
from ..options import CHECKSUMS
from ..report import REPORT_NAME


def io_error(path: Path, e: OSError) -> OutputError:
    hint = "free some disk space and run again" if e.errno == 28 else "check permissions and free space"
    return OutputError(f"{path}: write failed: {e.strerror or e}", hint=hint)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, allow_nan=False)  # strict JSON: no NaN / Infinity
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise io_error(path, e) from e
    except ValueError as e:  # a non-finite number: a bug upstream, never a file that is not JSON
        raise OutputError(f"{path}: refusing to write a non-finite number into JSON ({e})") from e


def copy_file(src: Path | bytes, dst: Path) -> None:
    """Copy a file (or write bytes held in memory, e.g. from an archive) to ``dst``."""
    try:
        if isinstance(src, bytes):
            dst.write_bytes(src)
            return
        shutil.copyfile(src, dst)
    except OSError as e:
        raise io_error(dst, e) from e


def work_dir_for(out: Path) -> Path:
    """The hidden sibling directory a run writes into before renaming it to ``out``."""
    return out.parent / f".{out.name}.streammerge-partial"


def check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output that would clobber data or an input."""
    o = out.resolve()
    for i in inputs:
        r = i.resolve()
        if o == r or r in o.parents:
            raise OutputError(f"{out}: is inside the input {i}", hint="choose an output directory outside the inputs")
        if o in r.parents:
            raise OutputError(f"{out}: contains the input {i}", hint="choose an output directory that holds no input")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"{out}: exists and is not empty", hint="pass --overwrite to replace it, or choose another path"
        )


def finished_fingerprint(out: Path) -> str | None:
    """The fingerprint recorded in a finished output at ``out`` ("" when its report has none, or is not
    readable), or None when ``out`` holds no finished output."""
    path = out / REPORT_NAME
    if not path.is_file():
        return None
    try:
        fp = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return fp if isinstance(fp, str) else ""


class OutputLock:
    """An exclusive lock on OUT (``.OUT.streammerge.lock`` beside it, ``flock``): two runs writing the
    same output cannot both proceed. Released when the holder exits, even if it is killed."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.streammerge.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot create the lock file: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputError(
                f"{self.path.parent / self.path.name[1:].replace('.streammerge.lock', '')}: another streammerge "
                f"run is writing this output (pid {holder or '?'})",
                hint="wait for it to finish, or choose another output directory",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


class _Crc32:
    """zlib's crc32 behind hashlib's ``update``/``hexdigest``."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def hexdigest(self) -> str:
        return f"{self._crc:08x}"


def _hasher(algo: str):
    if algo == "xxh3":
        import xxhash

        return xxhash.xxh3_64()
    return hashlib.sha256() if algo == "sha256" else _Crc32()


class Digest:
    """A running checksum; ``hexdigest()`` is ``ALGO:HEX``. ``xxh3`` (XXH3-64, what ``xxhsum -H3``
    prints; about 10 GB/s on one core here), ``crc32`` (zlib's, 2.4 GB/s) or ``sha256`` (what
    ``sha256sum`` prints, 1.4 GB/s). All catch torn writes and flipped bits; only sha256 resists
    deliberate tampering."""

    def __init__(self, algo: str = "xxh3"):
        if algo not in CHECKSUMS:
            raise OutputError(f"unknown checksum {algo!r}", hint=f"use one of {', '.join(CHECKSUMS)}")
        self.algo = algo
        self._h = _hasher(algo)

    def update(self, data) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return f"{self.algo}:{self._h.hexdigest()}"


def file_checksum(path: Path, algo: str, chunk: int = 64 << 20) -> str:
    """``ALGO:HEX`` of a file's bytes."""
    h = Digest(algo)
    buf = bytearray(chunk)  # one buffer for the whole file: no fresh pages per chunk
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def algo_of(checksum: str) -> str:
    return checksum.partition(":")[0]


JOURNAL_NAME = "journal.json"


class Journal:
    """The record of a run in progress, inside its work directory: what the run is (a fingerprint of
    the inputs, options and plan) and which shards are complete, with their size and checksum. Each
    update is written to a temporary file, fsynced and renamed, so the journal itself is never torn."""

    def __init__(self, work: Path, fingerprint: dict):
        self.path = work / JOURNAL_NAME
        self.fingerprint = fingerprint
        self.shards: dict[str, dict] = {}

    @classmethod
    def load(cls, work: Path) -> Journal | None:
        p = work / JOURNAL_NAME
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            j = cls(work, obj["fingerprint"])
            j.shards = {str(k): dict(v) for k, v in obj["shards"].items()}
            return j
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        write_json(tmp, {"fingerprint": self.fingerprint, "shards": self.shards})
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def record(self, filename: str, nbytes: int, checksum: str) -> None:
        self.shards[filename] = {"bytes": nbytes, "checksum": checksum}
        self.save()

    def valid_shards(self) -> dict[str, dict]:
        """The recorded shards whose files are still there, complete and unchanged (re-hashed)."""
        ok = {}
        for name, rec in self.shards.items():
            p = self.path.parent / name
            try:
                want = rec["checksum"]
                if p.stat().st_size == rec["bytes"] and file_checksum(p, algo_of(want)) == want:
                    ok[name] = rec
            except OSError:
                pass
        return ok


def prepare_work_dir(out: Path, keep: bool = False) -> Path:
    """The hidden work directory for ``out``: emptied, unless ``keep`` (resuming) and it exists."""
    work = work_dir_for(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if work.exists() and keep:
            return work
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
    except OSError as e:
        raise OutputError(f"{work}: cannot create the work directory: {e.strerror or e}") from e
    return work


def commit_work_dir(work: Path, out: Path) -> None:
    """Atomically publish ``work`` as ``out`` (replacing an existing ``out``)."""
    fsync_dir(work)
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.streammerge-old"
            if old.exists():
                shutil.rmtree(old)
            os.rename(out, old)
        os.rename(work, out)
        fsync_dir(out.parent)
    except OSError as e:
        if old is not None and old.exists() and not out.exists():
            os.rename(old, out)
        raise OutputError(f"{out}: cannot move the finished output into place: {e.strerror or e}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_work_dir(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".zst")
SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json", REPORT_NAME}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files(adapter_dir: str | Path) -> dict[str, Path]:
    """The tokenizer files saved beside an adapter (they win over the base's: a resized vocabulary)."""
    return {n: Path(adapter_dir) / n for n in TOKENIZER_FILES if (Path(adapter_dir) / n).is_file()}


def aux_files(base: Path, adapters: list, ckpt=None) -> dict[str, Path | bytes]:
    """Files copied beside the weights: the base's non-weight files (from an archive: their bytes), then
    the adapters' tokenizer files."""
    files: dict[str, Path | bytes] = {}
    if ckpt is not None and ckpt.aux is not None:
        items = sorted(ckpt.aux.items())
    else:
        items = [(p.name, p) for p in sorted(base.iterdir()) if p.is_file()]
    for name, src in items:
        if not name.startswith(".") and name not in SKIP_FILES and not name.endswith(WEIGHT_SUFFIXES):
            files[name] = src
    for ad in adapters:
        files.update(tokenizer_files(ad.path))
    return files
