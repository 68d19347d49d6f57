"""The kind-specific checks of :mod:`streammerge.verify` and what they share: the report
(:class:`VerifyReport`), the adapter folder (:func:`verify_lora`) and the GGUF file with its Modelfile
(:func:`verify_gguf`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import hub
from .errors import OutputError, StreamMergeError
from .options import MergeOptions
from .outputs import ADAPTER, OUTPUTS, SHARDS
from .report import REPORT_NAME
from .sinks.outdir import algo_of, file_checksum
from .source import Reader, parse_header, split_adapter_spec, tensor_bytes

#: the output kind holding no quantization_config (the registry's dense safetensors output)
DENSE = next(o.name for o in OUTPUTS.values() if o.container == SHARDS and o.quant_method is None)
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
MODELFILE = "Modelfile"


@dataclass
class VerifyReport:
    out: str
    kind: str = ""  # the output kind checked (a save method), "unknown" when none could be told
    kind_from: str = ""  # where the kind came from: "report" (options.save_method) or "files" (the files present)
    compressed: bool = False  # zstd-compressed shards (*.safetensors.zst)
    files: int = 0
    tensors: int = 0
    checksums_checked: int = 0
    recomputed: int = 0  # tensors recomputed from the inputs (lora: compared with the input adapter's)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _first_line(e: StreamMergeError) -> str:
    """The error's message, with its first details (which tensors, which keys) on the same line."""
    msg = e.message
    if e.details:
        more = f" and {len(e.details) - 3} more" if len(e.details) > 3 else ""
        msg += f": {', '.join(e.details[:3])}{more}"
    return msg


def _read_report(out: Path) -> tuple[dict | None, str]:
    """The output's report, or None and why not ("missing", "unreadable (...)")."""
    path = out / REPORT_NAME
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e})"
    if not isinstance(report, dict):
        return None, f"unreadable (a JSON {type(report).__name__}, not an object)"
    return report, ""


def _of(container: str) -> str:
    """The one output kind written in ``container`` (a GGUF file, an adapter folder)."""
    return next(o.name for o in OUTPUTS.values() if o.container == container)


