"""Failure and recovery: killed runs resume to byte-identical output, a full disk is resumable,
changed inputs refuse to resume, and verify catches corruption."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import streammerge
import streammerge.sinks.safetensors as run_mod
from streammerge.errors import OutputError
from streammerge.synthetic import write_synthetic_llama
from streammerge.verify import verify


def _model_files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith("model")}


@pytest.fixture(scope="module")
def mid_pair(tmp_path_factory):
    """About 110 MB in 6 input shards: long enough to kill mid-run."""
    root = tmp_path_factory.mktemp("mid")
    base, ad = write_synthetic_llama(
        root, hidden=512, inter=1536, layers=12, vocab=16000, kv_heads=4, heads=8, shards=6
    )
    ref = root / "ref"
    streammerge.merge(base, ad, ref, shard_size="12MB")
    return base, ad, ref


def _recorded(work) -> int:
    """How many shards the run's journal records as complete (-1: no journal yet)."""
    try:
        return len(json.loads((work / "journal.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return -1


def test_sigkill_at_random_points_then_resume_is_byte_identical(mid_pair, tmp_path):
    base, ad, ref = mid_pair
    want = _model_files(ref)
    shards = len([n for n in want if n.endswith(".safetensors")])
    assert shards >= 6
    rng = random.Random(1234)
    cmd = [sys.executable, "-m", "streammerge", "merge", str(base), str(ad), "--shard-size", "12MB", "-q"]
    kills = 0
    for i in range(4):
        out = tmp_path / f"o{i}"
        work = tmp_path / f".o{i}.streammerge-partial"
        proc = subprocess.Popen([*cmd[:-3], str(out), *cmd[-3:]])
        # kill at a random point of the run's progress (a random number of shards done, then a random
        # moment into the next): a point in time would miss the run on a faster machine
        target = rng.randrange(0, shards - 2)
        deadline = time.time() + 60
        while _recorded(work) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.02))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if not out.exists():
            assert work.exists()
            r = subprocess.run([*cmd[:-3], str(out), *cmd[-3:], "--resume"], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        assert _model_files(out) == want
        assert not work.exists()
    assert kills >= 3


def test_disk_full_is_clean_and_resumable(mid_pair, tmp_path, monkeypatch):
    base, ad, ref = mid_pair
    real = run_mod.ShardWriter._advance  # every byte passes here, copied in or merged in place
    written = {"n": 0}

    def enospc(self, nbytes):
        written["n"] += nbytes
        if written["n"] > 60_000_000:
            raise OutputError(f"{self.path}: write failed: {os.strerror(errno.ENOSPC)}", hint="free some disk space")
        real(self, nbytes)

    monkeypatch.setattr(run_mod.ShardWriter, "_advance", enospc)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left"):
        streammerge.merge(base, ad, out, shard_size="12MB")
    assert not out.exists()
    assert (tmp_path / ".out.streammerge-partial" / "journal.json").exists()
    monkeypatch.setattr(run_mod.ShardWriter, "_advance", real)
    rep = streammerge.merge(base, ad, out, shard_size="12MB", resume=True)
    assert rep.resumed_shards >= 3
    assert _model_files(out) == _model_files(ref)


def test_real_oserror_enospc_is_an_output_error(tmp_path, llama_pair, monkeypatch):
    """The writer turns ENOSPC from the OS into an OutputError that says to free space."""
    from streammerge.sinks.safetensors import ShardWriter

    w = ShardWriter(tmp_path / "x.safetensors", [("a", "U8", (4,))])

    class Full:
        def write(self, _):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    w._f = Full()
    with pytest.raises(OutputError, match="free some disk space"):
        w.write("a", b"1234")


def test_resume_refuses_changed_inputs_or_options(mid_pair, tmp_path, monkeypatch):
    base, ad, _ = mid_pair
    real = run_mod.ShardWriter._advance
    n = {"c": 0}

    def stop(self, nbytes):
        n["c"] += 1
        if n["c"] == 30:
            raise KeyboardInterrupt
        real(self, nbytes)

    monkeypatch.setattr(run_mod.ShardWriter, "_advance", stop)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge(base, ad, out, shard_size="12MB")
    monkeypatch.setattr(run_mod.ShardWriter, "_advance", real)
    with pytest.raises(OutputError, match="cannot resume: the options"):
        streammerge.merge(base, ad, out, shard_size="12MB", dtype="fp32", resume=True)
    cfg = ad / "adapter_config.json"
    saved = cfg.read_text()
    try:
        c = json.loads(saved)
        cfg.write_text(json.dumps({**c, "lora_alpha": c["lora_alpha"] * 2}))
        with pytest.raises(OutputError, match="cannot resume: the inputs"):
            streammerge.merge(base, ad, out, shard_size="12MB", resume=True)
    finally:
        cfg.write_text(saved)
        os.utime(cfg)
    # without --resume the partial output is discarded and the run starts over
    streammerge.merge(base, ad, out, shard_size="12MB")
    assert out.exists()


def test_verify_passes_then_catches_flipped_byte_and_missing_shard(mid_pair, tmp_path):
    import shutil

    base, ad, ref = mid_pair
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    ok = verify(out, base, [ad], sample=8)
    assert ok.ok, ok.problems
    assert ok.checksums_checked >= 5 and ok.recomputed == 8
    assert verify(out, base, [ad]).recomputed == ok.tensors  # all
    shard = sorted(out.glob("model-*.safetensors"))[2]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor of that shard
    shard.write_bytes(bytes(data))
    bad = verify(out, base, [ad])
    assert any("checksum differs" in p for p in bad.problems)
    assert any("differs from its recomputation" in p for p in bad.problems)
    # structure-only checks (no inputs) still catch it through the checksum
    assert any("checksum differs" in p for p in verify(out).problems)
    missing = sorted(out.glob("model-*.safetensors"))[0]
    missing.unlink()
    gone = verify(out)
    assert not gone.ok and any(missing.name in p for p in gone.problems)


def test_verify_cli_and_merge_verify(mid_pair, tmp_path):
    base, ad, _ref = mid_pair
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "streammerge",
            "merge",
            str(base),
            str(ad),
            str(out),
            "--verify",
            "--verify-sample",
            "5",
            "--shard-size",
            "12MB",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "streammerge", "verify", str(out), "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0 and json.loads(r.stdout)["ok"]
    (out / "model.safetensors.index.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "streammerge", "verify", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and "FAILED" in r.stdout


@pytest.mark.parametrize("algo", ["xxh3", "crc32", "sha256"])
def test_checksums_match_the_reference_tools(algo, llama_pair, tmp_path):
    """Each shard's checksum is the library digest of the file on disk (xxh3: what ``xxhsum -H3`` prints,
    sha256: ``sha256sum``), and the choice of checksum changes no output byte."""
    import hashlib
    import zlib

    import xxhash

    base, ad = llama_pair
    ref = tmp_path / "ref"
    streammerge.merge(base, ad, ref, shard_size="60KB", checksum="sha256")
    out = tmp_path / "out"
    rep = streammerge.merge(base, ad, out, shard_size="60KB", checksum=algo)
    digest = {
        "xxh3": lambda b: xxhash.xxh3_64(b).hexdigest(),
        "crc32": lambda b: f"{zlib.crc32(b):08x}",
        "sha256": lambda b: hashlib.sha256(b).hexdigest(),
    }[algo]
    assert len(rep.shards) > 1
    for s in rep.shards:
        data = (out / s["file"]).read_bytes()
        assert s["checksum"] == f"{algo}:{digest(data)}"
        assert data == (ref / s["file"]).read_bytes()
    assert verify(out).ok


def test_disk_full_in_the_direct_io_writes_is_resumable(mid_pair, tmp_path, monkeypatch):
    """ENOSPC raised by the OS in the writer's threads (the O_DIRECT writes) stops the run with a
    clear error, leaves nothing at OUT, and the run resumes to the same bytes."""
    import threading

    base, ad, ref = mid_pair
    real_write = os.write
    seen = {"bytes": 0}

    def filling(fd, buf):
        if threading.current_thread().name.startswith(("streammerge-io", "streammerge-writer")):
            seen["bytes"] += len(buf)
            if seen["bytes"] > 20 * 2**20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", filling)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left") as e:
        streammerge.merge(base, ad, out, shard_size="12MB")
    assert "free some disk space" in str(e.value.hint)
    assert not out.exists() and seen["bytes"] > 0
    monkeypatch.setattr(os, "write", real_write)
    rep = streammerge.merge(base, ad, out, shard_size="12MB", resume=True)
    assert rep.resumed_shards >= 1
    assert _model_files(out) == _model_files(ref)


@pytest.mark.parametrize("method", ["merged_16bit", "lora"])
def test_resume_on_a_finished_output_is_a_no_op(llama_pair, tmp_path, method):
    """A retry loop (``merge ... --resume`` until exit 0) must not fail after a success."""
    from streammerge.cli import main

    base, ad = llama_pair
    out = tmp_path / "out"
    streammerge.merge(base, ad, out, save_method=method)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    rep = streammerge.merge(base, ad, out, save_method=method, resume=True)
    assert rep.up_to_date and "already the finished output" in rep.notes[0]
    cmd = ["merge", str(base), str(ad), str(out), "--resume", "--quiet", "--save-method", method]
    assert main(cmd) == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_resume_on_a_different_finished_output_is_an_error(llama_pair, tmp_path):
    base, ad = llama_pair
    out = tmp_path / "out"
    streammerge.merge(base, ad, out)
    with pytest.raises(OutputError, match="finished output of other inputs or options"):
        streammerge.merge(base, ad, out, dtype="fp32", resume=True)
    with pytest.raises(OutputError, match="finished output of other inputs or options"):
        streammerge.merge(base, f"{ad}:0.5", out, resume=True)
    (out / "streammerge_report.json").unlink()  # not a finished output: an occupied directory
    with pytest.raises(OutputError, match="exists and is not empty"):
        streammerge.merge(base, ad, out, resume=True)


def test_batch_resume_skips_only_jobs_finished_from_the_same_inputs(llama_pair, tmp_path):
    from streammerge.batch import JobSpec, batch

    base, ad = llama_pair
    jobs = [JobSpec("a", [str(ad)], tmp_path / "a"), JobSpec("b", [f"{ad}:0.5"], tmp_path / "b")]
    assert [r.status for r in batch(base, jobs)] == ["ok", "ok"]
    assert [r.status for r in batch(base, jobs, resume=True)] == ["skipped", "skipped"]
    other = [JobSpec("a", [f"{ad}:0.25"], tmp_path / "a"), jobs[1]]
    res = batch(base, other, resume=True)
    assert [r.status for r in res] == ["failed", "skipped"] and "other inputs or options" in res[0].error
