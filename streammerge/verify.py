"""Verification of a finished output: complete and consistent, and (given the inputs) equal to a
recomputation, bit for bit.

:func:`verify_output` is the one entry point (``streammerge verify`` and ``merge --verify``). It tells
the output's kind from its report's ``options.save_method`` (from the files present when the report is
missing or names no kind, which is itself a problem) and checks it with that kind's rules:

- ``merged_16bit``, ``merged_4bit``, ``merged_fp8``, ``mxfp4``, plain or ``--compress zstd``
  (``*.safetensors.zst`` shards, the index naming them): :func:`verify` (index <-> shards <-> headers,
  the report's files, bytes and checksums; with the inputs, tensors recomputed bit for bit), then the
  kind's format (:func:`_format_rules`): config.json's ``quantization_config`` and the stored tensors
  read back as that format, as streammerge reads a base;
- ``lora``: :func:`verify_lora` (the adapter folder; with the input adapter, its tensors compared);
- ``gguf``: :func:`verify_gguf` (read back by gguf-py, size and checksum, the Ollama Modelfile; the
  tensors are not recomputed).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import hub
from .errors import StreamMergeError
from .options import MergeOptions, QuantOut
from .outputs import ADAPTER, GGUF, OUTPUTS, SAVE_METHODS
from .report import REPORT_NAME
from .sinks.outdir import algo_of, file_checksum
from .source import Checkpoint, Reader, open_checkpoint, split_adapter_spec
from .verify_kinds import (
    DENSE,
    LORA_CONFIG,
    LORA_WEIGHTS,
    VerifyReport,
    _first_line,
    _of,
    _read_report,
    _shown,
    verify_gguf,
    verify_lora,
)


def _kind_from_files(out: Path) -> tuple[str | None, str]:
    """The output kind the files in ``out`` show, and the evidence (or None and what was found)."""
    names = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    ggufs = [n for n in names if n.endswith(".gguf")]
    if ggufs:
        return _of(GGUF), _shown(ggufs)
    if LORA_WEIGHTS in names or LORA_CONFIG in names:
        return _of(ADAPTER), _shown([n for n in names if n in (LORA_CONFIG, LORA_WEIGHTS)])
    shards = [n for n in names if n.endswith((".safetensors", ".safetensors.zst", ".safetensors.index.json"))]
    if not shards:
        return None, _shown(names, 8) if names else "nothing (an empty directory)"
    try:
        qc = json.loads((out / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        qc = None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method is None:
        return DENSE, f"{_shown(shards)}, no quantization_config"
    for o in OUTPUTS.values():
        if o.quant_method is not None and method == o.quant_method and (o.quant_flag is None or qc.get(o.quant_flag)):
            return o.name, f"{_shown(shards)}, config.json quantization_config.quant_method {method!r}"
    return None, f"{_shown(shards)} quantized with {method!r} (config.json), which streammerge does not write"


def _kind(out: Path) -> tuple[str | None, str, list[str], bool]:
    """(kind, where it came from, problems, whether the report is readable) of the output at ``out``."""
    rp = out / REPORT_NAME
    report, why = _read_report(out)
    if report is not None:
        opts = report.get("options")
        sm = opts.get("save_method") if isinstance(opts, dict) else None
        if isinstance(sm, str) and sm in SAVE_METHODS:
            seen, evidence = _kind_from_files(out)
            if seen is not None and seen != sm:
                return (
                    sm,
                    "report",
                    [f"{rp}: records a {sm} output, but the files present are a {seen} one: {evidence}"],
                    True,
                )
            return sm, "report", [], True
        why = (
            "records no options.save_method"
            if sm is None
            else f"records options.save_method {sm!r}, no kind of output streammerge writes ({', '.join(SAVE_METHODS)})"
        )
    kind, evidence = _kind_from_files(out)
    if kind is None:
        return None, "", [f"{rp}: {why}, and the files present are no streammerge output: found {evidence}"], False
    if report is None:
        why += " (no recorded kind, sizes or checksums)"
    return kind, "files", [f"{rp}: {why}; checked as {kind}, what the files present show: {evidence}"], bool(report)


def verify_output(
    out: str | Path,
    base: str | Path | None = None,
    adapters: list | tuple = (),
    sample: int | None = None,
    device: str = "cpu",
) -> VerifyReport:
    """Check any output streammerge writes with its kind's rules (see the module's doc); ``base`` and
    ``adapters`` (both, or neither): also compare it with what these inputs give (``sample`` tensors
    recomputed, all when None; a gguf output is read back only, said in the notes)."""
    out = Path(out)
    if not out.is_dir():
        rep = VerifyReport(str(out), kind="unknown")
        what = "is not a directory" if out.exists() else "does not exist"
        rep.problems.append(f"{out}: {what}: no streammerge output to verify")
        return rep
    kind, kind_from, lead, report_ok = _kind(out)
    if kind is None:
        rep = VerifyReport(str(out), kind="unknown")
        rep.problems += lead
        return rep
    given = base is not None and bool(adapters)
    container = OUTPUTS[kind].container
    if container == GGUF:
        rep = verify_gguf(out)
        if given:
            rep.notes.append(
                "gguf: read back only (gguf-py: header, keys, tensor infos, every tensor's data inside the file; "
                "size and checksum as recorded); its tensors are not recomputed from --base/--adapter "
                "(merge --verify does not either)"
            )
    elif container == ADAPTER:
        rep = verify_lora(out, base, adapters)
    else:
        rep = verify(out, base, adapters, sample, device)
        _format_rules(out, kind, rep)
        rep.compressed = any(out.glob("*.safetensors.zst"))
    rep.kind, rep.kind_from = kind, kind_from
    if not report_ok:  # the lead problem says it once
        rp = f"{out / REPORT_NAME}: "
        rep.problems = [p for p in rep.problems if not p.startswith(rp)]
    rep.problems[:0] = lead
    return rep


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
    report_path = out / REPORT_NAME
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
    held: dict[str, int] = {}
    for t in ckpt.tensors.values():
        held[Path(t.file).name] = held.get(Path(t.file).name, 0) + t.nbytes
    for name in sorted(on_disk & set(shards)):
        want_bytes = shards[name].get("bytes")
        if isinstance(want_bytes, int) and want_bytes != held.get(name, 0):
            rep.problems.append(f"{out / name}: holds {held.get(name, 0)} tensor bytes, the report says {want_bytes}")
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
    """A safetensors output (merged_16bit, merged_4bit, merged_fp8, mxfp4; plain or zstd): index, shard
    headers and files agree; shard sizes and checksums match the report; and, with ``base`` and
    ``adapters``, ``sample`` tensors (all when None) recomputed equal the written ones. The kind's own
    format rules are :func:`verify_output`'s."""
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
        save_method=o.get("save_method", DENSE),
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


