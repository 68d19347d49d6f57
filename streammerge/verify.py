"""Verification of a finished output: complete and consistent, and (given the inputs) equal to a
recomputation, bit for bit."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import hub
from .errors import StreamMergeError
from .options import MergeOptions, QuantOut
from .sinks.outdir import algo_of, file_checksum
from .source import Checkpoint, Reader, open_checkpoint, split_adapter_spec


@dataclass
class VerifyReport:
    out: str
    files: int = 0
    tensors: int = 0
    checksums_checked: int = 0
    recomputed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _structure(out: Path, rep: VerifyReport) -> tuple[Checkpoint | None, dict | None]:
    try:
        ckpt = open_checkpoint(out)  # index <-> files <-> headers, sizes and offsets
    except StreamMergeError as e:
        rep.problems.append(str(e).splitlines()[0])
        return None, None
    rep.files, rep.tensors = len(ckpt.shard_files), len(ckpt.tensors)
    index = out / "model.safetensors.index.json"
    if index.exists():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if total != ckpt.total_bytes:
            rep.problems.append(f"{index}: total_size {total} but the shards hold {ckpt.total_bytes} bytes")
    report_path = out / "streammerge_report.json"
    if not report_path.exists():
        rep.problems.append(f"{report_path}: missing (no checksums to compare)")
        return ckpt, None
    try:
        report = json.loads(report_path.read_text())
        shards = {s["file"]: s for s in report["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        rep.problems.append(f"{report_path}: unreadable ({e})")
        return ckpt, None
    on_disk = {Path(f).name for f in ckpt.shard_files}
    for missing in sorted(set(shards) - on_disk):
        rep.problems.append(f"{out / missing}: listed in the report but missing")
    for extra in sorted(on_disk - set(shards)):
        rep.problems.append(f"{out / extra}: not listed in the report")
    for name in sorted(on_disk & set(shards)):
        want = shards[name].get("checksum")
        if want is None:
            continue
        rep.checksums_checked += 1
        if file_checksum(out / name, algo_of(want)) != want:
            rep.problems.append(
                f"{out / name}: {algo_of(want)} checksum differs from the report (corrupted or modified)"
            )
    return ckpt, report


def verify(
    out: str | Path,
    base: str | Path | None = None,
    adapters: list | tuple = (),
    sample: int | None = None,
    device: str = "cpu",
) -> VerifyReport:
    """Check ``out``: index, shard headers and files agree; shard checksums match the report; and, with
    ``base`` and ``adapters``, ``sample`` tensors (all when None) recomputed equal the written ones."""
    from .execute import Executor
    from .options import resolve_device
    from .plan import plan_merge
    from .report import scratch_report

    out = Path(out)
    rep = VerifyReport(str(out))
    ckpt, report = _structure(out, rep)
    if ckpt is None or base is None or not adapters:
        return rep
    if report is None:
        rep.problems.append("cannot recompute without streammerge_report.json (it holds the merge options)")
        return rep
    o = report.get("options", {})
    q = o.get("quant")
    opts = MergeOptions(
        dtype=o.get("dtype", "auto"),
        shard_size=int(o.get("shard_size", 5_000_000_000)),
        save_method=o.get("save_method", "merged_16bit"),
        allow_nonfinite=True,
        quant=QuantOut(**q) if q else None,
        compress=o.get("compress"),
    )
    specs = [(str(a[0]), float(a[1])) if isinstance(a, tuple) else split_adapter_spec(str(a)) for a in adapters]
    specs = [(str(hub.resolve(p, "adapter").path), w) for p, w in specs]
    base = hub.resolve(base, "base").path
    reader = Reader()
    try:
        _, _, plan = plan_merge(base, specs, opts, reader)
        layout = {o[0]: (s.filename, o[1], tuple(o[2])) for s in plan.shards for j in s.jobs for o in j.outputs}
        written = {n: (Path(t.file).name, t.dtype, t.shape) for n, t in ckpt.tensors.items()}
        if layout != written:
            diff = sorted(set(layout.items()) ^ set(written.items()))[:10]
            rep.problems.append(f"the output's tensors differ from what these inputs plan: {diff}")
            return rep
        jobs = plan.jobs
        if sample is not None and sample < len(jobs):
            merged = [j for j in jobs if j.updates]
            rest = [j for j in jobs if not j.updates]
            rng = random.Random(0)
            k = min(len(merged), max(sample - sample // 4, 1))
            jobs = rng.sample(merged, k) + rng.sample(rest, min(len(rest), sample - k))
        ex = Executor(reader, opts, resolve_device(device), scratch_report())
        for job in jobs:
            pos: dict[str, int] = {}
            bad = False
            for name, buf in ex.blocks(job):
                ref = ckpt.tensors[name]
                start = pos.get(name, 0)
                got = reader.raw(ref, start, buf.nbytes)
                if bytes(got) != bytes(buf):
                    bad = True
                pos[name] = start + buf.nbytes
            rep.recomputed += 1
            if bad:
                rep.problems.append(f"{job.name}: differs from its recomputation from the inputs")
    except StreamMergeError as e:
        rep.problems.append(f"cannot recompute: {str(e).splitlines()[0]}")
    finally:
        reader.close()
    return rep


def verify_gguf(out: str | Path) -> VerifyReport:
    """A GGUF output: the file the report names, with its size and checksum, read back by gguf-py
    (header, keys, tensor infos) with every tensor's data inside the file."""
    out = Path(out)
    rep = VerifyReport(str(out))
    try:
        report = json.loads((out / "streammerge_report.json").read_text())
        (rec,) = report["shards"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        rep.problems.append(f"{out / 'streammerge_report.json'}: missing or unreadable ({e})")
        return rep
    path = out / rec["file"]
    if not path.is_file() or path.stat().st_size != rec["bytes"]:
        rep.problems.append(f"{path}: missing or not {rec['bytes']} bytes as the report says")
        return rep
    rep.files = 1
    if file_checksum(path, algo_of(rec["checksum"])) != rec["checksum"]:
        rep.problems.append(f"{path}: checksum differs from the report's {rec['checksum']}")
    rep.checksums_checked = 1
    try:
        from gguf import GGUFReader

        tensors = GGUFReader(path).tensors
    except Exception as e:
        rep.problems.append(f"{path}: gguf-py cannot read it ({e})")
        return rep
    rep.tensors = len(tensors)
    size = path.stat().st_size
    for t in tensors:
        if t.data_offset + t.n_bytes > size:
            rep.problems.append(f"{path}: tensor {t.name} runs past the end of the file")
    if rec.get("tensors") is not None and rec["tensors"] > len(tensors):
        rep.problems.append(f"{path}: {len(tensors)} tensors, the report announced at least {rec['tensors']}")
    return rep
