"""Shards on worker processes and on a local Ray cluster: byte-identical to the single-process run."""

from __future__ import annotations

import pytest

import streammerge
from streammerge.synthetic import write_synthetic_llama


def _model_files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith(("model", "config"))}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base, ad = write_synthetic_llama(root, hidden=256, inter=768, layers=6, vocab=8000, kv_heads=2, heads=4)
    ref = root / "ref"
    streammerge.merge(base, ad, ref, shard_size="4MB")
    return base, ad, ref


def test_local_processes_equal_single_process(pair, tmp_path):
    base, ad, ref = pair
    out = tmp_path / "out"
    rep = streammerge.merge(base, ad, out, shard_size="4MB", executor="local", workers=2)
    assert len(rep.shards) >= 4 and rep.device == "cpu"
    assert any("2 local worker(s)" in n or "1 local worker(s)" in n for n in rep.notes)
    assert _model_files(out) == _model_files(ref)
    assert all(s["checksum"].startswith("xxh3:") for s in rep.shards)


def test_ray_local_cluster_equals_single_process(pair, tmp_path):
    ray = pytest.importorskip("ray")
    base, ad, ref = pair
    out = tmp_path / "out"
    try:
        rep = streammerge.merge(base, ad, out, shard_size="4MB", executor="ray", workers=2)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert any("ray worker(s)" in n for n in rep.notes)
    assert _model_files(out) == _model_files(ref)


def test_local_executor_resumes_and_retries(pair, tmp_path, monkeypatch):
    """A run whose driver is interrupted keeps its finished shards; --resume finishes the rest."""
    import streammerge.distributed as dist

    base, ad, ref = pair
    real = dist.run_distributed

    def interrupted(plan, todo, *a, **k):
        real(plan, todo[:2], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(dist, "run_distributed", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge(base, ad, out, shard_size="4MB", executor="local", workers=2)
    monkeypatch.setattr(dist, "run_distributed", real)
    rep = streammerge.merge(base, ad, out, shard_size="4MB", executor="local", workers=2, resume=True)
    assert rep.resumed_shards == 2
    assert _model_files(out) == _model_files(ref)


def test_batch_on_local_workers_equals_one_pass(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    from streammerge.batch import batch, jobs_from_args

    base, ad, _ = pair
    sd = load_file(ad / "adapter_model.safetensors")
    ads = []
    for k in range(2):
        d = tmp_path / "runs" / f"checkpoint-{k}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
        save_file({n: t * (k + 2) for n, t in sd.items()}, d / "adapter_model.safetensors")
        ads.append(str(d))
    one = batch(base, jobs_from_args(tmp_path / "one", ads, {"shard_size": "4MB"}))
    many = batch(base, jobs_from_args(tmp_path / "many", ads, {"shard_size": "4MB"}), executor="local", workers=2)
    assert all(r.status == "ok" for r in one + many)
    for r1, r2 in zip(one, many, strict=True):
        assert _model_files(tmp_path / "one" / r1.name) == _model_files(tmp_path / "many" / r2.name)


def test_failed_task_is_retried(pair, tmp_path, monkeypatch):
    """The driver resubmits a task whose worker failed with an I/O error; the output is unchanged."""
    import streammerge.distributed as dist
    from streammerge.errors import OutputError

    base, ad, ref = pair
    failures = {"left": 2}

    class FlakyPool:
        def __init__(self, kind, workers, address):
            pass

        def submit(self, task):
            return task

        def wait_any(self, pending):
            return [next(iter(pending))]

        def result(self, task):
            if failures["left"] and task.shard == 1:
                failures["left"] -= 1
                raise OutputError("worker lost its disk")
            return dist.run_shard(task)

        def close(self):
            pass

    monkeypatch.setattr(dist, "_Pool", FlakyPool)
    out = tmp_path / "out"
    streammerge.merge(base, ad, out, shard_size="4MB", executor="local", workers=2)
    assert failures["left"] == 0
    assert _model_files(out) == _model_files(ref)
