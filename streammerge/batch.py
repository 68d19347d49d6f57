"""Batch conversion: N adapters onto one base in a single pass over the base.

Every job is planned up front (a bad adapter fails its own job only). Then the base's tensors are
visited once, in file order; for each tensor every job that uses it merges it and queues the bytes
to its own shard writer, so each base tensor is read from storage once (the other jobs find its pages
in the page cache) and the work buffers are shared by all jobs.
"""

from __future__ import annotations

import glob
import logging
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import hub
from .adapters import load_adapter
from .errors import InputError, StreamMergeError
from .execute import Executor, Workspace
from .formats import logical_tensors
from .job import Job
from .options import RunOptions, make_options, resolve_device
from .pipeline import Prefetcher, WriterThread
from .plan import build_plan
from .sinks.safetensors import ShardWriter
from .source import Reader, drop_behind_if_large, open_checkpoint, split_adapter_spec

log = logging.getLogger("streammerge")
JOB_OPTIONS = (
    "dtype",
    "shard_size",
    "save_method",
    "quant_type",
    "blocksize",
    "double_quant",
    "allow_nonfinite",
    "compress",
    "gguf_type",
)


@dataclass
class JobSpec:
    """One job of a batch: which adapter(s) go into which output, with which options."""

    name: str
    adapters: list[str]
    out: Path
    options: dict = field(default_factory=dict)


@dataclass
class JobResult:
    name: str
    out: str
    status: str  # "ok", "failed" or "skipped"
    error: str = ""
    seconds: float = 0.0
    total_size: int = 0
    tensors_merged: int = 0


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def expand_adapters(items: list[str]) -> list[str]:
    """Adapter arguments with globs (``runs/*/checkpoint-*``) expanded, in sorted order."""
    out: list[str] = []
    for item in items:
        path, weight = split_adapter_spec(item)
        if _has_glob(path):
            hits = sorted(p for p in glob.glob(path) if Path(p).is_dir())
            if not hits:
                raise InputError(f"{path}: the pattern matches no directory")
            out += [h if weight == 1.0 else f"{h}:{weight}" for h in hits]
        else:
            out.append(item)
    return out


def job_name(adapter: str) -> str:
    """``runs/exp1/checkpoint-500`` -> ``exp1-checkpoint-500`` (parent kept: checkpoints share names)."""
    p = Path(split_adapter_spec(adapter)[0])
    return f"{p.parent.name}-{p.name}" if p.parent.name else p.name


def jobs_from_args(out_root: Path, adapters: list[str], options: dict) -> list[JobSpec]:
    specs = [JobSpec(job_name(a), [a], Path(), dict(options)) for a in expand_adapters(adapters)]
    names = [s.name for s in specs]
    for s in specs:
        if names.count(s.name) > 1:
            s.name = s.name + "-" + str(abs(hash(s.adapters[0])) % 10**6)
        s.out = out_root / s.name
    return specs


