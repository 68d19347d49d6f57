"""The public entry point: ``merge(base, adapter, out, ...)``: inputs resolved and planned, then one
:class:`~streammerge.job.Job` (prepare -> open -> write -> finish) whose shards are written in this process
(:mod:`pipeline`) or by workers (:mod:`distributed`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import distributed, hub
from .errors import UsageError
from .job import Job
from .options import DEFAULT_MAX_MEMORY, MergeOptions, RunOptions, make_options, resolve_device
from .outputs import SHARDS, output
from .plan import plan_merge
from .report import MergeReport
from .source import Checkpoint, Reader, drop_behind_if_large, split_adapter_spec

log = logging.getLogger("streammerge")


def _execute(job: Job, reader: Reader, dev, run: RunOptions) -> None:
    """Write ``job``'s shards (the ones a resumed run still lacks), then finish it."""
    from .pipeline import LazyExecutor, progress_bar, run_shards

    todo = job.open(run.resume)
    try:
        if run.executor != "inprocess":
            stage, ws_bytes, peak = _distributed(job, todo, dev, run)
        else:
            shards, done, report = job.shards, job.done, job.report
            ex = LazyExecutor(reader, lambda: _executor(reader, job.opts, dev, report))
            with progress_bar(sum(s.nbytes for s in shards), run.progress) as bar:
                bar.update(sum(s.nbytes for s in shards if s.filename in done))
                opener = job.layout.open_writer if job.layout is not None else None
                stage = run_shards(todo, ex, job.work, job.opts, job.record, bar, opener)
            ws_bytes, peak = ex.ex.ws.nbytes, ex.ex.peak_anon
        job.finish(stage, reader, ws_bytes, peak)
    except BaseException as e:
        job.abort(e)
        raise


def _distributed(job: Job, todo: list, dev, run: RunOptions) -> tuple[dict, int, int]:
    report = job.report
    report.device = str(resolve_device(dev) if isinstance(dev, str) else dev)
    specs = [(a.path, a.weight) for a in job.ads]
    where = (run.executor, run.workers, run.address)
    stats = distributed.run_distributed(
        job.plan, todo, job.ckpt.path, specs, job.opts, job.work, job.journal, *where, log
    )
    report.warnings += stats["warnings"]
    report.notes += stats["notes"] + [f"{len(todo)} shard(s) merged by {stats['workers']} {run.executor} worker(s)"]
    stage = {k: stats[k] for k in ("read", "dequant", "merge", "write")}
    stage["compute"] = stage["merge"]
    return stage, stats["work_buffer_bytes"], stats["peak_anon"]


def _executor(reader, opts, device, report):
    """The block executor on ``device`` (a name is resolved now: this imports torch)."""
    from .execute import Executor

    dev = resolve_device(device) if isinstance(device, str) else device
    report.device = str(dev)
    return Executor(reader, opts, dev, report)


def adapter_specs(adapter, adapters) -> list[tuple[str, float]]:
    """``PATH[:WEIGHT]`` strings or ``(path, weight)`` pairs -> ``(path, weight)`` pairs."""
    specs: list[tuple[str, float]] = []
    for item in ([adapter] if not isinstance(adapter, list) else adapter) + list(adapters):
        specs.append((str(item[0]), float(item[1])) if isinstance(item, tuple) else split_adapter_spec(str(item)))
    return specs


def merge(
    base: str | Path | None,
    adapter: str | Path | list,
    out: str | Path,
    *,
    adapters: list | tuple = (),
    dtype: str = "auto",
    shard_size: str | int = "5GB",
    device: str = "auto",
    save_method: str = "merged_16bit",
    dry_run: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = False,
    max_memory: int | str | float = DEFAULT_MAX_MEMORY,
    quant_type: str | None = None,
    blocksize: int | None = None,
    double_quant: bool | None = None,
    compress: str | None = None,
    checksum: str = "xxh3",
    direct_io: bool = True,
    gguf_type: str | None = None,
    executor: str = "inprocess",
    workers: int = 2,
    address: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
) -> MergeReport:
    """Merge LoRA ``adapter`` (and ``adapters``, each ``PATH[:WEIGHT]`` or ``(path, weight)``) into
    ``base`` and write the result to ``out``. Returns the :class:`MergeReport`.

    ``resume`` continues an interrupted run with the same inputs and options, keeping its complete
    shards. ``save_method``: ``merged_16bit`` (dense merged checkpoint), ``merged_4bit`` (merged, then
    re-quantized with bitsandbytes: ``quant_type``/``blocksize``/``double_quant`` override the input's
    settings or the defaults nf4/64/True), ``merged_fp8`` / ``mxfp4`` (an FP8 / MXFP4 base stays so:
    merged weights re-quantized, the rest copied as stored), or ``lora`` (no merge: validate the adapter
    against the base and write a normalized adapter directory), or ``gguf`` (one llama.cpp file of
    ``gguf_type`` f32/f16/bf16/q8_0/auto or a k-quant, and an Ollama Modelfile). ``base`` and adapters
    may be Hub repo ids (``ORG/NAME[@REVISION]``, read from the local cache); ``base=None`` takes the adapter's
    ``base_model_name_or_path``. ``push_to_hub``: upload the finished output to that repo."""
    t0 = time.perf_counter()
    specs = adapter_specs(adapter, adapters)
    opts = make_options(
        dtype=dtype, shard_size=shard_size, device=device, save_method=save_method, allow_nonfinite=allow_nonfinite,
        max_memory=max_memory, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
        compress=compress, checksum=checksum, direct_io=direct_io, gguf_type=gguf_type,
    )  # fmt: skip
    run = RunOptions(executor, workers, address, resume, overwrite, device, progress)
    push = (push_to_hub, private, revision) if push_to_hub else None
    return run_merge(base, specs, Path(out), opts, run, dry_run=dry_run, push=push, t0=t0)


