"""Driving one plan through one sink: a prefetcher ahead of the merge (disk reads overlap compute), the
executor's blocks in order, and a writer thread behind it (file writes overlap compute), with each
finished shard recorded in the run's journal."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from tqdm import tqdm

from .options import WRITE_QUEUE
from .plan import ShardPlan, TensorJob
from .sinks.safetensors import ShardWriter, open_shard_writer
from .source import Reader, stored_refs

PREFETCH_BYTES = 256 * 1024 * 1024  # base bytes the kernel is asked to read ahead of the merge


class Prefetcher:
    """Keeps the kernel reading up to ``window`` bytes of base tensors ahead of the one being merged
    (``MADV_WILLNEED``), so that with a cold page cache the disk reads overlap the merge instead of
    stalling it. ``sources``: the plan sources (None for none) in the order they will be merged."""

    def __init__(self, reader: Reader, sources: list, window: int = PREFETCH_BYTES):
        self.reader, self.window = reader, window
        self.sizes = [_source_bytes(s) for s in sources]
        self.sources = sources
        self._next = 0  # the first source not yet prefetched
        self._ahead = 0  # bytes prefetched beyond the current source

    def advance(self, i: int) -> None:
        """Source ``i`` is being merged now: top the read-ahead up to the window beyond it."""
        self._ahead = max(0, self._ahead - self.sizes[i]) if self._next > i else 0
        self._next = max(self._next, i + 1)
        while self._next < len(self.sources) and self._ahead < self.window:
            if self.sources[self._next] is not None:  # at most a window of one huge tensor
                self.reader.prefetch(self.sources[self._next], self.window)
            self._ahead += self.sizes[self._next]
            self._next += 1


def _source_bytes(src) -> int:
    return 0 if src is None else sum(r.nbytes for r in stored_refs(src))


class LazyExecutor:
    """The executor, built by ``build`` (which imports torch) only when the first job needs arithmetic:
    pass-through tensors in front of it are copied meanwhile, so that on the command line torch's
    import, started on a background thread, overlaps writing them as well as the planning."""

    def __init__(self, reader: Reader, build: Callable):
        self.reader = reader
        self._build = build
        self.built = None

    @property
    def ex(self):
        if self.built is None:
            self.built = self._build()
        return self.built

    def direct_ok(self, job: TensorJob) -> bool:
        return not job.is_copy and self.ex.direct_ok(job)

    def blocks(self, job: TensorJob, writer=None):
        if job.is_copy:
            return ((job.name, mv) for mv in self.reader.chunks(job.source))
        return self.ex.blocks(job, writer)

    @property
    def stage(self) -> dict:
        return self.built.stage if self.built is not None else {"read": 0.0, "dequant": 0.0, "merge": 0.0}


class WriterThread:
    """Runs write operations in order on a second thread, so computing the next block overlaps
    writing the previous one (file writes and torch both release the GIL). A bounded queue keeps at
    most ``depth`` blocks in flight; errors surface on the next ``submit`` or at ``finish``."""

    def __init__(self, depth: int = WRITE_QUEUE):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.busy = 0.0
        self._t = threading.Thread(target=self._run, name="streammerge-writer", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                self.q.task_done()
                continue
            fn, args = item
            t = time.perf_counter()
            try:
                fn(*args)
            except BaseException as e:  # handed to the main thread
                self.error = e
            finally:
                self.q.task_done()
            self.busy += time.perf_counter() - t

    def submit(self, fn: Callable, *args) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((fn, args))

    def drain(self) -> None:
        """Wait until everything submitted so far has run."""
        self.q.join()
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        self.q.put(None)
        self._t.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.q.put(None)
        self._t.join()


def run_shards(
    shards: list[ShardPlan],
    ex,
    work,
    opts,
    on_done: Callable[[ShardWriter, str], None],
    progress=None,
    open_writer: Callable | None = None,
) -> dict:
    """Merge ``shards`` into files under ``work``: blocks computed on this thread by ``ex`` (an
    ``Executor`` or a ``LazyExecutor``), written on the writer thread; ``on_done(writer, filename)``
    runs there once a shard is complete. Returns the stage timings (``write``: the writer thread's
    busy time; ``compute``: time spent in the executor). ``open_writer(path, shard, opts)``: another
    file format's writer (default: safetensors shards)."""
    reader = ex.reader
    wt = WriterThread()
    writers: list[ShardWriter] = []
    t_compute = 0.0
    try:
        ahead = Prefetcher(reader, [j.source for s in shards for j in s.jobs])
        n_job = 0
        for shard in shards:
            writer = (open_writer or open_shard_writer)(work / shard.filename, shard, opts)
            writers.append(writer)
            for job in shard.jobs:
                ahead.advance(n_job)
                n_job += 1
                # merged straight into the writer's staging buffer on this thread (the writer thread
                # first finishes what it has: the writer is this thread's meanwhile), or handed over
                direct = getattr(writer, "direct", False) and ex.direct_ok(job)
                if direct:
                    wt.drain()
                it = ex.blocks(job, writer if direct else None)
                while True:
                    t = time.perf_counter()
                    item = next(it, None)
                    t_compute += time.perf_counter() - t
                    if item is None:
                        break
                    if not direct:
                        wt.submit(writer.write, *item)
                    if progress is not None:
                        progress.update(item[1] if direct else item[1].nbytes)
                if direct:
                    reader.release(job.source)
                else:
                    wt.submit(reader.release, job.source)
            wt.submit(on_done, writer, shard.filename)
        wt.finish()
    except BaseException:
        wt.abort()
        for w in writers:
            w.abort()
        raise
    return {**ex.stage, "write": wt.busy, "compute": t_compute}


def progress_bar(total: int, enabled: bool) -> tqdm:
    """A progress bar over ``total`` output bytes."""
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        desc="merging",
        dynamic_ncols=True,
    )
