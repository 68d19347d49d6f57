"""The GGUF sink: the merged model as one llama.cpp file, in the same single pass as a safetensors
merge. Everything in the file's header (metadata, tokenizer, every tensor's name, type, shape and
offset) follows from the plan and the model's side files, so it is written first; then each tensor's
bytes as it is merged (converted, permuted, quantized), through the safetensors sink's writer (O_DIRECT
staging, running checksum). The result is what llama.cpp's ``convert_hf_to_gguf.py --outtype TYPE``
writes from the merged_16bit output. K-quants are made from that file by llama.cpp's own quantizer
(``llama-cpp-python``), in the work directory, before the output is published.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...errors import InputError, OutputError
from ...options import KQUANTS
from ...plan import MergePlan, ShardPlan
from ..outdir import copy_file, write_json
from ..safetensors import ShardWriter, staging_bytes
from .model import GgufTensor, early_params, file_type, model_for, plan_tensors, vocab_rows, write_params
from .vocab import write_tokenizer


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise InputError(
            "--save-method gguf needs the gguf package (llama.cpp's gguf-py)", hint="pip install 'streammerge[gguf]'"
        ) from None
    return gguf


@dataclass
class GgufLayout:
    """The file before any tensor is merged: its name, its head (header, metadata, tensor infos, the
    generated tensors) and the merged tensors in file order with their padded sizes."""

    filename: str
    head: bytes = field(repr=False)
    tensors: list[GgufTensor]
    alignment: int
    final_type: str  # what the user asked for (a k-quant is made from this file afterwards)
    final_name: str
    chat_template: str | None
    stops: list[str]
    jobs: tuple = ()  # the plan's jobs for the tensors the file keeps, with their encodings, in file order

    @property
    def total(self) -> int:
        return len(self.head) + sum(_pad(t.nbytes, self.alignment) for t in self.tensors)

    def shard(self) -> ShardPlan:
        return ShardPlan(self.filename, self.jobs)

    def open_writer(self, path: Path, shard: ShardPlan, opts) -> GgufWriter:
        return GgufWriter(path, self, checksum=opts.checksum, direct=opts.direct_io, stage_bytes=staging_bytes(opts))


def _encoded_jobs(plan: MergePlan, tensors: list[GgufTensor]) -> tuple:
    """The plan's jobs for the tensors the file keeps, each with its GGUF encoding, in file order; an
    adapter update on a tensor the converter drops is refused."""
    by_source = {t.source: t for t in tensors}
    jobs = []
    for job in plan.jobs:
        t = by_source.get(job.name)
        if t is None:
            if job.updates:
                raise InputError(
                    f"{job.name}: the adapter changes this tensor, and llama.cpp's GGUF drops it",
                    hint="merge with --save-method merged_16bit",
                )
            continue
        jobs.append(replace(job, encoding=GgufEncoding(t)))
    return tuple(jobs)


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class GgufEncoding:
    """Merged rows -> the GGUF bytes of one tensor: the converter's changes, then its type."""

    t: GgufTensor
    whole_tensor = False
    work_bytes = 4 + 4

    @property
    def row_align(self) -> int:
        return self.t.permute or 1  # permuted tensors are merged in whole heads

    def outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(self.t.name, "U8", (self.t.nbytes,))]

    def copy_parts(self, src) -> None:
        return None

    def encode(self, name: str, out, ws, r0: int, rows: int) -> Iterator[tuple[str, object]]:
        for data in encode_rows(self.t, out, r0):
            if data.numel():
                yield self.t.name, data


CHUNK = 1 << 20  # elements converted at a time: temporaries of a few MiB, reused by the allocator


