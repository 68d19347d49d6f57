"""The public entry point: ``merge(base, adapter, out, ...)`` = plan -> pipeline -> finish.

A run works in a hidden directory beside OUT with a journal of its complete shards; ``--resume``
continues it if its fingerprint (inputs, options, plan) is unchanged; the finished directory, with
index, config, side files and report, is renamed to OUT in one step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from pathlib import Path

from . import distributed, hub
from .adapter import Adapter
from .errors import OutputError, StreamMergeError, UsageError
from .options import DEFAULT_MAX_MEMORY, MergeOptions, make_options, resolve_device
from .plan import MergePlan, plan_merge
from .report import REPORT_NAME, MergeReport, anon_bytes, new_report, options_dict
from .sinks.lora import write_lora
from .sinks.outdir import (
    JOURNAL_NAME,
    Journal,
    OutputLock,
    aux_files,
    check_output,
    commit_work_dir,
    copy_file,
    discard_work_dir,
    finished_fingerprint,
    prepare_work_dir,
    work_dir_for,
    write_json,
)
from .source import Checkpoint, Reader, drop_behind_if_large, split_adapter_spec
from .version import __version__

log = logging.getLogger("streammerge")


def fingerprint(ckpt: Checkpoint, ads: list[Adapter], plan: MergePlan, options: dict) -> dict:
    """What a run is: its inputs' identities (size, mtime, sha256 of each safetensors header), its options
    and a digest of its plan. ``--resume`` continues a run only if all of these are unchanged."""
    if ckpt.aux is not None:  # an archive: its own identity covers every member
        files = [Path(ckpt.path)]
    else:
        files = [Path(ckpt.path) / "config.json", *map(Path, ckpt.shard_files)]
        index = Path(ckpt.path) / "model.safetensors.index.json"
        if index.exists():
            files.append(index)
    for ad in ads:
        files += [Path(ad.path) / "adapter_config.json", Path(ad.weights_file)]
    ident = {}
    for f in files:
        st = f.stat()
        head = ""
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                head = hashlib.sha256(fh.read(n)).hexdigest()
        ident[str(f.resolve())] = [st.st_size, st.st_mtime_ns, head]
    return {
        "version": __version__,
        "inputs": ident,
        "options": {k: v for k, v in options.items() if k not in ("device", "max_memory", "direct_io")},
        "adapters": [[a.path, a.weight] for a in ads],
        "plan": plan.digest,
        "config": hashlib.sha256(json.dumps(plan.config, sort_keys=True).encode()).hexdigest(),
    }


def fingerprint_digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def up_to_date(out: Path, ckpt: Checkpoint, ads: list[Adapter], plan: MergePlan, options: dict) -> bool:
    """``--resume`` on a finished output: True when ``out`` is the finished output of these inputs and
    options (nothing to do); a finished output of anything else stays an error."""
    have = finished_fingerprint(out)
    if have is None:
        return False
    if have != fingerprint_digest(fingerprint(ckpt, ads, plan, options)):
        raise OutputError(
            f"{out}: holds a finished output of other inputs or options (its {REPORT_NAME} records another "
            "fingerprint); --resume does not replace it",
            hint="pass --overwrite to replace it, or choose another path",
        )
    return True


def open_run(out: Path, fp: dict, resume: bool) -> tuple[Path, Journal, dict[str, dict]]:
    """The work directory and journal: a fresh one, or with ``resume`` the interrupted run's, whose
    complete shards (re-hashed) are kept."""
    work = work_dir_for(out)
    if resume and work.is_dir():
        old = Journal.load(work)
        if old is None:
            log.warning("%s: no readable journal; starting over", work)
        elif old.fingerprint != fp:
            changed = [k for k in fp if fp[k] != old.fingerprint.get(k)]
            raise OutputError(
                f"{work}: cannot resume: the {', '.join(changed)} changed since the interrupted run",
                hint="run without --resume to start over (the partial output will be discarded)",
            )
        else:
            done = old.valid_shards()
            for stale in set(old.shards) - set(done):
                log.warning("%s: recorded as complete but missing or changed; rewriting it", stale)
            old.shards = dict(done)
            log.info("resuming: %d of the planned shards are complete", len(done))
            return prepare_work_dir(out, keep=True), old, done
    elif resume:
        log.info("--resume: no interrupted run for %s; starting from the beginning", out)
    elif work.is_dir():
        log.info("discarding the partial output of an earlier run (use --resume to continue it instead)")
    work = prepare_work_dir(out)
    journal = Journal(work, fp)
    journal.save()
    return work, journal, {}


def finish_output(work, out, plan, aux, report, journal, stage, t0, reader, ws_bytes: int, peak_anon: int) -> None:
    """Index, config, side files and report into the work directory, then publish it as ``out``
    (``plan`` None: a GGUF output, which has none of these)."""
    if plan is not None and len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.total_size, "streammerge": __version__},
            "weight_map": {o[0]: s.filename for s in plan.shards for j in s.jobs for o in j.outputs},
        }
        write_json(work / "model.safetensors.index.json", index)
    if plan is not None:
        write_json(work / "config.json", plan.config)
    for name, src in aux.items():
        copy_file(src, work / name)
    st = stage
    report.seconds = {
        "read": round(st["read"], 3),
        "dequant": round(st["dequant"], 3),
        "merge": round(st["merge"] - st["read"] - st["dequant"], 3),
        "write": round(st["write"], 3),
        "compute": round(st["compute"], 3),
        "total": round(time.perf_counter() - t0, 3),
    }
    for rec in report.shards:
        rec.setdefault("checksum", journal.shards.get(rec["file"], {}).get("checksum"))
    report.work_buffer_bytes = ws_bytes
    report.peak_anon_bytes = max(peak_anon, anon_bytes())
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.bytes_read = reader.bytes_read
    write_json(work / REPORT_NAME, report.to_dict())
    (work / JOURNAL_NAME).unlink()
    commit_work_dir(work, out)


def _keep_or_discard(work: Path, e: BaseException) -> None:
    """Interrupted, I/O or output errors are resumable: keep the work directory (hidden, never mistaken
    for a model) and its journal; anything else discards it."""
    if isinstance(e, (KeyboardInterrupt, OutputError, OSError)):
        kept = f"partial output kept in {work}; run the same command with --resume to continue"
        if isinstance(e, StreamMergeError):  # said after the cause, which stays the first line
            e.hint = f"{e.hint}; {kept}" if e.hint else kept
        else:
            e.add_note(kept)
    else:
        discard_work_dir(work)


def _gguf_layout(plan: MergePlan, aux: dict, out: Path, opts):
    from .sinks.gguf import plan_gguf

    return plan_gguf(plan, aux, out, opts)


def _execute(plan, aux, ckpt, ads, out, reader, opts, dev, report, progress, resume, t0, dist, layout=None) -> None:
    from .pipeline import LazyExecutor, progress_bar, run_shards

    fp = fingerprint(ckpt, ads, plan, report.options)
    report.fingerprint = fingerprint_digest(fp)
    work, journal, done = open_run(out, fp, resume)
    shards = plan.shards if layout is None else (layout.shard(),)
    todo = [s for s in shards if s.filename not in done]
    report.resumed_shards = len(shards) - len(todo)
    try:
        if dist is not None:
            report.device = str(resolve_device(dev) if isinstance(dev, str) else dev)
            specs = [(a.path, a.weight) for a in ads]
            stats = distributed.run_distributed(plan, todo, ckpt.path, specs, opts, work, journal, *dist, log)
            report.warnings += stats["warnings"]
            report.notes += stats["notes"] + [f"{len(todo)} shard(s) merged by {stats['workers']} {dist[0]} worker(s)"]
            stage = {k: stats[k] for k in ("read", "dequant", "merge", "write")}
            stage["compute"] = stage["merge"]
            ws_bytes, peak = stats["work_buffer_bytes"], stats["peak_anon"]
        else:
            ex = LazyExecutor(reader, lambda: _executor(reader, opts, dev, report))
            with progress_bar(sum(s.nbytes for s in shards), progress) as bar:
                bar.update(sum(s.nbytes for s in shards if s.filename in done))

                def record(writer, filename: str) -> None:
                    writer.close()
                    journal.record(filename, writer.path.stat().st_size, writer.checksum)

                opener = layout.open_writer if layout is not None else None
                stage = run_shards(todo, ex, work, opts, record, bar, opener)
            ws_bytes, peak = ex.ex.ws.nbytes, ex.ex.peak_anon
        if layout is not None:
            from .sinks.gguf import finish_gguf

            report.shards = finish_gguf(work, layout, journal, report)
            plan, aux = None, {}
        finish_output(work, out, plan, aux, report, journal, stage, t0, reader, ws_bytes, peak)
    except BaseException as e:
        _keep_or_discard(work, e)
        raise


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
    if save_method == "lora" and (len(specs) != 1 or specs[0][1] != 1.0):
        raise UsageError("--save-method lora takes exactly one adapter, without a weight")
    if push_to_hub and dry_run:
        raise UsageError("--push-to-hub with --dry-run: a dry run writes nothing to upload")
    opts = make_options(
        dtype, shard_size, device, save_method, allow_nonfinite, max_memory, quant_type, blocksize, double_quant,
        compress, checksum, direct_io, gguf_type,
    )  # fmt: skip
    out = Path(out)
    sources, rbase, notes = _resolve_inputs(base, specs)
    base = rbase.path
    reader = Reader()
    try:
        ckpt, ads, plan = plan_merge(base, [(str(r.path), w) for r, w in sources], opts, reader)
        by_path = {str(r.path): r for r, _ in sources}
        if resume and not dry_run and up_to_date(out, ckpt, ads, plan, options_dict(opts)):
            return _up_to_date_report(new_report(rbase.spec, ads, out, opts, plan, device, False, by_path), t0)
        check_output(out, [base] + [Path(a.path) for a in ads], overwrite)
        aux = aux_files(base, ads, ckpt)
        # a plan, a dry run and the lora method need no torch: the device is resolved (importing it) when
        # the first tensor needs arithmetic, so that the command line's background import of torch
        # overlaps the planning and the pass-through tensors in front; an explicit cuda is checked now
        eager = not dry_run and save_method != "lora" and device not in ("auto", "cpu")
        dev = resolve_device(device) if eager else device
        layout = _gguf_layout(plan, aux, out, opts) if save_method == "gguf" else None
        report = new_report(rbase.spec, ads, out, opts, plan, dev, dry_run, by_path)
        if layout is not None:
            report.shards = [{"file": layout.final_name, "bytes": layout.total, "tensors": len(layout.tensors)}]
            report.notes.append(f"gguf: {layout.final_name}, {len(layout.tensors)} tensors ({opts.gguf_type})")
        report.base_source = rbase.describe()
        report.notes[:0] = notes + _sibling_note(rbase, ckpt, specs)
        drop_behind_if_large(reader, ckpt, report.notes)
        if dry_run:
            report.seconds = {"total": round(time.perf_counter() - t0, 3)}
            return report
        if save_method == "lora":
            report.fingerprint = fingerprint_digest(fingerprint(ckpt, ads, plan, report.options))
            with OutputLock(out):
                write_lora(ads[0], out, reader, report, opts.direct_io)
            report.seconds["total"] = round(time.perf_counter() - t0, 3)
            if push_to_hub:
                report.pushed_to = hub.push(out, push_to_hub, private, revision, report)
            return report
        _check_space(out, plan, aux, report.free_disk_bytes, layout)
        with OutputLock(out):
            dist = None if executor == "inprocess" else (executor, workers, address)
            if layout is not None and dist is not None:
                raise UsageError("--save-method gguf writes one file: use the in-process executor")
            _execute(plan, aux, ckpt, ads, out, reader, opts, dev, report, progress, resume, t0, dist, layout)
        if push_to_hub:
            report.pushed_to = hub.push(out, push_to_hub, private, revision, report)
        return report
    finally:
        reader.close()


def _up_to_date_report(report: MergeReport, t0: float) -> MergeReport:
    report.up_to_date, report.seconds = True, {"total": round(time.perf_counter() - t0, 3)}
    report.notes.insert(0, f"--resume: {report.out} is already the finished output of these inputs and options")
    return report


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
        f"`streammerge merge {sibling} {ads} OUT` merges onto the 16-bit weights instead (see README: which base "
        "to merge onto)"
    ]


def _check_space(out: Path, plan: MergePlan, aux: dict, free: int, layout=None) -> None:
    if layout is not None:  # a k-quant is made beside the 16-bit file, which then goes
        needed = layout.total * (2 if layout.final_name != layout.filename else 1)
    else:
        needed = plan.total_size + sum(len(p) if isinstance(p, bytes) else p.stat().st_size for p in aux.values())
    if needed > free:
        raise OutputError(
            f"{out.parent}: {free / 1e9:.2f} GB free, the output needs {needed / 1e9:.2f} GB",
            hint="free disk space or choose another output location",
        )


__all__ = ["MergeOptions", "MergeReport", "merge"]
