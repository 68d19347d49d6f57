"""What a run reports: :class:`MergeReport` (written to OUT as JSON and printed by ``--json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from .outputs import output
from .version import __version__

REPORT_NAME = "streammerge_report.json"


@dataclass
class MergeReport:
    """What a merge did. ``to_dict()`` is the JSON written to OUT and printed by ``--json``."""

    version: str
    base: str
    adapters: list[dict]
    out: str
    options: dict
    dry_run: bool
    device: str
    shards: list[dict]
    total_size: int
    modules: list[dict]
    tensors_total: int
    tensors_merged: int
    tensors_copied: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0
    peak_anon_bytes: int = 0
    bytes_read: int = 0
    free_disk_bytes: int | None = None
    merged_onto: str = ""
    resumed_shards: int = 0
    work_buffer_bytes: int = 0
    base_source: dict = field(default_factory=dict)  # the local path, or the repo id, revision and commit
    pushed_to: str = ""
    fingerprint: str = ""  # sha256 of what the run is (inputs, options, plan): --resume compares it
    up_to_date: bool = False  # --resume found OUT already finished from these inputs and options

    def to_dict(self) -> dict:
        return asdict(self)


def scratch_report() -> MergeReport:
    """An empty report, for runs whose warnings are collected elsewhere (workers, verify)."""
    return MergeReport("", "", [], "", {}, False, "", [], 0, [], 0, 0, 0)


def anon_bytes() -> int:
    """This process's anonymous resident memory (RssAnon): what merging costs beyond the page cache."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _source(ad, sources) -> dict:
    """Where an adapter came from, when it was named by a repo id."""
    for path, src in (sources or {}).items():
        if src.repo_id and (ad.path == path or ad.path.startswith(path + "/")):
            return {"source": src.describe()}
    return {}


def _existing_parent(p: Path) -> Path:
    p = p.resolve()
    while not p.exists():
        p = p.parent
    return p


def options_dict(opts) -> dict:
    return {
        "dtype": opts.dtype,
        "shard_size": opts.shard_size,
        "device": opts.device,
        "save_method": opts.save_method,
        "allow_nonfinite": opts.allow_nonfinite,
        "max_memory": opts.block_bytes,
        "quant": asdict(opts.quant) if opts.quant else None,
        "compress": opts.compress,
        "checksum": opts.checksum,
        "direct_io": opts.direct_io,
    }


def new_report(base, ads: list, out: Path, opts, plan, dev, dry_run: bool = False, sources=None) -> MergeReport:
    """The report of a planned merge (filled in as the run goes)."""
    report = MergeReport(
        version=__version__,
        base=str(base),
        adapters=[
            {"path": a.path, "weight": a.weight, "weights_file": a.weights_file, **_source(a, sources)} for a in ads
        ],
        out=str(out),
        options=options_dict(opts),
        dry_run=dry_run,
        device=str(dev),
        shards=[{"file": s.filename, "bytes": s.nbytes, "tensors": len(s.jobs)} for s in plan.shards],
        total_size=plan.total_size,
        modules=[asdict(m) for m in plan.modules],
        tensors_total=len(plan.jobs),
        tensors_merged=sum(1 for j in plan.jobs if j.updates),
        tensors_copied=sum(1 for j in plan.jobs if j.is_copy),
        notes=list(plan.notes),
        free_disk_bytes=psutil.disk_usage(str(_existing_parent(out))).free,
        merged_onto=plan.merged_onto,
        warnings=list(plan.warnings),
    )
    warning = output(opts.save_method).warning
    if warning:
        report.warnings.append(warning)
    return report
