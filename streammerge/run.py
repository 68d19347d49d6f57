"""The driver: plan -> read -> merge -> write, one tensor (or row block) at a time."""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from . import __version__, lora, quant
from .adapter import PEFT_PREFIX, Adapter, load_adapter
from .errors import InputError, NonFiniteError, OutputError
from .plan import (
    BiasDelta,
    Dora,
    Int8Source,
    LowRank,
    MergeOptions,
    MergePlan,
    Quant4Source,
    QuantOut,
    RowReplace,
    ShardPlan,
    Source,
    TensorJob,
    build_plan,
)
from .sink import (
    CHECKSUMS,
    JOURNAL_NAME,
    STAGE_BYTES,
    Journal,
    OutputLock,
    ShardWriter,
    check_output,
    commit_work_dir,
    copy_file,
    discard_work_dir,
    prepare_work_dir,
    work_dir_for,
    write_json,
)
from .source import (
    DTYPE_ALIASES,
    DTYPES,
    Checkpoint,
    Reader,
    TensorRef,
    numel,
    open_checkpoint,
    split_adapter_spec,
    stored_refs,
)

log = logging.getLogger("streammerge")

COPY_CHUNK = 64 * 1024 * 1024
PREFETCH_BYTES = 256 * 1024 * 1024  # base bytes the kernel is asked to read ahead of the merge
WRITE_QUEUE = 1  # blocks queued for the writer thread; work buffers rotate through WRITE_QUEUE + 2 slots
ROW_ALIGN = 64
COL_ALIGN = 256
REPORT_NAME = "streammerge_report.json"
DEFAULT_MAX_MEMORY = "128MiB"
SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".zst")
SKIP_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json", REPORT_NAME}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


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

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str | int) -> int:
    """``5GB``, ``512MiB``, ``1e9`` or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
    }
    s = str(text).strip().upper().replace(" ", "")
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    num, unit = s[:i], s[i:]
    if unit not in units or not num:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    value = float(num) * units[unit]
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value)


def parse_memory(value: int | str | float) -> int:
    """``--max-memory``: a size (``256MiB``, ``2GB``) or a fraction of the available RAM (``0.25``)."""
    text = str(value).strip()
    try:
        frac = float(text)
    except ValueError:
        frac = None
    if frac is not None and 0 < frac < 1:
        return int(psutil.virtual_memory().available * frac)
    return parse_size(value if not isinstance(value, float) else int(value))


def resolve_dtype(name: str) -> str:
    if name == "auto":
        return "auto"
    key = name.lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}: use auto, bf16, fp16 or fp32")
    return DTYPE_ALIASES[key]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}", hint="use auto, cpu or cuda")
    return torch.device(name)


def _anon_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Executor:
    """Computes the bytes of each output tensor, block by block."""

    def __init__(
        self,
        reader: Reader,
        opts: MergeOptions,
        device: torch.device,
        report: MergeReport,
        ws: Workspace | None = None,
    ):
        self.reader = reader
        self.opts = opts
        self.device = device
        self.report = report
        self.peak_anon = 0
        self.ws = ws or Workspace()  # shared by the jobs of a batch: one set of buffers, not one per job
        self._zero_warned: set[str] = set()
        self._budget_warnings: dict[str, tuple[int, int, int, str]] = {}
        self.stage = {"read": 0.0, "dequant": 0.0, "merge": 0.0}

    def _adapter_tensor(self, ref: TensorRef, role: str) -> torch.Tensor:
        t = self.reader.tensor(ref).to(torch.float32)  # PEFT upcasts adapter weights to fp32 at load
        if not self.opts.allow_nonfinite and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(
                f"{ref.file}: adapter tensor {ref.name!r} ({role}) contains NaN or Inf",
                hint="the adapter is broken (diverged training?); pass --allow-nonfinite to merge anyway",
            )
        if role == "lora_B" and not bool(t.any()) and ref.name not in self._zero_warned:
            self._zero_warned.add(ref.name)
            self.report.warnings.append(f"{ref.name} is all zero: merging it changes nothing")
        return t.to(self.device)

    @property
    def budget(self) -> int:
        """Work memory for merge blocks: ``--max-memory`` less the writer's O_DIRECT staging buffer."""
        return self.opts.block_bytes - staging_bytes(self.opts)

    def bytes_per_element(self, job: TensorJob) -> int:
        """Work memory per weight element while merging a block: the fp32 rows and rounded output in
        each of the rotating write slots, the fp32 delta, and dequantization temporaries."""
        out_size = DTYPES[job.dtype][0]
        cost = (WRITE_QUEUE + 2) * (4 + (0 if out_size == 4 else out_size)) + 4
        if isinstance(job.source, Quant4Source):
            cost += 2 + 4 + 4 + 2  # int32 byte indices, fp32 values, fp32 scales (unaligned), the rounded copy
        elif isinstance(job.source, Int8Source):
            cost += 4
        elif job.source.dtype != job.dtype:
            cost += out_size
        if job.quant is not None:
            cost += 4 + 17  # the fp32 copy handed to bitsandbytes, and its own temporaries
        return cost

    def _over_budget(self, job: TensorJob, need: int) -> None:
        """One warning per cause (updated in place as more tensors share it), not one per tensor."""
        why = "merged_4bit re-quantization" if job.quant else "DoRA norms" if job.updates else "an unsplittable tensor"
        idx, count, most, first = self._budget_warnings.get(why, (len(self.report.warnings), 0, 0, job.name))
        count, most = count + 1, max(most, need)
        text = (
            f"{why} needs whole tensors at once: {count} tensor(s) (first {first}) need up to "
            f"{most / 2**20:.0f} MiB of work memory, more than the {self.budget / 2**20:.0f} MiB left of the budget"
        )
        if idx == len(self.report.warnings):
            self.report.warnings.append(text)
        else:
            self.report.warnings[idx] = text
        self._budget_warnings[why] = (idx, count, most, first)

    def _block_rows(self, job: TensorJob) -> int:
        rows = job.shape[0] if job.shape else 1
        if len(job.shape) < 2 or job.quant is not None or any(isinstance(u, Dora) for u in job.updates):
            return max(rows, 1)
        per_row = numel(job.shape[1:]) * self.bytes_per_element(job)
        n = self.budget // max(per_row, 1)
        return min(rows, max(self._align(job), n // self._align(job) * self._align(job)))

    @staticmethod
    def _align(job: TensorJob) -> int:
        # BLAS tiles rows (and columns, for transposed deltas) in small fixed groups: blocks that
        # start on a multiple of the alignment reproduce the unblocked product bit for bit.
        return COL_ALIGN if any(isinstance(u, LowRank) and u.transposed for u in job.updates) else ROW_ALIGN

    def _source(self, src: Source) -> Callable[[int, int], torch.Tensor]:
        """A function giving rows ``[r0, r1)`` of the base tensor on the device, dequantized if needed
        (4-bit: in the quant_state dtype, as bitsandbytes returns it; 8-bit: fp32)."""
        dev = self.device
        if isinstance(src, TensorRef):
            t = self.reader.tensor(src)
            t = t.reshape(1, -1) if t.dim() == 0 else t
            return lambda r0, r1: t[r0:r1].to(dev)
        cols = numel(src.shape[1:])
        if isinstance(src, Int8Source):
            cb, scb = self.reader.tensor(src.cb), self.reader.tensor(src.scb)
            return lambda r0, r1: quant.dequantize_int8_rows(cb[r0:r1].to(dev), scb[r0:r1].to(dev))
        packed = self.reader.tensor(src.packed).reshape(-1).view(torch.uint8)
        code = self.reader.tensor(src.quant_map).to(dev, torch.float32)
        absmax = self.reader.tensor(src.absmax).to(dev)
        if src.nested_absmax is not None:
            absmax = quant.dequantize_absmax(
                absmax,
                self.reader.tensor(src.nested_absmax).to(dev),
                self.reader.tensor(src.nested_quant_map).to(dev),
                src.nested_offset,
                src.nested_blocksize,
            )
        absmax = absmax.float()
        qdtype = DTYPES[src.dtype][1]

        def rows(r0: int, r1: int) -> torch.Tensor:
            n = (r1 - r0) * cols
            out = self.ws.take("dq", (n + 2,), torch.float32, dev)  # reused: no fresh pages per block
            index = self.ws.take("dqi", (n // 2 + 1,), torch.int32, dev)
            vals = quant.dequantize_4bit_range(
                packed, absmax, code, src.blocksize, r0 * cols, r1 * cols, dev, out=out, index=index
            )
            rounded = self.ws.take("dqr", (r1 - r0, *src.shape[1:]), qdtype, dev)
            return rounded.copy_(vals.view(rounded.shape))

        return rows

    def _prepare(self, job: TensorJob, dev: torch.device) -> tuple[Callable, list]:
        """The base-row reader and the adapter tensors of ``job``, on ``dev`` (adapter tensors are
        checked for NaN/Inf as they are loaded)."""
        saved, self.device = self.device, dev
        try:
            rows_of = self._source(job.source)
            prepared = []
            for u in job.updates:
                if isinstance(u, (LowRank, Dora)):
                    a, b = self._adapter_tensor(u.a, "lora_A"), self._adapter_tensor(u.b, "lora_B")
                    extra = self._adapter_tensor(u.magnitude, "DoRA magnitude") if isinstance(u, Dora) else None
                    prepared.append((u, a, b, extra))
                elif isinstance(u, BiasDelta):
                    prepared.append((u, self._adapter_tensor(u.vec, "lora_B.bias"), None, None))
                else:
                    prepared.append((u, self._adapter_tensor(u.values, "trainable tokens"), None, None))
        finally:
            self.device = saved
        return rows_of, prepared

    def blocks(self, job: TensorJob) -> Iterator[tuple[str, memoryview]]:
        """``(tensor name, bytes)`` of the job's output(s), in order. On an accelerator that runs out
        of memory, the block is retried at half the rows, and at the smallest block on the CPU."""
        if job.is_copy:
            for off in range(0, job.nbytes, COPY_CHUNK):
                yield job.name, self.reader.raw(job.source, off, min(COPY_CHUNK, job.nbytes - off))
            return
        out_dtype = DTYPES[job.dtype][1]
        dev = self.device
        rows_of, prepared = self._prepare(job, dev)
        rows = job.shape[0] if job.shape else 1
        step = self._block_rows(job)
        need = step * numel(job.shape[1:]) * self.bytes_per_element(job)
        if need > self.budget and len(job.shape) >= 2 and step == rows:
            self._over_budget(job, need)
        r0 = 0
        while r0 < rows:
            r1 = min(rows, r0 + step)
            try:
                t = time.perf_counter()
                out = self._merge_block(job, rows_of, prepared, r0, r1, rows, out_dtype)
                self.stage["merge"] += time.perf_counter() - t
            except torch.OutOfMemoryError:
                if dev.type == "cpu":
                    raise OutputError(
                        f"out of memory merging {job.name!r} even in blocks of {r1 - r0} rows",
                        hint="lower --max-memory (smaller blocks) or free memory",
                    ) from None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                align = self._align(job)
                if step > align and job.quant is None and not any(isinstance(u, Dora) for u in job.updates):
                    step = max(align, (step // 2) // align * align)
                    self.report.notes.append(f"{job.name}: {dev.type} out of memory, retrying in {step}-row blocks")
                else:
                    dev = torch.device("cpu")
                    rows_of, prepared = self._prepare(job, dev)
                    self.report.notes.append(f"{job.name}: {self.device.type} out of memory, merged on the CPU")
                continue
            self.peak_anon = max(self.peak_anon, _anon_bytes())
            if job.quant is not None:
                q = job.quant
                # the quantizer works in fp32: handing it the rounded values in a reused fp32 buffer
                # spares it a fresh fp32 copy per tensor (page faults: 15-16 s instead of 10.8 s per
                # 1.7 GB; same bits)
                vals = out if out.dtype == torch.float32 else self.ws.take("q", out.shape, torch.float32, out.device)
                vals.copy_(out)
                packed, parts = quant.quantize_4bit(vals, q.blocksize, q.quant_type, q.double_quant, dtype=out.dtype)
                yield job.name, _bytes(packed)
                for name, _, _ in job.outputs[1:]:
                    yield name, _bytes(parts[name[len(job.name) + 1 :]])
            else:
                yield job.name, _bytes(out)
            r0 = r1

    def _merge_block(self, job, rows_of, prepared, r0: int, r1: int, rows: int, out_dtype) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the merged tensor, rounded to ``out_dtype`` (a view of a work buffer)."""
        whole = r0 == 0 and r1 == rows
        shape = (r1 - r0, *job.shape[1:]) if len(job.shape) >= 2 else job.shape
        t = time.perf_counter()
        blk = rows_of(r0, r1).reshape(shape)
        if blk.dtype != out_dtype and out_dtype != torch.float32:
            blk = blk.to(out_dtype)  # the base as loaded in the output dtype, as PEFT would see it
        slot = self.ws.next_slot()
        w = self.ws.take(f"w{slot}", shape, torch.float32, blk.device)
        w.copy_(blk)
        self.stage["dequant" if not isinstance(job.source, TensorRef) else "read"] += time.perf_counter() - t
        for u, a, b, extra in prepared:
            if isinstance(u, LowRank):
                if u.transposed:
                    aa = a if whole else a[:, r0:r1].contiguous()
                    delta = lora.lowrank_delta(aa, b, u.scaling, True)
                else:
                    d = self.ws.take("d", shape, torch.float32, w.device)
                    delta = lora.lowrank_delta(a, b if whole else b[r0:r1], u.scaling, False, out=d)
                lora.apply_lowrank(w, delta, u.weight, out_dtype if u.round_delta else None)
            elif isinstance(u, BiasDelta):
                lora.apply_bias(w, a, u.scaling, u.weight)
            elif isinstance(u, Dora):
                delta = lora.lowrank_delta(a, b, u.scaling, u.embedding or u.fan_in_fan_out)
                w = lora.dora_merge(w, delta, extra, u.fan_in_fan_out, u.embedding)
            elif isinstance(u, RowReplace):
                lora.replace_rows(w, r0, u.indices, a)
        if out_dtype == torch.float32:
            out = w
        else:
            out = self.ws.take(f"o{slot}", shape, out_dtype, w.device)
            out.copy_(w)
        if not self.opts.allow_nonfinite and not _finite_in(w, out_dtype):
            raise NonFiniteError(
                f"merging into {job.name!r} produced NaN or Inf (rows {r0}..{r1})",
                hint="the adapter's update overflows the output dtype; try --dtype fp32 or bf16, "
                "or --allow-nonfinite to write it anyway",
            )
        return out


def _finite_in(w: torch.Tensor, dtype: torch.dtype) -> bool:
    """No NaN/Inf in fp32 ``w``, and nothing that overflows ``dtype`` when rounded (no temporaries)."""
    if w.numel() == 0:
        return True
    lo, hi = torch.aminmax(w)
    lim = torch.finfo(dtype).max
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and -lim <= float(lo) and float(hi) <= lim


class Workspace:
    """Reusable flat work buffers: steady-state merging allocates (and page-faults) nothing new."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self._slot = 0

    def next_slot(self) -> int:
        """Rotate output buffers: the blocks still queued for the writer keep theirs."""
        self._slot = (self._slot + 1) % (WRITE_QUEUE + 2)
        return self._slot

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = numel(shape)
        buf = self._bufs.get((key, dtype, device))
        if buf is None or buf.numel() < n:
            self._bufs.pop((key, dtype, device), None)
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[(key, dtype, device)] = buf
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _aux_files(base: Path, adapters: list[Adapter], ckpt: Checkpoint | None = None) -> dict[str, Path | bytes]:
    """Files copied beside the weights: the base's non-weight files (from an archive: their bytes), then
    the adapters' tokenizer files."""
    files: dict[str, Path | bytes] = {}
    if ckpt is not None and ckpt.aux is not None:
        items = sorted(ckpt.aux.items())
    else:
        items = [(p.name, p) for p in sorted(base.iterdir()) if p.is_file()]
    for name, src in items:
        if not name.startswith(".") and name not in SKIP_FILES and not name.endswith(WEIGHT_SUFFIXES):
            files[name] = src
    for ad in adapters:
        for name in TOKENIZER_FILES:
            p = Path(ad.path) / name
            if p.is_file():
                files[name] = p
    return files


def plan_merge(
    base: str | Path, adapters: list[tuple[str, float]], opts: MergeOptions, reader: Reader
) -> tuple[Checkpoint, list[Adapter], MergePlan]:
    ckpt = open_checkpoint(base)
    ads = [load_adapter(p, reader, w) for p, w in adapters]
    return ckpt, ads, build_plan(ckpt, ads, opts, lambda ref: bytes(reader.raw(ref)))


def make_options(
    dtype: str = "auto",
    shard_size: str | int = "5GB",
    device: str = "auto",
    save_method: str = "merged_16bit",
    allow_nonfinite: bool = False,
    max_memory: int | str | float = "128MiB",
    quant_type: str | None = None,
    blocksize: int | None = None,
    double_quant: bool | None = None,
    compress: str | int | None = None,
    checksum: str = "crc32",
    direct_io: bool = True,
) -> MergeOptions:
    """Validated :class:`MergeOptions` from user-facing values. ``compress``: ``zstd[:LEVEL]``."""
    if save_method not in SAVE_METHODS:
        raise InputError(f"unknown save method {save_method!r}", hint=f"use one of {', '.join(SAVE_METHODS)}")
    qout = None
    if quant_type is not None or blocksize is not None or double_quant is not None:
        if save_method != "merged_4bit":
            raise InputError("--quant-type/--blocksize/--double-quant only apply to --save-method merged_4bit")
        if quant_type not in (None, "nf4", "fp4"):
            raise InputError(f"unknown quant type {quant_type!r}", hint="use nf4 or fp4")
        if blocksize not in (None, 32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise InputError(f"invalid blocksize {blocksize}", hint="use a power of two from 32 to 4096")
        qout = QuantOut(quant_type or "nf4", blocksize or 64, True if double_quant is None else double_quant)
    opts = MergeOptions(
        dtype=resolve_dtype(dtype),
        shard_size=parse_size(shard_size),
        device=device,
        save_method=save_method,
        allow_nonfinite=allow_nonfinite,
        block_bytes=parse_memory(max_memory),
        quant=qout,
        compress=parse_compress(compress),
        checksum=checksum,
        direct_io=bool(direct_io),
    )
    if checksum not in CHECKSUMS:
        raise InputError(f"unknown checksum {checksum!r}", hint=f"use one of {', '.join(CHECKSUMS)}")
    if opts.compress is not None and save_method == "lora":
        raise InputError("--compress applies to merged outputs, not --save-method lora")
    return opts


def parse_compress(spec: str | int | None) -> int | None:
    """``zstd`` or ``zstd:LEVEL`` (1-22; default 3) -> the zstd level; None -> no compression."""
    if spec is None or spec is False:
        return None
    text = str(spec)
    name, _, level = text.partition(":")
    if name != "zstd":
        raise InputError(f"unknown compression {text!r}", hint="use zstd or zstd:LEVEL")
    try:
        value = int(level) if level else 3
    except ValueError:
        raise InputError(f"--compress {text!r}: the level must be an integer") from None
    if not 1 <= value <= 22:
        raise InputError(f"--compress {text!r}: zstd levels go from 1 to 22")
    return value


def new_report(base: Path, ads: list[Adapter], out: Path, opts: MergeOptions, plan: MergePlan, dev, dry_run=False):
    """The report of a planned merge (filled in as the run goes)."""
    free = psutil.disk_usage(str(_existing_parent(out))).free
    report = MergeReport(
        version=__version__,
        base=str(base),
        adapters=[{"path": a.path, "weight": a.weight, "weights_file": a.weights_file} for a in ads],
        out=str(out),
        options={
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
        },
        dry_run=dry_run,
        device=str(dev),
        shards=[{"file": s.filename, "bytes": s.nbytes, "tensors": len(s.jobs)} for s in plan.shards],
        total_size=plan.total_size,
        modules=[asdict(m) for m in plan.modules],
        tensors_total=len(plan.jobs),
        tensors_merged=sum(1 for j in plan.jobs if j.updates),
        tensors_copied=sum(1 for j in plan.jobs if j.is_copy),
        notes=list(plan.notes),
        free_disk_bytes=free,
        merged_onto=plan.merged_onto,
    )
    if opts.save_method == "merged_4bit":
        report.warnings.append(
            "merged_4bit re-quantizes the merged weights: the result is less precise than merged_16bit "
            "(each weight moves to the nearest 4-bit code after the merge)"
        )
    return report


def merge(
    base: str | Path,
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
    checksum: str = "crc32",
    direct_io: bool = True,
    executor: str = "inprocess",
    workers: int = 2,
    address: str | None = None,
) -> MergeReport:
    """Merge LoRA ``adapter`` (and ``adapters``, each ``PATH[:WEIGHT]`` or ``(path, weight)``) into
    ``base`` and write the result to ``out``. Returns the :class:`MergeReport`.

    ``resume`` continues an interrupted run with the same inputs and options, keeping its complete
    shards. ``save_method``: ``merged_16bit`` (dense merged checkpoint), ``merged_4bit`` (merged, then
    re-quantized with bitsandbytes: ``quant_type``/``blocksize``/``double_quant`` override the input's
    settings or the defaults nf4/64/True), or ``lora`` (no merge: validate the adapter against the
    base and write a normalized adapter directory)."""
    t0 = time.perf_counter()
    specs: list[tuple[str, float]] = []
    for item in ([adapter] if not isinstance(adapter, list) else adapter) + list(adapters):
        specs.append((str(item[0]), float(item[1])) if isinstance(item, tuple) else split_adapter_spec(str(item)))
    if save_method == "lora" and (len(specs) != 1 or specs[0][1] != 1.0):
        raise InputError("--save-method lora takes exactly one adapter, without a weight")
    opts = make_options(
        dtype,
        shard_size,
        device,
        save_method,
        allow_nonfinite,
        max_memory,
        quant_type,
        blocksize,
        double_quant,
        compress,
        checksum,
        direct_io,
    )
    dev = resolve_device(device)
    out = Path(out)
    base = Path(base)
    reader = Reader()
    try:
        ckpt, ads, plan = plan_merge(base, specs, opts, reader)
        check_output(out, [base] + [Path(a.path) for a in ads], overwrite)
        aux = _aux_files(base, ads, ckpt)
        report = new_report(base, ads, out, opts, plan, dev, dry_run)
        drop_behind_if_large(reader, ckpt, report.notes)
        free = report.free_disk_bytes
        if dry_run:
            report.seconds = {"total": round(time.perf_counter() - t0, 3)}
            return report
        if save_method == "lora":
            with OutputLock(out):
                _write_lora(ads[0], out, reader, report, opts.direct_io)
            report.seconds["total"] = round(time.perf_counter() - t0, 3)
            return report
        needed = plan.total_size + sum(len(p) if isinstance(p, bytes) else p.stat().st_size for p in aux.values())
        if needed > free:
            raise OutputError(
                f"{out.parent}: {free / 1e9:.2f} GB free, the output needs {needed / 1e9:.2f} GB",
                hint="free disk space or choose another output location",
            )
        with OutputLock(out):
            dist = None if executor == "inprocess" else (executor, workers, address)
            _execute(plan, aux, ckpt, ads, out, reader, opts, dev, report, progress, resume, t0, dist)
        return report
    finally:
        reader.close()


_LORA_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|token_adapter\.trainable_tokens_delta)"
    r"\.(?!weight$|bias$)[^.]+(?=\.|$)"
)


def normalized_adapter_key(key: str) -> str:
    """The key PEFT's ``save_pretrained`` would write: ``base_model.model.`` prefix, no adapter name."""
    key = _LORA_PART.sub(r".\1", key)
    key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
    return key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key


def _write_lora(ad: Adapter, out: Path, reader: Reader, report: MergeReport, direct: bool = True) -> None:
    """``--save-method lora``: the validated adapter, rewritten as safetensors with PEFT's key names."""
    work = prepare_work_dir(out)
    try:
        refs = sorted(ad.tensors.values(), key=lambda r: normalized_adapter_key(r.name))
        specs = [(normalized_adapter_key(r.name), r.dtype, r.shape) for r in refs]
        if len({s[0] for s in specs}) != len(specs):
            raise OutputError(f"{ad.weights_file}: keys collide once the adapter name is removed")
        writer = ShardWriter(work / "adapter_model.safetensors", specs, {"format": "pt"}, direct=direct)
        try:
            for (name, _, _), ref in zip(specs, refs, strict=True):
                data = reader.raw(ref) if ref.offset >= 0 else _bytes(reader.tensor(ref))
                writer.write(name, data)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        write_json(work / "adapter_config.json", ad.config)
        for name in TOKENIZER_FILES:
            p = Path(ad.path) / name
            if p.is_file():
                copy_file(p, work / name)
        report.shards = [
            {"file": "adapter_model.safetensors", "bytes": sum(r.nbytes for r in refs), "tensors": len(refs)}
        ]
        report.total_size = sum(r.nbytes for r in refs)
        write_json(work / REPORT_NAME, report.to_dict())
        commit_work_dir(work, out)
    except BaseException:
        discard_work_dir(work)
        raise


def drop_behind_if_large(reader: Reader, ckpt: Checkpoint, notes: list[str] | None = None) -> None:
    """A base larger than half the RAM cannot stay cached until a next run anyway: drop each tensor's
    pages from the page cache once it is merged, so the merge does not push out what other programs
    keep cached (the output bypasses the cache already, with O_DIRECT)."""
    ram = psutil.virtual_memory().total
    if ckpt.total_bytes > ram // 2:
        reader.drop_behind = True
        if notes is not None:
            notes.append(
                f"the base ({ckpt.total_bytes / 1e9:.1f} GB) is larger than half the RAM ({ram / 1e9:.1f} GB): "
                "its pages leave the page cache as they are merged"
            )


def _existing_parent(p: Path) -> Path:
    p = p.resolve()
    while not p.exists():
        p = p.parent
    return p


MIN_STAGE_BYTES = 256 * 1024  # a writer's staging when many share the budget: two 128 KiB halves


def open_shard_writer(path: Path, shard: ShardPlan, opts: MergeOptions, sharing: int = 1) -> ShardWriter:
    """The writer of one planned shard with the run's compression, checksum and O_DIRECT staging;
    ``sharing``: how many writers are open at once and split the staging budget (a batch's jobs)."""
    return ShardWriter(
        path,
        [o for j in shard.jobs for o in j.outputs],
        {"format": "pt", "streammerge": __version__},
        opts.compress,
        opts.checksum,
        opts.direct_io,
        max(MIN_STAGE_BYTES, staging_bytes(opts) // sharing),
    )


def staging_bytes(opts: MergeOptions) -> int:
    """The writer's O_DIRECT staging, out of the ``--max-memory`` budget: 32 MiB, or a quarter of a
    small budget (none when writing compressed or buffered)."""
    if not opts.direct_io or opts.compress is not None:
        return 0
    return min(STAGE_BYTES, opts.block_bytes // 4)


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


class WriterThread:
    """Runs write operations in order on a second thread, so computing the next block overlaps
    writing the previous one (file writes and torch both release the GIL). A bounded queue keeps at
    most ``depth`` blocks in flight; errors surface on the next ``submit`` or at ``finish``."""

    def __init__(self, depth: int = 1):
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
                continue
            fn, args = item
            t = time.perf_counter()
            try:
                fn(*args)
            except BaseException as e:  # handed to the main thread
                self.error = e
            self.busy += time.perf_counter() - t

    def submit(self, fn: Callable, *args) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((fn, args))

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
    layout = [[s.filename, [[o[0], o[1], list(o[2])] for j in s.jobs for o in j.outputs]] for s in plan.shards]
    return {
        "version": __version__,
        "inputs": ident,
        "options": {k: v for k, v in options.items() if k not in ("device", "max_memory", "direct_io")},
        "adapters": [[a.path, a.weight] for a in ads],
        "plan": hashlib.sha256(json.dumps(layout).encode()).hexdigest(),
        "config": hashlib.sha256(json.dumps(plan.config, sort_keys=True).encode()).hexdigest(),
    }


def _open_run(out: Path, fp: dict, resume: bool) -> tuple[Path, Journal, dict[str, dict]]:
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
    """Index, config, side files and report into the work directory, then publish it as ``out``."""
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.total_size, "streammerge": __version__},
            "weight_map": {o[0]: s.filename for s in plan.shards for j in s.jobs for o in j.outputs},
        }
        write_json(work / "model.safetensors.index.json", index)
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
        rec["checksum"] = journal.shards[rec["file"]]["checksum"]
    report.work_buffer_bytes = ws_bytes
    report.peak_anon_bytes = max(peak_anon, _anon_bytes())
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report.bytes_read = reader.bytes_read
    write_json(work / REPORT_NAME, report.to_dict())
    (work / JOURNAL_NAME).unlink()
    commit_work_dir(work, out)


def _execute_distributed(plan, aux, ckpt, ads, out, reader, opts, report, t0, work, journal, done, dist) -> None:
    """The shards on worker processes or Ray tasks; the driver records them and finishes the output."""
    from .distributed import run_shards

    executor, workers, address = dist
    todo = [i for i, s in enumerate(plan.shards) if s.filename not in done]
    report.resumed_shards = len(plan.shards) - len(todo)
    specs = [(a.path, a.weight) for a in ads]
    try:
        stats = run_shards(
            plan, todo, ckpt.path, specs, opts, opts.device, work, journal, executor, workers, address, log
        )
        report.warnings += stats["warnings"]
        report.notes += stats["notes"] + [f"{len(todo)} shard(s) merged by {stats['workers']} {executor} worker(s)"]
        stage = {k: stats[k] for k in ("read", "dequant", "merge", "write")}
        stage["compute"] = stage["merge"]
        finish_output(
            work, out, plan, aux, report, journal, stage, t0, reader, stats["work_buffer_bytes"], stats["peak_anon"]
        )
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, OutputError, OSError)):
            log.error("partial output kept in %s; run the same command with --resume to continue", work)
        else:
            discard_work_dir(work)
        raise


def _execute(
    plan, aux, ckpt, ads, out, reader, opts, dev, report, progress, resume: bool, t0: float, dist=None
) -> None:
    fp = fingerprint(ckpt, ads, plan, report.options)
    work, journal, done = _open_run(out, fp, resume)
    if dist is not None:
        _execute_distributed(plan, aux, ckpt, ads, out, reader, opts, report, t0, work, journal, done, dist)
        return
    ex = Executor(reader, opts, dev, report)
    t_compute = 0.0
    bar = tqdm(
        total=plan.total_size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        desc="merging",
        dynamic_ncols=True,
    )
    wt = WriterThread(depth=WRITE_QUEUE)
    writers: list[ShardWriter] = []

    def finish_shard(writer: ShardWriter, filename: str) -> None:
        writer.close()
        journal.record(filename, writer.path.stat().st_size, writer.checksum)

    try:
        ahead = Prefetcher(reader, [j.source for s in plan.shards if s.filename not in done for j in s.jobs])
        n_job = 0
        for shard in plan.shards:
            if shard.filename in done:
                bar.update(shard.nbytes)
                report.resumed_shards += 1
                continue
            writer = open_shard_writer(work / shard.filename, shard, opts)
            writers.append(writer)
            for job in shard.jobs:
                ahead.advance(n_job)
                n_job += 1
                it = ex.blocks(job)
                while True:
                    t = time.perf_counter()
                    item = next(it, None)
                    t_compute += time.perf_counter() - t
                    if item is None:
                        break
                    name, buf = item
                    wt.submit(writer.write, name, buf)
                    bar.update(buf.nbytes)
                wt.submit(reader.release, job.source)
            wt.submit(finish_shard, writer, shard.filename)
        wt.finish()
        stage = {**ex.stage, "write": wt.busy, "compute": t_compute}
        finish_output(work, out, plan, aux, report, journal, stage, t0, reader, ex.ws.nbytes, ex.peak_anon)
    except BaseException as e:
        wt.abort()
        for w in writers:
            w.abort()
        bar.close()
        if isinstance(e, (KeyboardInterrupt, OutputError, OSError)):
            # resumable: keep the work directory (hidden, never mistaken for a model) and its journal
            log.error("partial output kept in %s; run the same command with --resume to continue", work)
        else:
            discard_work_dir(work)
        raise
    bar.close()
