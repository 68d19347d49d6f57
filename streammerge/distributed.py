"""Running the shards of a merge on several processes (``--executor local``) or a Ray cluster
(``--executor ray``).

The plan makes every output shard independent: a worker re-plans from the same inputs (reading only
headers), checks that its plan is the driver's (by digest), merges its one shard into the shared work
directory and returns the file's size and checksum. The driver records each finished shard in the
journal, retries failed tasks, and writes the index, config and report once all shards are done, so
the output is byte-identical to a single-process run (tested).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, OutputError, StreamMergeError

RETRIES = 2


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
    from .pipeline import run_shards
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

        stage = run_shards([shard], ex, Path(task.work), task.options, close)
        path = Path(task.work) / shard.filename
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
            self._remote = ray.remote(max_retries=RETRIES, retry_exceptions=[OSError])(run_shard)
        else:
            raise InputError(f"unknown executor {kind!r}", hint="use local or ray")

    def submit(self, task: ShardTask):
        if self.kind == "local":
            return self._pool.submit(run_shard, task)
        return self._remote.remote(task)

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
        try:
            return self._ray.get(handle)
        except self._ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            raise cause if isinstance(cause, StreamMergeError) else OutputError(str(e).splitlines()[0]) from None

    def close(self) -> None:
        if self.kind == "local":
            self._pool.shutdown(cancel_futures=True)


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
    tries: dict[int, int] = {}
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
                except (OutputError, OSError) as e:  # a worker or its disk failed: retry elsewhere
                    tries[task.shard] = tries.get(task.shard, 0) + 1
                    if executor == "ray" or tries[task.shard] > RETRIES:
                        raise
                    log.warning("shard %s failed (%s); retrying", plan.shards[task.shard].filename, e)
                    pending[pool.submit(task)] = task
                    continue
                journal.record(r["file"], r["bytes"], r["checksum"])
                for k in ("read", "dequant", "merge", "write"):
                    stats[k] += r["stage"].get(k, 0.0)
                stats["warnings"] += r["warnings"]
                stats["notes"] += r["notes"]
                stats["peak_anon"] = max(stats["peak_anon"], r["peak_anon"])
                stats["work_buffer_bytes"] = max(stats["work_buffer_bytes"], r["work_buffer_bytes"])
                stats["workers"].add(r["pid"])
    finally:
        pool.close()
    stats["workers"] = len(stats["workers"])
    return stats