def encode_rows(t: GgufTensor, out, r0: int) -> Iterator:
    """The bytes of rows ``r0 ..`` of ``t`` from the merged (rounded) values ``out``, as the converter
    computes them: widened to float32, shifted, permuted per head, cropped, then converted. Done and
    yielded a few MiB at a time (whole heads when permuting): small temporaries the allocator reuses."""
    if t.keep_rows is not None:
        out = out[: max(0, t.keep_rows - r0)]
    rows = out.shape[0] if out.dim() else 1
    per_row = out[0].numel() if out.dim() > 1 else 1
    step = max(1, CHUNK // per_row)
    if t.permute:
        step = max(t.permute, step // t.permute * t.permute)
    if not out.dim():
        yield _convert(t, out)
    for i in range(0, rows if out.dim() else 0, step):
        yield _convert(t, out[i : i + step])


def _convert(t: GgufTensor, out):
    import torch

    gguf = gguf_module()
    q = gguf.GGMLQuantizationType
    plain = {q.F32: torch.float32, q.F16: torch.float16, q.BF16: torch.bfloat16}.get(q(t.qtype))
    if plain is not None and not t.shift:  # moving values and one rounding: exact in the merged dtype
        x = out.cpu()
        if t.permute:
            x = x.reshape(-1, 2, t.permute // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
        return x.to(plain)
    x = out.to(device="cpu", dtype=torch.float32)
    if t.shift:
        x += t.shift
    if t.permute:
        x = x.reshape(-1, 2, t.permute // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)
    if t.qtype == q.F32:
        return x.contiguous()
    if t.qtype == q.F16:
        return x.to(torch.float16)
    if t.qtype == q.BF16:
        return x.to(torch.bfloat16)
    if t.qtype == q.Q8_0:
        return q8_0(x)
    return torch.from_numpy(gguf.quants.quantize(x.numpy(), q(t.qtype)))


def q8_0(x):
    """ggml's Q8_0 of float32 rows (blocks of 32: an f16 scale amax/127, then 32 int8 rounded half away
    from zero): gguf-py's ``quants.quantize`` operation for operation, in torch (tested byte-identical).
    ``x`` is overwritten."""
    import torch

    b = x.reshape(-1, 32)
    a = b.abs()
    d = a.amax(dim=1, keepdim=True).div_(127)
    b.mul_(torch.where(d == 0, 0.0, 1.0 / d))
    torch.abs(b, out=a)
    fl = a.floor()
    a.sub_(fl).mul_(2).floor_().add_(fl).mul_(b.sign_())  # sign(v) * (floor(a) + floor(2 (a - floor(a))))
    out = torch.empty((b.shape[0], 34), dtype=torch.uint8)
    out[:, :2] = d.to(torch.float16).view(torch.uint8)
    out[:, 2:].view(torch.int8).copy_(a)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 32 * 34)


class GgufWriter:
    """The safetensors sink's writer over the GGUF layout: the head first, then each tensor's bytes
    followed by the zero padding that aligns the next one."""

    def __init__(self, path: Path, layout: GgufLayout, **kw):
        self.layout = layout
        sizes = [(t.name, _pad(t.nbytes, layout.alignment)) for t in layout.tensors]
        self._inner = ShardWriter(path, [], head=layout.head, sizes=sizes, **kw)
        self._left = {t.name: t.nbytes for t in layout.tensors}
        self._pads = {name: n - t.nbytes for (name, n), t in zip(sizes, layout.tensors, strict=True)}
        self.path = self._inner.path

    def write(self, name: str, data) -> None:
        mv = memoryview(data).cast("B")
        self._inner.write(name, mv)
        self._left[name] -= mv.nbytes
        if self._left[name] == 0 and self._pads[name]:
            self._inner.write(name, bytes(self._pads[name]))

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    @property
    def checksum(self) -> str:
        return self._inner.checksum


def plan_gguf(plan: MergePlan, aux: dict, out: Path, opts) -> GgufLayout:
    """The GGUF layout of a merge, or a refusal (unsupported architecture, tokenizer or type) before
    anything is written. The converter reads the merged model's directory (config.json and side files,
    named like OUT): the same files are laid out in a temporary directory for gguf-py to read."""
    gguf = gguf_module()
    if opts.gguf_type in KQUANTS:
        llama_cpp_module()
    with tempfile.TemporaryDirectory(prefix="streammerge-gguf-") as tmp:
        meta = Path(tmp) / out.name
        meta.mkdir()
        write_json(meta / "config.json", plan.config)
        for name, src in aux.items():
            if name != "config.json":
                copy_file(src, meta / name) if isinstance(src, bytes) else (meta / name).symlink_to(Path(src).resolve())
        return _layout(gguf, plan, meta, opts)


def _layout(gguf, plan: MergePlan, meta: Path, opts) -> GgufLayout:
    import numpy as np

    m = model_for(plan.config, str(meta.name))
    outputs = [o for j in plan.jobs for o in j.outputs]
    first = next((dt for _, dt, shape in outputs if len(shape) >= 2), None)
    base_type = "auto" if opts.gguf_type in KQUANTS else opts.gguf_type
    ftype = file_type(base_type, first)
    tensors = plan_tensors(m, outputs, ftype, vocab_rows(m, meta))
    w = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, m.arch.gguf)])
    early_params(w, m)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType(t.qtype))
    total, shared, expert, n_expert = w.get_total_parameter_count()
    md = gguf.Metadata.load(None, meta, None, total)
    md.name = md.name or meta.name
    if md.size_label is None and total > 0:
        md.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    md.set_gguf_meta_model(w)
    write_params(w, m, ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    label = ftype.name.partition("_")[2]
    name = gguf.naming_convention(md.name, md.basename, md.finetune, md.version, md.size_label, label)
    final = name if opts.gguf_type not in KQUANTS else gguf.naming_convention(
        md.name, md.basename, md.finetune, md.version, md.size_label, opts.gguf_type.upper()
    )  # fmt: skip
    write_tokenizer(w, m.arch.vocab, m.hparams, meta)
    head = _head(gguf, w, tensors)
    merged = [t for t in tensors if t.data is None]
    template = w.kv_data[0].get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return GgufLayout(
        f"{name}.gguf", head, merged, w.data_alignment, opts.gguf_type, f"{final}.gguf",
        template.value if template is not None else None, _stops(w, gguf), _encoded_jobs(plan, merged),
    )  # fmt: skip


def _head(gguf, w, tensors: list[GgufTensor]) -> bytes:
    """Header, key/values and tensor infos as gguf-py writes them, padded, then the generated tensors."""
    buf = io.BytesIO()
    w.fout, w.state = [buf], gguf.gguf_writer.WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    buf.write(bytes(_pad(buf.tell(), w.data_alignment) - buf.tell()))
    for t in tensors:  # the generated ones come first (plan_tensors), as the converter writes them
        if t.data is not None:
            buf.write(t.data + bytes(_pad(t.nbytes, w.data_alignment) - t.nbytes))
    return buf.getvalue()


def _stops(w, gguf) -> list[str]:
    """The end-of-turn and end-of-sequence token texts, for Ollama's stop parameters."""
    kv = w.kv_data[0]
    tokens = kv.get(gguf.Keys.Tokenizer.LIST)
    ids = [kv[k].value for k in (gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOS_ID) if k in kv]
    if tokens is None:
        return []
    out = []
    for i in ids:
        text = tokens.value[i].decode() if isinstance(tokens.value[i], bytes) else str(tokens.value[i])
        if text not in out:
            out.append(text)
    return out


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise InputError(
            "k-quant GGUF types are made with llama.cpp's own quantizer, from the llama-cpp-python package",
            hint="pip install 'streammerge[llama-cpp]' (it compiles llama.cpp: minutes), or use f16, bf16 or q8_0",
        ) from None
    return llama_cpp


def quantize(src: Path, dst: Path, qtype: str, threads: int = 0) -> None:
    """llama.cpp's ``llama_model_quantize`` from the 16-bit GGUF ``src`` to ``dst``."""
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise OutputError(f"{src}: llama.cpp's quantizer failed ({rc}) making {qtype}")


def finish_gguf(work: Path, layout: GgufLayout, journal, report) -> list[dict]:
    """After the merge pass: the k-quant (if asked for) made from the 16-bit file, which then goes; the
    Ollama Modelfile. Returns the report's file records."""
    from ..outdir import file_checksum
    from .ollama import write_modelfile

    name = layout.filename
    if layout.final_name != name:
        quantize(work / name, work / layout.final_name, layout.final_type)
        (work / name).unlink()
        name = layout.final_name
        report.notes.append(f"gguf: {layout.final_type} made from the 16-bit file by llama.cpp's quantizer")
    path = work / name
    rec = journal.shards.get(name) or {"checksum": file_checksum(path, report.options.get("checksum", "xxh3"))}
    fam = write_modelfile(work / "Modelfile", name, layout.chat_template, layout.stops)
    report.notes.append(
        f"Modelfile: chat template as Ollama's {fam} template" if fam else
        "Modelfile: the chat template is not one mapped to Ollama's form; Ollama reads the GGUF's own"
    )  # fmt: skip
    return [{"file": name, "bytes": path.stat().st_size, "tensors": len(layout.tensors), "checksum": rec["checksum"]}]