def run_merge(
    base, specs: list[tuple[str, float]], out: Path, opts: MergeOptions, run: RunOptions, *,
    dry_run: bool = False, push: tuple | None = None, t0: float | None = None,
) -> MergeReport:  # fmt: skip
    """:func:`merge` with its options as objects (what to merge, how to run): the command line's entry."""
    t0 = time.perf_counter() if t0 is None else t0
    kind = output(opts.save_method)
    if not kind.merges and (len(specs) != 1 or specs[0][1] != 1.0):
        raise UsageError(f"--save-method {kind.name} takes exactly one adapter, without a weight")
    if push and dry_run:
        raise UsageError("--push-to-hub with --dry-run: a dry run writes nothing to upload")
    if run.executor != "inprocess" and kind.container != SHARDS:
        raise UsageError(f"--save-method {kind.name} writes one file: use the in-process executor")
    sources, rbase, notes = _resolve_inputs(base, specs)
    reader = Reader()
    try:
        ckpt, ads, plan = plan_merge(rbase.path, [(str(r.path), w) for r, w in sources], opts, reader)
        # a plan, a dry run and the lora method need no torch: the device is resolved (importing it) when
        # the first tensor needs arithmetic, so that the command line's background import of torch
        # overlaps the planning and the pass-through tensors in front; an explicit cuda is checked now
        eager = not dry_run and kind.merges and run.device not in ("auto", "cpu")
        dev = resolve_device(run.device) if eager else run.device
        job = Job.prepare(
            out, rbase.path, ckpt, ads, plan, opts, base_spec=rbase.spec, device=dev,
            sources={str(r.path): r for r, _ in sources}, overwrite=run.overwrite, resume=run.resume,
            dry_run=dry_run, t0=t0,
        )  # fmt: skip
        report = job.report
        if job.up_to_date:
            report.seconds = {"total": round(time.perf_counter() - t0, 3)}
            return report
        report.base_source = rbase.describe()
        report.notes[:0] = notes + _sibling_note(rbase, ckpt, specs)
        drop_behind_if_large(reader, ckpt, report.notes)
        if dry_run:
            report.seconds = {"total": round(time.perf_counter() - t0, 3)}
            return report
        if not kind.merges:
            job.write_adapter(reader)
        else:
            job.check_space(report.free_disk_bytes)
            _execute(job, reader, dev, run)
        if push:
            report.pushed_to = hub.push(out, *push, report)
        return report
    finally:
        reader.close()


def _resolve_inputs(base, specs: list[tuple[str, float]]) -> tuple[list, hub.Resolved, list[str]]:
    """Adapters and base as local paths (Hub repo ids: their cached snapshots); without a base, the one
    the first adapter names."""
    sources = [(hub.resolve(p, "adapter"), w) for p, w in specs]
    notes = []
    if base is None:
        base = hub.base_from_adapter(sources[0][0])
        notes.append(f"base taken from the adapter's base_model_name_or_path: {base}")
    rbase = hub.resolve(base, "base")
    if rbase.repo_id:
        notes.append(f"base {rbase.repo_id} at commit {rbase.commit}, read in place from {rbase.path}")
    return sources, rbase, notes


def _sibling_note(rbase: hub.Resolved, ckpt: Checkpoint, specs) -> list[str]:
    sibling = hub.full_precision_sibling(rbase, ckpt.config)
    if sibling is None:
        return []
    ads = " ".join(p if w == 1.0 else f"{p}:{w:g}" for p, w in specs)
    return [
        f"{rbase.repo_id} is pre-quantized and its full-precision sibling {sibling} is in the cache: "
        f"`streammerge merge {sibling} {ads} OUT` merges onto the 16-bit weights instead (see docs/FORMATS.md: "
        "which base to merge onto)"
    ]


__all__ = ["MergeOptions", "MergeReport", "merge"]