def read_manifest(path: Path) -> tuple[Path, Path, list[JobSpec]]:
    """``jobs.toml``: ``base``, ``out_root``, optional ``[defaults]`` and ``[[job]]`` tables with
    ``adapter`` (a path, glob or list), optional ``name``, ``out`` and per-job options."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"{path}: cannot read the manifest ({e})") from None
    here = path.parent

    def rel(p: str) -> str:
        return str(p) if Path(p).is_absolute() else str(here / p)

    for key in ("base", "out_root"):
        if not isinstance(doc.get(key), str):
            raise InputError(f"{path}: needs a {key!r} string")
    defaults = doc.get("defaults", {})
    jobs = doc.get("job", [])
    if not isinstance(jobs, list) or not jobs:
        raise InputError(f"{path}: needs at least one [[job]] table")
    out_root = Path(rel(doc["out_root"]))
    specs: list[JobSpec] = []
    for i, j in enumerate(jobs):
        if not isinstance(j, dict) or "adapter" not in j:
            raise InputError(f"{path}: job {i + 1} needs an 'adapter'")
        unknown = set(j) - {"adapter", "name", "out", *JOB_OPTIONS}
        if unknown:
            raise InputError(f"{path}: job {i + 1} has unknown keys {sorted(unknown)}", hint=f"use {JOB_OPTIONS}")
        opts = {**{k: v for k, v in defaults.items() if k in JOB_OPTIONS}, **{k: j[k] for k in JOB_OPTIONS if k in j}}
        ads = j["adapter"] if isinstance(j["adapter"], list) else [j["adapter"]]
        ads = [rel(a) for a in ads]
        if len(ads) == 1 and _has_glob(ads[0]):
            for s in jobs_from_args(out_root, ads, opts):
                specs.append(s)
            continue
        name = j.get("name") or job_name(ads[0])
        specs.append(JobSpec(name, expand_adapters(ads), Path(rel(j["out"])) if "out" in j else out_root / name, opts))
    return Path(rel(doc["base"])), out_root, specs


@dataclass
class _Active:
    """A job of the single pass: its lifecycle and where its writing stands."""

    spec: JobSpec
    result: JobResult
    job: Job
    ex: Executor | None = None
    order: list = field(default_factory=list)  # (shard index, TensorJob) in output order
    pos: int = 0
    writer: ShardWriter | None = None
    shard_i: int = -1
    failed: BaseException | None = None
    compute: float = 0.0
    sharing: int = 1  # job writers open at once: they split the O_DIRECT staging budget


def batch(
    base: str | Path,
    jobs: list[JobSpec],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    max_memory: str | int = "128MiB",
    executor: str = "inprocess",
    workers: int = 2,
    address: str | None = None,
    direct_io: bool = True,
) -> list[JobResult]:
    """Run all ``jobs`` in one pass over ``base``. A failing job is reported and the others go on;
    with ``resume``, jobs whose output is already finished from the same inputs and options are skipped.
    With ``executor`` ``local`` or ``ray`` the jobs run one after another, each one's shards spread over
    the workers (no shared pass: each worker reads the base from shared storage)."""
    if executor != "inprocess":
        run = RunOptions(executor, workers, address, resume, overwrite, device)
        return _batch_distributed(base, jobs, run, max_memory, direct_io)
    base = hub.resolve(base, "base").path
    dev = resolve_device(device)
    reader = Reader()
    results: list[JobResult] = []
    active: list[_Active] = []
    ws = Workspace()
    try:
        ckpt = open_checkpoint(base)
        drop_behind_if_large(reader, ckpt)
        logical = logical_tensors(ckpt, lambda ref: bytes(reader.raw(ref)))
        for spec in jobs:
            res = _start(spec, results)
            try:
                a = _prepare(spec, res, base, ckpt, reader, dev, device, max_memory, direct_io, resume, overwrite)
                if a is not None:
                    active.append(a)
            except StreamMergeError as e:
                res.status, res.error = "failed", str(e).splitlines()[0]
                log.error("job %s: %s", spec.name, e)
        _run_pass(active, ckpt, logical, reader, dev, ws)
    finally:
        for a in active:
            a.job.close()
        reader.close()
    return results


def _prepare(spec: JobSpec, res: JobResult, base, ckpt, reader, dev, device, max_memory, direct_io, resume, overwrite):
    """Plan one job of the pass; an adapter output is written at once (None: nothing left for the pass)."""
    opts = make_options(device=device, max_memory=max_memory, direct_io=direct_io, **dict(spec.options))
    specs = [(hub.resolve(p, "adapter").path, w) for p, w in map(split_adapter_spec, spec.adapters)]
    ads = [load_adapter(p, reader, w) for p, w in specs]
    plan = build_plan(ckpt, ads, opts, lambda ref: bytes(reader.raw(ref)))
    job = Job.prepare(
        spec.out, base, ckpt, ads, plan, opts, base_spec=str(base), device=dev, overwrite=overwrite or resume,
        resume=resume,
    )  # fmt: skip
    if job.up_to_date:
        res.status = "skipped"
        return None
    if not job.kind.merges:
        job.write_adapter(reader)
        res.seconds, res.total_size = job.report.seconds["total"], job.report.total_size
        return None
    return _Active(spec, res, job)


def _start(spec: JobSpec, results: list[JobResult]) -> JobResult:
    """The result record of a job (``skipped`` once ``--resume`` finds its output finished from the same
    inputs and options)."""
    res = JobResult(spec.name, str(spec.out), "ok")
    results.append(res)
    return res


def _batch_distributed(base, jobs: list[JobSpec], run: RunOptions, max_memory, direct_io) -> list[JobResult]:
    """The jobs one after another, each one's shards spread over the workers."""
    from .api import run_merge

    results = []
    for spec in jobs:
        res = _start(spec, results)
        try:
            opts = make_options(device=run.device, max_memory=max_memory, direct_io=direct_io, **dict(spec.options))
            rep = run_merge(base, list(map(split_adapter_spec, spec.adapters)), Path(spec.out), opts, run)
            res.seconds, res.total_size, res.tensors_merged = rep.seconds["total"], rep.total_size, rep.tensors_merged
            if rep.up_to_date:
                res.status = "skipped"
        except StreamMergeError as e:
            res.status, res.error = "failed", str(e).splitlines()[0]
            log.error("job %s: %s", spec.name, e)
    return results


