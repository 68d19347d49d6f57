"""Running the shards of a merge on several processes (``--executor local``) or a Ray cluster
(``--executor ray``).

The plan makes every output shard independent: a worker re-plans from the same inputs (reading only
headers), checks that its plan is the driver's (by digest), merges its one shard into the shared work
directory and returns the file's size and checksum. The driver records each finished shard in the
journal, retries failed tasks, and writes the index, config and report once all shards are done, so
the output is byte-identical to a single-process run (tested).

Retries are the driver's, not Ray's (``max_retries=0``), so each one is seen and noted in the report with
its cause: a shard whose task failed (an I/O error) is retried ``RETRIES`` times; one whose worker process
or node died (Ray) ``LOST_RETRIES`` times, counted apart. A worker writes its shard in a private attempt
directory and renames the complete file into place, so an attempt cut off (or one still running on a node
declared dead) never leaves a half-written file under the shard's name.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, OutputError, StreamMergeError, WorkerLost

RETRIES = 2  # a shard's task failed (I/O error): retried this many times
LOST_RETRIES = 3  # a shard's worker process or node died (Ray): retried this many times, counted apart
# Ray's errors (and their subclasses) for a task whose worker or node went away, not a failing task
LOST = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError", "OutOfMemoryError")
ATTEMPT = ".attempt-"  # a worker's private directory in the work directory, renamed away when complete


@dataclass(frozen=True)
class ShardTask:
    base: str
    adapters: tuple[tuple[str, float], ...]
    options: object  # MergeOptions
    device: str
    shard: int
    work: str
    plan_digest: str
    threads: int = 0


def run_shard(task: ShardTask) -> dict:
    """Merge one output shard into the work directory (in a worker process or on a Ray node)."""
    import torch

    from .execute import Executor
    from .options import resolve_device
    from .plan import plan_merge
    from .report import scratch_report
    from .source import Reader, drop_behind_if_large

    if task.threads:
        torch.set_num_threads(task.threads)
    t0 = time.perf_counter()
    reader = Reader()
    try:
        ckpt, _, plan = plan_merge(task.base, list(task.adapters), task.options, reader)
        drop_behind_if_large(reader, ckpt)
        if plan.digest != task.plan_digest:
            raise InputError(f"{task.base}: a worker planned a different output (inputs changed during the run?)")
        shard = plan.shards[task.shard]
        report = scratch_report()
        ex = Executor(reader, task.options, resolve_device(task.device), report)
        closed: dict[str, str] = {}

        def close(writer, filename: str) -> None:
            writer.close()
            closed[filename] = writer.checksum

        path = Path(task.work) / shard.filename
        stage = _write_attempt(shard, ex, path, task.options, close)
        return {
            "file": shard.filename,
            "bytes": path.stat().st_size,
            "checksum": closed[shard.filename],
            "stage": stage,
            "warnings": report.warnings,
            "notes": report.notes,
            "peak_anon": ex.peak_anon,
            "work_buffer_bytes": ex.ws.nbytes,
            "seconds": time.perf_counter() - t0,
            "pid": os.getpid(),
        }
    finally:
        reader.close()


def _write_attempt(shard, ex, path: Path, options, close) -> dict:
    """Merge ``shard`` into a private attempt directory, then rename the complete file to ``path``."""
    from .pipeline import run_shards
    from .sinks.outdir import fsync_dir

    tmp = path.parent / f"{ATTEMPT}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        stage = run_shards([shard], ex, tmp, options, close)
        os.replace(tmp / shard.filename, path)
        fsync_dir(path.parent)
        return stage
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Pool:
    """A uniform submit/wait over a process pool or Ray."""

    def __init__(self, kind: str, workers: int, address: str | None):
        self.kind = kind
        if kind == "local":
            import multiprocessing as mp

            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        elif kind == "ray":
            try:
                import ray
            except ImportError as e:
                raise InputError("--executor ray needs Ray", hint="pip install 'streammerge[ray]'") from e
            self._ray = ray
            if not ray.is_initialized():
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=False,
                    **({} if address else {"num_cpus": workers}),
                )
            self._remote = ray.remote(max_retries=0)(run_shard)  # the driver retries: see the module doc
            self._lost = tuple(getattr(ray.exceptions, n) for n in LOST if hasattr(ray.exceptions, n))
            self._live: set = set()  # submitted, result not taken yet: cancelled by close()
        else:
            raise InputError(f"unknown executor {kind!r}", hint="use local or ray")

    def submit(self, task: ShardTask):
        if self.kind == "local":
            return self._pool.submit(run_shard, task)
        ref = self._remote.remote(task)
        self._live.add(ref)
        return ref

    def wait_any(self, pending: dict) -> list:
        """Finished handles among ``pending`` (blocks until at least one)."""
        if self.kind == "local":
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            return list(done)
        done, _ = self._ray.wait(list(pending), num_returns=1)
        return done

    def result(self, handle) -> dict:
        if isinstance(handle, Future):
            return handle.result()
        self._live.discard(handle)
        try:
            return self._ray.get(handle)
        except self._ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, StreamMergeError):
                raise e.as_instanceof_cause() from None
            raise OutputError(f"{type(e.cause).__name__}: {_first_line(e.cause)}") from None
        except self._lost as e:
            raise WorkerLost(e) from None

    def close(self) -> None:
        if self.kind == "local":
            self._pool.shutdown(cancel_futures=True)
            return
        for ref in self._live:  # the run failed or was interrupted: stop its other tasks
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # already finished, or its node is gone
                pass


def run_distributed(
    plan, todo: list, base, specs, opts, work: Path, journal, executor: str, workers: int, address: str | None, log
) -> dict:
    """Run the shards ``todo`` (of ``plan``) on the executor; record each in the journal. Returns
    merged stats."""
    digest = plan.digest
    index = {s.filename: i for i, s in enumerate(plan.shards)}
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    pool = _Pool(executor, workers, address)
    stats = {
        "read": 0.0,
        "dequant": 0.0,
        "merge": 0.0,
        "write": 0.0,
        "warnings": [],
        "notes": [],
        "peak_anon": 0,
        "work_buffer_bytes": 0,
        "workers": set(),
    }
    tries: dict[tuple[int, bool], int] = {}
    try:
        pending = {}
        for shard in todo:
            task = ShardTask(
                str(base), tuple(specs), opts, opts.device, index[shard.filename], str(work), digest, threads
            )
            pending[pool.submit(task)] = task
        while pending:
            for h in pool.wait_any(pending):
                task = pending.pop(h)
                try:
                    r = pool.result(h)
                except (OutputError, OSError) as e:  # a worker, its node or its disk failed: retry elsewhere
                    stats["notes"].append(_retry_note(e, plan.shards[task.shard].filename, task.shard, tries))
                    log.warning("%s: %s", stats["notes"][-1], _first_line(e))
                    pending[pool.submit(task)] = task
                    continue
                _add_result(stats, r)
                journal.record(r["file"], r["bytes"], r["checksum"])
    finally:
        pool.close()
        _drop_attempts(work)
    stats["workers"] = len(stats["workers"])
    return stats


def _retry_note(e: BaseException, filename: str, shard: int, tries: dict) -> str:
    """The report's note on retrying a shard after ``e``; re-raises ``e`` once that kind of failure has
    used up its retries (a lost worker or node: ``LOST_RETRIES``; a failed task: ``RETRIES``)."""
    lost = isinstance(e, WorkerLost)
    tries[shard, lost] = n = tries.get((shard, lost), 0) + 1
    if n > (LOST_RETRIES if lost else RETRIES):
        raise e
    cause = f"its worker or node died ({e.kind})" if lost else f"it failed ({_first_line(e)})"
    return f"shard {filename}: retried after {cause}"


def _add_result(stats: dict, r: dict) -> None:
    for k in ("read", "dequant", "merge", "write"):
        stats[k] += r["stage"].get(k, 0.0)
    stats["warnings"] += r["warnings"]
    stats["notes"] += r["notes"]
    stats["peak_anon"] = max(stats["peak_anon"], r["peak_anon"])
    stats["work_buffer_bytes"] = max(stats["work_buffer_bytes"], r["work_buffer_bytes"])
    stats["workers"].add(r["pid"])


def _drop_attempts(work: Path) -> None:
    """Remove the attempt directories of workers that died (never published with the output)."""
    for d in work.glob(f"{ATTEMPT}*"):
        shutil.rmtree(d, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
