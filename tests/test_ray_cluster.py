"""The Ray executor on a multi-node cluster (a head and two worker nodes on this host, as Ray's own tests
do) losing a worker node in the middle of a batch: the shard that was running there is rescheduled, the
outputs are byte-identical to an in-process run, nothing half-written is published, and the job's report
says what was retried and why. Also, without Ray: how lost workers and failed tasks are counted."""

from __future__ import annotations

import faulthandler
import json
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import streammerge
import streammerge.distributed as dist
from streammerge.batch import batch, jobs_from_args
from streammerge.errors import OutputError
from streammerge.report import REPORT_NAME
from streammerge.synthetic import write_synthetic_llama

MB = 1024 * 1024
VICTIM_JOB = "checkpoint-1"  # the second of four jobs: a shard's first attempt is cut off by its node's death
FAILING_JOB = "checkpoint-2"  # the third: a shard's first attempt fails with an I/O error


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith(("model", "config"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small base (5 shards of 4 MB per output), four adapters, and the in-process outputs."""
    root = tmp_path_factory.mktemp("cluster")
    base, ad = write_synthetic_llama(root, hidden=256, inter=768, layers=6, vocab=8000, kv_heads=2, heads=4)
    sd = load_file(ad / "adapter_model.safetensors")
    ads = []
    for k in range(4):
        d = root / "runs" / f"checkpoint-{k}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
        save_file({n: t * (k + 1) for n, t in sd.items()}, d / "adapter_model.safetensors")
        ads.append(str(d))
    ref = root / "ref"
    assert all(r.status == "ok" for r in batch(base, jobs_from_args(ref, ads, {"shard_size": "4MB"})))
    return base, ads, ref


def _faulty(marks: str):
    """``run_shard`` for the Ray workers. The first attempt of a shard of ``VICTIM_JOB`` blocks when it
    closes its file and leaves its node and file in ``marks``/victim, for the test to remove that node; the
    first attempt of one of ``FAILING_JOB`` raises an I/O error; every other attempt runs as usual. Nested,
    so Ray ships it by value."""

    def run_shard(task):
        import os
        from pathlib import Path

        import ray

        import streammerge.sinks.safetensors as st
        from streammerge.distributed import run_shard as real

        def first(what: str) -> bool:
            try:
                os.close(os.open(Path(marks) / what, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return True
            except FileExistsError:
                return False

        def close_and_wait(writer):
            node = ray.get_runtime_context().get_node_id()
            (Path(marks) / "victim.tmp").write_text(json.dumps({"node": node, "file": str(writer.path)}))
            os.replace(Path(marks) / "victim.tmp", Path(marks) / "victim")
            time.sleep(60)  # the node is removed meanwhile, killing this process
            raise RuntimeError("the test did not remove this node")

        job = task.adapters[0][0]
        if job.endswith(VICTIM_JOB) and first("cut"):
            st.ShardWriter.close = close_and_wait
        elif job.endswith(FAILING_JOB) and first("fail"):
            raise OSError(5, "injected I/O error")
        return real(task)

    return run_shard


def _remove_victim_node(cluster, marks, out, seen: dict) -> None:
    """Wait for the victim's mark, look at the disk, then kill its node (no graceful shutdown)."""
    try:
        deadline = time.monotonic() + 60
        while not (marks / "victim").exists():
            assert time.monotonic() < deadline, "no shard attempt was cut off"
            time.sleep(0.05)
        victim = json.loads((marks / "victim").read_text())
        node = next(n for n in cluster.worker_nodes if n.node_id == victim["node"])
        cut = Path(victim["file"])  # in the attempt's private directory, inside the hidden work directory
        seen["shard"], seen["published_early"] = cut.name, out.exists()
        seen["hidden"] = cut.is_file() and cut.parent.parent == out.parent / f".{out.name}.streammerge-partial"
        seen["under_final_name"] = (cut.parent.parent / cut.name).exists()
        cluster.remove_node(node, allow_graceful=False)
        seen["removed"] = True
    except BaseException as e:
        seen["error"] = e


@pytest.fixture
def cluster():
    """A head that only schedules (no CPU: every task runs on a removable node) and two 1-CPU workers; a
    killed node is declared dead after 2 missed 1 s health checks (Ray's default: about 15 s)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    small = {"num_cpus": 1, "object_store_memory": 90 * MB}
    fast = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    c = Cluster(initialize_head=True, head_node_args={**small, "num_cpus": 0, "_system_config": fast})
    for _ in range(2):
        c.add_node(**small)
    c.wait_for_nodes()
    yield c
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def _retry_notes(out: Path) -> list[str]:
    return [n for n in json.loads((out / REPORT_NAME).read_text())["notes"] if "retried" in n]


def test_worker_node_lost_mid_batch(inputs, cluster, tmp_path, monkeypatch):
    """Job 2's shard is cut off by its node's death and job 3's fails once: both are retried by the driver,
    each job's report says so, and every output equals the in-process one."""
    base, ads, ref = inputs
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setattr(dist, "run_shard", _faulty(str(marks)))
    jobs = jobs_from_args(tmp_path / "merged", ads, {"shard_size": "4MB"})
    outs = {j.out.name.removeprefix("runs-"): j.out for j in jobs}
    seen: dict = {}
    killer = threading.Thread(target=_remove_victim_node, args=(cluster, marks, outs[VICTIM_JOB], seen), daemon=True)
    killer.start()
    faulthandler.dump_traceback_later(120, exit=True)  # a hang ends the session, with a traceback
    try:
        results = batch(base, jobs, executor="ray", workers=2, address=cluster.address)
    finally:
        faulthandler.cancel_dump_traceback_later()
    killer.join(5)
    assert "error" not in seen, seen.get("error")
    assert seen.get("removed") and len(cluster.worker_nodes) == 1  # a worker node really went away mid-run
    assert not seen["published_early"] and seen["hidden"] and not seen["under_final_name"]
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    for j in jobs:
        assert _files(j.out) == _files(ref / j.out.name)
        assert not [p.name for p in j.out.iterdir() if p.name.startswith(".")]  # no attempt directory
    assert not list((tmp_path / "merged").glob(".*"))  # no work directory left behind
    lost = _retry_notes(outs[VICTIM_JOB])
    assert lost and all(n.startswith(f"shard {seen['shard']}: retried after its worker or node died ") for n in lost)
    assert lost[0].endswith(("(NodeDiedError)", "(WorkerCrashedError)", "(LocalRayletDiedError)")), lost
    failed = _retry_notes(outs[FAILING_JOB])
    assert len(failed) == 1 and failed[0].endswith("retried after it failed (OSError: [Errno 5] injected I/O error)")
    assert not _retry_notes(outs["checkpoint-0"]) and not _retry_notes(outs["checkpoint-3"])


class NodeDiedError(Exception):
    """Stands for Ray's (the note names the error's class)."""


def _flaky_pool(errors: list):
    """A ``_Pool`` running tasks in this process; shard 1's attempts first raise ``errors``, in order."""

    class FlakyPool:
        def __init__(self, kind, workers, address):
            pass

        def submit(self, task):
            return task

        def wait_any(self, pending):
            return [next(iter(pending))]

        def result(self, task):
            if task.shard == 1 and errors:
                raise errors.pop(0)
            return dist.run_shard(task)

        def close(self):
            pass

    return FlakyPool


def test_lost_workers_and_failed_tasks_have_their_own_retries(inputs, tmp_path, monkeypatch):
    """A shard's worker lost LOST_RETRIES times and its task failing RETRIES times: all retried, each
    noted in the report; the output is unchanged."""
    base, ads, ref = inputs
    lost, failed = dist.WorkerLost(NodeDiedError("node 1 is dead")), OutputError("worker lost its disk")
    assert (dist.LOST_RETRIES, dist.RETRIES) == (3, 2)
    monkeypatch.setattr(dist, "_Pool", _flaky_pool([lost, failed, lost, failed, lost]))
    out = tmp_path / "out"
    rep = streammerge.merge(base, ads[0], out, shard_size="4MB", executor="local")
    shard = "shard model-00002-of-00005.safetensors: retried after"
    lost_note = f"{shard} its worker or node died (NodeDiedError)"
    failed_note = f"{shard} it failed (worker lost its disk)"
    assert [n for n in rep.notes if "retried" in n] == [lost_note, failed_note, lost_note, failed_note, lost_note]
    assert _files(out) == _files(ref / "runs-checkpoint-0")


def test_retries_used_up_keep_the_work_for_resume(inputs, tmp_path, monkeypatch):
    """One lost worker too many fails the run: nothing is published, the hidden work directory is kept
    (a dead attempt's directory in it too), and --resume finishes it without that leftover."""
    base, ads, ref = inputs
    errors = [dist.WorkerLost(NodeDiedError("node 1 is dead")) for _ in range(dist.LOST_RETRIES + 1)]
    monkeypatch.setattr(dist, "_Pool", _flaky_pool(errors))
    out = tmp_path / "out"
    with pytest.raises(dist.WorkerLost, match="NodeDiedError") as e:
        streammerge.merge(base, ads[0], out, shard_size="4MB", executor="local")
    assert "--resume" in str(e.value) and not out.exists()
    work = tmp_path / ".out.streammerge-partial"
    (work / f"{dist.ATTEMPT}dead").mkdir()
    (work / f"{dist.ATTEMPT}dead" / "model-00002-of-00005.safetensors").write_bytes(b"cut off")
    rep = streammerge.merge(base, ads[0], out, shard_size="4MB", executor="local", resume=True)
    assert rep.resumed_shards == 4 and not work.exists()
    assert _files(out) == _files(ref / "runs-checkpoint-0")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
