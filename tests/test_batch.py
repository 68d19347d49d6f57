"""Batch conversion: one pass over the base for N adapters, byte-identical to N separate merges."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.batch import batch, jobs_from_args, read_manifest
from streammerge.synthetic import write_synthetic_llama


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith(("model", "config"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A ~110 MB base and a training run with three checkpoints (different adapters) plus a broken one."""
    root = tmp_path_factory.mktemp("runs")
    base, ad = write_synthetic_llama(root, hidden=512, inter=1536, layers=12, vocab=16000, kv_heads=4, heads=8)
    sd = load_file(ad / "adapter_model.safetensors")
    for k, step in enumerate((500, 1000, 1500)):
        d = root / "runs" / "exp1" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        shutil.copy(ad / "adapter_config.json", d)
        save_file({n: t * (k + 1) for n, t in sd.items()}, d / "adapter_model.safetensors")
    bad = root / "runs" / "exp1" / "checkpoint-2000"
    bad.mkdir()
    shutil.copy(ad / "adapter_config.json", bad)
    save_file({n.replace("layers.3.", "layers.99."): t for n, t in sd.items()}, bad / "adapter_model.safetensors")
    return root, base


def test_one_pass_equals_separate_merges_and_isolates_failures(runs, tmp_path, monkeypatch):
    import streammerge.sinks.safetensors as st_sink
    from streammerge.sinks.safetensors import STAGE_BYTES

    staged = {}
    real_writer = st_sink.ShardWriter

    def recording_writer(path, *args):
        staged[path.parent.name.split(".streammerge")[0]] = args[-1]  # stage_bytes, per job
        return real_writer(path, *args)

    monkeypatch.setattr(st_sink, "ShardWriter", recording_writer)
    root, base = runs
    jobs = jobs_from_args(tmp_path / "merged", [str(root / "runs" / "*" / "checkpoint-*")], {"shard_size": "30MB"})
    assert [j.name for j in jobs] == [f"exp1-checkpoint-{s}" for s in (1000, 1500, 2000, 500)]
    results = batch(base, jobs)
    assert len(staged) == 3 and sum(staged.values()) <= STAGE_BYTES  # the jobs share one staging budget
    status = {r.name: r.status for r in results}
    failed = next(r for r in results if r.status == "failed")
    assert failed.name == "exp1-checkpoint-2000" and "match no tensor of the base" in failed.error
    assert sum(s == "ok" for s in status.values()) == 3
    assert not (tmp_path / "merged" / "exp1-checkpoint-2000").exists()
    for j in jobs:
        if status[j.name] != "ok":
            continue
        sep = tmp_path / "sep" / j.name
        streammerge.merge(base, j.adapters[0], sep, shard_size="30MB")
        assert _files(j.out) == _files(sep), j.name
        rep = json.loads((j.out / "streammerge_report.json").read_text())
        assert rep["work_buffer_bytes"] <= 128 * 2**20  # one shared set of buffers, not one per job


def test_base_is_read_from_storage_once(runs, tmp_path):
    """With the base evicted from the page cache, 3 jobs read it from storage about once, not 3 times."""
    root, base = runs
    for f in base.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)  # dirty pages (the fixture just wrote them) cannot be evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

    def storage_reads():
        with open("/proc/self/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("read_bytes"))

    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    adapters = [str(root / "runs" / "exp1" / f"checkpoint-{s}") for s in (500, 1000, 1500)]
    before = storage_reads()
    results = batch(base, jobs_from_args(tmp_path / "m", adapters, {}))
    read = storage_reads() - before
    assert all(r.status == "ok" for r in results)
    if read == 0:
        pytest.skip("this filesystem does not report storage reads (or ignored the eviction)")
    assert read < 1.3 * size, (read, size)


def test_manifest_per_job_options_and_resume(runs, tmp_path):
    root, base = runs
    manifest = tmp_path / "jobs.toml"
    manifest.write_text(
        f"""
base = "{base}"
out_root = "out"
[defaults]
dtype = "bf16"
[[job]]
adapter = "{root / "runs/exp1/checkpoint-500"}"
name = "first"
dtype = "fp32"
[[job]]
adapter = "{root / "runs/exp1/checkpoint-1000"}"
shard_size = "20MB"
save_method = "merged_16bit"
"""
    )
    _, out_root, jobs = read_manifest(manifest)
    assert out_root == tmp_path / "out" and [j.name for j in jobs] == ["first", "exp1-checkpoint-1000"]
    cmd = [sys.executable, "-m", "streammerge", "batch", "--manifest", str(manifest), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = {x["name"]: x for x in json.loads(r.stdout)}
    assert all(x["status"] == "ok" for x in res.values())
    first = json.loads((tmp_path / "out" / "first" / "config.json").read_text())
    assert first.get("dtype", first.get("torch_dtype")) == "float32"
    assert len(list((tmp_path / "out" / "exp1-checkpoint-1000").glob("model-*.safetensors"))) >= 3
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert r.returncode == 0 and all(x["status"] == "skipped" for x in json.loads(r.stdout))


def test_cli_batch_exit_code_and_table(runs, tmp_path):
    root, base = runs
    cmd = [
        sys.executable,
        "-m",
        "streammerge",
        "batch",
        str(base),
        str(tmp_path / "o"),
        str(root / "runs/exp1/checkpoint-500"),
        str(root / "runs/exp1/checkpoint-2000"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1
    assert "| exp1-checkpoint-500 | ok |" in r.stdout and "| exp1-checkpoint-2000 | failed |" in r.stdout