def _fail(a: _Active, e: BaseException) -> None:
    if a.failed is None:
        a.failed = e
        a.result.status, a.result.error = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
        log.error("job %s: %s", a.spec.name, e)


def _guarded(a: _Active, fn, *args) -> None:
    """A write operation of job ``a``: its failure (disk full, ...) fails that job only."""
    if a.failed is not None:
        return
    try:
        fn(*args)
    except Exception as e:
        _fail(a, e)


def _run_pass(active: list[_Active], ckpt, logical, reader: Reader, dev, ws: Workspace) -> None:
    wt = WriterThread(depth=1)
    for a in active:
        # the jobs' writers share one staging budget, the one a single merge's writer has
        a.sharing = len(active)
        a.job.t0 = time.perf_counter()
        a.job.open(resume=False)
        a.ex = Executor(reader, a.job.opts, dev, a.job.report, ws)
        a.order = [(i, j) for i, s in enumerate(a.job.shards) for j in s.jobs]
    names = list(logical) + sorted({j.name for a in active for _, j in a.order} - set(logical))
    ahead = Prefetcher(reader, [logical.get(n) for n in names])
    try:
        for i, name in enumerate(names):
            ahead.advance(i)
            for a in active:
                if a.failed is not None or a.pos >= len(a.order) or a.order[a.pos][1].name != name:
                    continue
                shard_i, job = a.order[a.pos]
                a.pos += 1
                _ensure_writer(a, shard_i, wt)
                try:
                    t = time.perf_counter()
                    for out_name, buf in a.ex.blocks(job):
                        wt.submit(_guarded, a, a.writer.write, out_name, buf)
                    a.compute += time.perf_counter() - t
                except StreamMergeError as e:
                    _fail(a, e)
            if name in logical:
                wt.submit(reader.release, logical[name])
        for a in active:
            if a.failed is None and a.writer is not None:
                wt.submit(_guarded, a, _close_shard, a, a.writer)
        wt.finish()
    except BaseException:
        wt.abort()
        for a in active:
            if a.writer is not None:
                a.writer.abort()
        raise
    for a in active:
        _finish(a, wt, reader, ws)


def _finish(a: _Active, wt: WriterThread, reader: Reader, ws: Workspace) -> None:
    if a.failed is None and a.pos != len(a.order):
        _fail(a, RuntimeError(f"{len(a.order) - a.pos} tensors were never visited"))
    if a.failed is None:
        try:
            a.job.finish({**a.ex.stage, "write": wt.busy, "compute": a.compute}, reader, ws.nbytes, a.ex.peak_anon)
            report = a.job.report
            a.result.seconds, a.result.total_size = report.seconds["total"], report.total_size
            a.result.tensors_merged = report.tensors_merged
        except StreamMergeError as e:
            _fail(a, e)
    if a.failed is not None:
        if a.writer is not None:
            a.writer.abort()
        a.job.discard()


def _close_shard(a: _Active, writer: ShardWriter) -> None:
    a.job.record(writer, writer.path.name)


def _ensure_writer(a: _Active, shard_i: int, wt: WriterThread) -> None:
    if a.shard_i == shard_i:
        return
    if a.writer is not None:
        wt.submit(_guarded, a, _close_shard, a, a.writer)
    shard = a.job.shards[shard_i]
    a.shard_i = shard_i
    try:
        a.writer = a.job.open_writer(a.job.work / shard.filename, shard, a.sharing)
    except StreamMergeError as e:
        _fail(a, e)


def summary_table(results: list[JobResult]) -> str:
    lines = ["| job | status | seconds | GB | merged tensors | output / error |", "|---|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(
            f"| {r.name} | {r.status} | {r.seconds:.2f} | {r.total_size / 1e9:.2f} | {r.tensors_merged} | "
            f"{r.error or r.out} |"
        )
    return "\n".join(lines)


def results_json(results: list[JobResult]) -> list[dict]:
    return [asdict(r) for r in results]


__all__ = ["JobResult", "JobSpec", "batch", "jobs_from_args", "read_manifest", "summary_table"]