def _shown(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _strict_json(path: Path, rep: VerifyReport) -> dict | None:
    """A JSON object as streammerge writes it (strict: no NaN or Infinity), or None and a problem."""

    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")

    try:
        obj = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    except FileNotFoundError:
        rep.problems.append(f"{path}: missing")
        return None
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        rep.problems.append(f"{path}: not strict JSON ({e})")
        return None
    if not isinstance(obj, dict):
        rep.problems.append(f"{path}: a JSON {type(obj).__name__}, not an object")
        return None
    return obj


def verify_lora(out: str | Path, base: str | Path | None = None, adapters: list | tuple = ()) -> VerifyReport:
    """A lora output (the normalized adapter folder): adapter_config.json strict JSON and a valid LoRA
    config; adapter_model.safetensors' header valid, its keys as PEFT's save_pretrained writes them, its
    tensors and bytes (and checksum, when recorded) as the report says; the folder loads as an adapter.
    With ``adapters`` (the one input adapter): its tensors, after key normalisation, and its config are
    the output's, byte for byte; with ``base`` too, the output still fits the base."""
    from .adapters import load_adapter
    from .sinks.lora import normalized_adapter_key

    out = Path(out)
    rep = VerifyReport(str(out))
    cfg = _strict_json(out / LORA_CONFIG, rep)
    st = out / LORA_WEIGHTS
    header = None
    if not st.is_file():
        rep.problems.append(f"{st}: missing")
    else:
        rep.files = 1
        try:
            header = parse_header(st, error_cls=OutputError)
        except StreamMergeError as e:
            rep.problems.append(_first_line(e))
    if header is not None:
        rep.tensors = len(header.tensors)
        odd = sorted(k for k in header.tensors if normalized_adapter_key(k) != k)
        if odd:
            rep.problems.append(f"{st}: {len(odd)} key(s) not as PEFT's save_pretrained writes them: {_shown(odd, 3)}")
    report, why = _read_report(out)
    rp = out / REPORT_NAME
    if report is None:
        rep.problems.append(f"{rp}: {why} (no tensor count, bytes or checksum to compare)")
    else:
        recs = report.get("shards")
        rec = (
            next((r for r in recs if isinstance(r, dict) and r.get("file") == LORA_WEIGHTS), None)
            if isinstance(recs, list)
            else None
        )
        if rec is None:
            rep.problems.append(f"{rp}: records no {LORA_WEIGHTS}")
        elif st.is_file():
            if header is not None:
                data = sum(t.nbytes for t in header.tensors.values())
                if rec.get("tensors") != len(header.tensors):
                    rep.problems.append(f"{st}: {len(header.tensors)} tensors, the report says {rec.get('tensors')}")
                if rec.get("bytes") != data:
                    rep.problems.append(f"{st}: {data} tensor bytes, the report says {rec.get('bytes')}")
            want = rec.get("checksum")
            if want:
                rep.checksums_checked = 1
                if file_checksum(st, algo_of(want)) != want:
                    rep.problems.append(
                        f"{st}: {algo_of(want)} checksum differs from the report (corrupted or modified)"
                    )
    if cfg is not None and header is not None:
        reader = Reader()
        try:
            load_adapter(out, reader)  # config rules, every module's lora_A/lora_B with the config's rank
        except StreamMergeError as e:
            rep.problems.append(f"{out}: not a valid LoRA adapter: {_first_line(e)}")
        finally:
            reader.close()
    if adapters and header is not None:
        _compare_lora(out, header.tensors, cfg, base, adapters, rep)
    return rep


def _compare_lora(out: Path, got: dict, cfg: dict | None, base, adapters, rep: VerifyReport) -> None:
    from .adapters import load_adapter
    from .plan import plan_merge
    from .sinks.lora import normalized_adapter_key

    specs = [(str(a[0]), float(a[1])) if isinstance(a, tuple) else split_adapter_spec(str(a)) for a in adapters]
    if len(specs) != 1 or specs[0][1] != 1.0:
        rep.problems.append("a lora output is one adapter, unweighted: pass exactly one --adapter, without :WEIGHT")
        return
    st = out / LORA_WEIGHTS
    reader = Reader()
    try:
        ad = load_adapter(hub.resolve(specs[0][0], "adapter").path, reader)
        want = {normalized_adapter_key(r.name): r for r in ad.tensors.values()}
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            rep.problems.append(
                f"{st}: its tensors are not the input adapter's ({ad.weights_file}): "
                f"{len(missing)} missing ({_shown(missing, 3)}), {len(extra)} extra ({_shown(extra, 3)})"
            )
        bad = []
        for key in sorted(set(want) & set(got)):
            w, g = want[key], got[key]
            data = reader.raw(w) if w.offset >= 0 else tensor_bytes(reader.tensor(w))
            if (w.dtype, tuple(w.shape)) != (g.dtype, tuple(g.shape)) or bytes(data) != bytes(reader.raw(g)):
                bad.append(key)
            rep.recomputed += 1
        if bad:
            rep.problems.append(f"{st}: {len(bad)} tensor(s) differ from the input adapter's: {_shown(bad, 3)}")
        if cfg is not None and cfg != ad.config:
            rep.problems.append(f"{out / LORA_CONFIG}: differs from the input adapter's {LORA_CONFIG}")
        if base is not None:
            plan_merge(
                hub.resolve(base, "base").path, [(str(out), 1.0)], MergeOptions(save_method=_of(ADAPTER)), reader
            )
    except StreamMergeError as e:
        rep.problems.append(f"cannot compare with the inputs: {_first_line(e)}")
    finally:
        reader.close()


def verify_gguf(out: str | Path) -> VerifyReport:
    """A GGUF output: the file the report names, with its size and checksum, read back by gguf-py
    (header, keys, tensor infos) with every tensor's data inside the file; the Ollama Modelfile beside
    it (there when the report says it was written) names it in its FROM line. Without a report: the one
    .gguf file present, read back."""
    out = Path(out)
    rep = VerifyReport(str(out))
    rp = out / REPORT_NAME
    report, why = _read_report(out)
    ggufs = sorted(p.name for p in out.glob("*.gguf") if p.is_file())
    rec = None
    if report is None:
        rep.problems.append(f"{rp}: {why} (no size or checksum to compare)")
    else:
        recs = report.get("shards")
        if isinstance(recs, list) and len(recs) == 1 and isinstance(recs[0], dict) and recs[0].get("file"):
            rec = recs[0]
        else:
            rep.problems.append(f"{rp}: does not record one GGUF file (shards: {recs!r:.200})")
    if rec is not None:
        path = out / rec["file"]
        for extra in ggufs:
            if extra != path.name:
                rep.problems.append(f"{out / extra}: not listed in the report")
    elif len(ggufs) == 1:
        path = out / ggufs[0]
    else:
        rep.problems.append(f"{out}: {len(ggufs)} .gguf files ({_shown(ggufs) or 'none'}); a gguf output has one")
        return rep
    if not path.is_file():
        rep.problems.append(f"{path}: missing (the report names it)")
        _modelfile(out, path, report, rep)
        return rep
    rep.files = 1
    size = path.stat().st_size
    if rec is not None:
        if rec.get("bytes") != size:
            rep.problems.append(f"{path}: {size} bytes, the report says {rec.get('bytes')}")
        if rec.get("checksum"):
            rep.checksums_checked = 1
            if file_checksum(path, algo_of(rec["checksum"])) != rec["checksum"]:
                rep.problems.append(f"{path}: checksum differs from the report's {rec['checksum']}")
    _modelfile(out, path, report, rep)
    try:
        from gguf import GGUFReader

        tensors = GGUFReader(path).tensors
    except Exception as e:
        rep.problems.append(f"{path}: gguf-py cannot read it ({e})")
        return rep
    rep.tensors = len(tensors)
    for t in tensors:
        if t.data_offset + t.n_bytes > size:
            rep.problems.append(f"{path}: tensor {t.name} runs past the end of the file")
    if rec is not None and isinstance(rec.get("tensors"), int) and rec["tensors"] > len(tensors):
        rep.problems.append(f"{path}: {len(tensors)} tensors, the report announced at least {rec['tensors']}")
    return rep


def _modelfile(out: Path, gguf_path: Path, report: dict | None, rep: VerifyReport) -> None:
    """The Ollama Modelfile: present when the report's notes say it was written; one FROM line (outside
    the triple-quoted TEMPLATE), naming the GGUF file."""
    mf = out / MODELFILE
    notes = report.get("notes") if report is not None else None
    written = isinstance(notes, list) and any(isinstance(n, str) and n.startswith("Modelfile:") for n in notes)
    if not mf.is_file():
        if written:
            rep.problems.append(f"{mf}: missing (the report says it was written)")
        return
    try:
        text = mf.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        rep.problems.append(f"{mf}: unreadable ({e})")
        return
    froms, quoted = [], False
    for line in text.splitlines():
        words = line.split(None, 1)
        if not quoted and words and words[0].upper() == "FROM":
            froms.append(words[1].strip() if len(words) > 1 else "")
        quoted ^= line.count('"""') % 2 == 1
    if len(froms) != 1:
        rep.problems.append(f"{mf}: {len(froms)} FROM lines; it needs one, naming {gguf_path.name}")
        return
    target = froms[0].strip('"')
    if not target or (out / target).resolve() != gguf_path.resolve():
        rep.problems.append(f"{mf}: FROM names {target!r}, not the GGUF file {gguf_path.name}")