def _format_rules(out: Path, kind: str, rep: VerifyReport) -> None:
    """A safetensors output of ``kind`` read back as streammerge reads a base: config.json's
    quantization_config is the kind's (none for merged_16bit), every quantized weight's companion
    tensors are there and fit, and the weights are stored in the kind's format and no other."""
    from . import formats

    try:
        ckpt = open_checkpoint(out)
    except StreamMergeError:
        return  # verify() said why
    cfg = out / "config.json"
    qc = ckpt.config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    o = OUTPUTS[kind]
    want, label = o.quant_method, o.quant_label or None
    if want is None and qc is not None:
        rep.problems.append(f"{cfg}: has a quantization_config ({method!r}); a {kind} output is dense")
    elif want is not None and method != want:
        rep.problems.append(f"{cfg}: quantization_config.quant_method is {method!r}; a {kind} output has {want!r}")
    elif o.quant_flag is not None and qc.get(o.quant_flag) is not True:
        rep.problems.append(f"{cfg}: quantization_config.{o.quant_flag} is not true in a {kind} output")
    reader = Reader()
    try:
        logical = formats.logical_tensors(ckpt, lambda ref: bytes(reader.raw(ref)))
    except StreamMergeError as e:
        rep.problems.append(_first_line(e))
        return
    finally:
        reader.close()
    counts = formats.quantized_counts(logical)
    for other, n in counts.items():
        if other != label:
            rep.problems.append(f"{out}: holds {n} {other} weight(s), which a {kind} output does not")
    if label is not None and not counts.get(label):
        rep.problems.append(f"{out}: holds no {label} weight, which a {kind} output stores its quantized weights as")
