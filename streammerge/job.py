"""One output's lifecycle, the same for a single merge and for each job of a batch (a merge is a batch of
one): :meth:`Job.prepare` (plan checks, the output's layout, side files and report: nothing written yet),
:meth:`Job.open` (lock, fingerprint, journal: the hidden work directory), the shards written by the
caller's executor through :meth:`Job.open_writer` and :meth:`Job.record`, then :meth:`Job.finish` (index,
config, side files and report, published in one rename) or :meth:`Job.abort`.

A run works in a hidden directory beside OUT with a journal of its complete shards; ``--resume``
continues it if its fingerprint (inputs, options, plan) is unchanged, and is a no-op on an OUT that is
already the finished output of the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import Adapter
from .errors import OutputError, StreamMergeError
from .options import MergeOptions
from .outputs import GGUF, Output, output
from .plan import MergePlan
from .report import REPORT_NAME, MergeReport, anon_bytes, new_report, options_dict
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
from .source import Checkpoint
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


@dataclass
class Job:
    """One output being made: what it is (plan, options, registry entry, report) and where its run is."""

    out: Path
    base: Path
    ckpt: Checkpoint
    ads: list[Adapter]
    plan: MergePlan
    opts: MergeOptions
    kind: Output
    report: MergeReport
    aux: dict = field(default_factory=dict)
    layout: object = None  # a GGUF output's layout (sinks.gguf.GgufLayout); None: the plan's shards
    up_to_date: bool = False  # --resume found OUT already finished from the same inputs and options
    work: Path | None = None
    journal: Journal | None = None
    done: dict = field(default_factory=dict)
    lock: OutputLock | None = None
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def prepare(
        cls, out: Path, base: Path, ckpt: Checkpoint, ads: list[Adapter], plan: MergePlan, opts: MergeOptions, *,
        base_spec: str, device, sources=None, overwrite: bool = False, resume: bool = False, dry_run: bool = False,
        t0: float | None = None,
    ) -> Job:  # fmt: skip
        """Check OUT and lay the output out, before anything is written (``resume`` on OUT already finished
        from these inputs and options: a job with nothing to do)."""
        t0 = time.perf_counter() if t0 is None else t0
        kind = output(opts.save_method)
        report = new_report(base_spec, ads, out, opts, plan, device, dry_run, sources)
        job = cls(out, base, ckpt, ads, plan, opts, kind, report, t0=t0)
        if resume and not dry_run and job.finished_before():
            report.up_to_date, job.up_to_date = True, True
            report.notes.insert(0, f"--resume: {out} is already the finished output of these inputs and options")
            return job
        check_output(out, [base] + [Path(a.path) for a in ads], overwrite)
        job.aux = aux_files(base, ads, ckpt)
        if kind.container == GGUF:
            from .sinks.gguf import plan_gguf

            lay = job.layout = plan_gguf(plan, job.aux, out, opts)
            report.shards = [{"file": lay.final_name, "bytes": lay.total, "tensors": len(lay.tensors)}]
            report.notes.append(f"gguf: {lay.final_name}, {len(lay.tensors)} tensors ({opts.gguf_type})")
        return job

    def finished_before(self) -> bool:
        """OUT is the finished output of these inputs and options; a finished output of others is an error."""
        have = finished_fingerprint(self.out)
        if have is None:
            return False
        if have != fingerprint_digest(self.fingerprint()):
            raise OutputError(
                f"{self.out}: holds a finished output of other inputs or options (its {REPORT_NAME} records "
                "another fingerprint); --resume does not replace it",
                hint="pass --overwrite to replace it, or choose another path",
            )
        return True

    def fingerprint(self) -> dict:
        return fingerprint(self.ckpt, self.ads, self.plan, options_dict(self.opts))

    @property
    def shards(self) -> tuple:
        """The files to write: the plan's shards, or the one GGUF file."""
        return self.plan.shards if self.layout is None else (self.layout.shard(),)

    def check_space(self, free: int) -> None:
        if self.layout is not None:  # a k-quant is made beside the 16-bit file, which then goes
            needed = self.layout.total * (2 if self.layout.final_name != self.layout.filename else 1)
        else:
            aux = self.aux.values()
            needed = self.plan.total_size + sum(len(p) if isinstance(p, bytes) else p.stat().st_size for p in aux)
        if needed > free:
            raise OutputError(
                f"{self.out.parent}: {free / 1e9:.2f} GB free, the output needs {needed / 1e9:.2f} GB",
                hint="free disk space or choose another output location",
            )

    def open(self, resume: bool = False) -> list:
        """Lock OUT, open (or with ``resume`` reopen) the work directory; the shards still to write."""
        self.lock = OutputLock(self.out).__enter__()
        try:
            fp = self.fingerprint()
            self.report.fingerprint = fingerprint_digest(fp)
            self.work, self.journal, self.done = open_run(self.out, fp, resume)
        except BaseException:
            self.close()
            raise
        todo = [s for s in self.shards if s.filename not in self.done]
        self.report.resumed_shards = len(self.shards) - len(todo)
        return todo

    def open_writer(self, path: Path, shard, sharing: int = 1):
        from .sinks.safetensors import open_shard_writer

        if self.layout is not None:
            return self.layout.open_writer(path, shard, self.opts)
        return open_shard_writer(path, shard, self.opts, sharing)

    def record(self, writer, filename: str) -> None:
        """A shard is complete: close (fsync) it and record it in the journal."""
        writer.close()
        self.journal.record(filename, writer.path.stat().st_size, writer.checksum)

    def write_adapter(self, reader) -> None:
        """The adapter output: no shards, the normalized adapter folder written and published at once."""
        from .sinks.lora import write_lora

        self.report.fingerprint = fingerprint_digest(self.fingerprint())
        with OutputLock(self.out):
            write_lora(self.ads[0], self.out, reader, self.report, self.opts.direct_io)
        self.report.seconds["total"] = round(time.perf_counter() - self.t0, 3)

    def finish(self, stage: dict, reader, ws_bytes: int, peak_anon: int) -> None:
        """Index, config, side files and report into the work directory, then publish it as OUT."""
        try:
            plan, aux = self.plan, self.aux
            if self.layout is not None:
                from .sinks.gguf import finish_gguf

                self.report.shards = finish_gguf(self.work, self.layout, self.journal, self.report)
                plan, aux = None, {}
            _write_side_files(self.work, plan, aux)
            self._write_report(stage, reader, ws_bytes, peak_anon)
            (self.work / JOURNAL_NAME).unlink()
            commit_work_dir(self.work, self.out)
        finally:
            self.close()

    def _write_report(self, stage: dict, reader, ws_bytes: int, peak_anon: int) -> None:
        report, st = self.report, stage
        report.seconds = {
            "read": round(st["read"], 3),
            "dequant": round(st["dequant"], 3),
            "merge": round(st["merge"] - st["read"] - st["dequant"], 3),
            "write": round(st["write"], 3),
            "compute": round(st["compute"], 3),
            "total": round(time.perf_counter() - self.t0, 3),
        }
        for rec in report.shards:
            rec.setdefault("checksum", self.journal.shards.get(rec["file"], {}).get("checksum"))
        report.work_buffer_bytes = ws_bytes
        report.peak_anon_bytes = max(peak_anon, anon_bytes())
        report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report.bytes_read = reader.bytes_read
        write_json(self.work / REPORT_NAME, report.to_dict())

    def abort(self, e: BaseException) -> None:
        """Interrupted, I/O or output errors are resumable: keep the work directory (hidden, never mistaken
        for a model) and its journal; anything else discards it."""
        try:
            if self.work is None:
                return
            if isinstance(e, (KeyboardInterrupt, OutputError, OSError)):
                kept = f"partial output kept in {self.work}; run the same command with --resume to continue"
                if isinstance(e, StreamMergeError):  # said after the cause, which stays the first line
                    e.hint = f"{e.hint}; {kept}" if e.hint else kept
                else:
                    e.add_note(kept)
            else:
                discard_work_dir(self.work)
        finally:
            self.close()

    def discard(self) -> None:
        """Drop the work directory whatever the cause (a failed job of a batch)."""
        if self.work is not None:
            discard_work_dir(self.work)
        self.close()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None


def _write_side_files(work: Path, plan: MergePlan | None, aux: dict) -> None:
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
