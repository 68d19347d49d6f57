"""The block executor: computes the bytes of each planned output tensor, one row block at a time,
within the memory budget, on a device (CUDA out-of-memory falls back to smaller blocks, then the CPU).

Per block: decode the base rows (:mod:`streammerge.formats`), widen to fp32, apply the updates
(:mod:`streammerge.lora`), round to the output dtype, and encode them for the output format if the
job says so (:mod:`streammerge.sinks`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch

from . import formats
from .errors import NonFiniteError, OutputError
from .options import WRITE_QUEUE, MergeOptions
from .plan import TensorJob
from .report import MergeReport, anon_bytes
from .sinks.safetensors import staging_bytes
from .source import DTYPES, Reader, TensorRef, numel, tensor_bytes, torch_dtype
from .updates import ROW_ALIGN, block_align

CPU = torch.device("cpu")
TILE_BYTES = 1 << 20  # fp32 rows merged at a time within a block: about the size of a core's L2 cache


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


class Executor:
    """Computes the bytes of each output tensor, block by block."""

    fold_scaling = True  # power-of-two scalings folded into B where that is exact (tests compare both ways)

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

    def _adapter_tensor(self, ref: TensorRef, role: str, dev: torch.device) -> torch.Tensor:
        t = self.reader.tensor(ref).to(torch.float32)  # PEFT upcasts adapter weights to fp32 at load
        if not self.opts.allow_nonfinite and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(
                f"{ref.file}: adapter tensor {ref.name!r} ({role}) contains NaN or Inf",
                hint="the adapter is broken (diverged training?); pass --allow-nonfinite to merge anyway",
            )
        if role == "lora_B" and not bool(t.any()) and ref.name not in self._zero_warned:
            self._zero_warned.add(ref.name)
            self.report.warnings.append(f"{ref.name} is all zero: merging it changes nothing")
        return t.to(dev)

    @property
    def budget(self) -> int:
        """Work memory for merge blocks: ``--max-memory`` less the writer's O_DIRECT staging buffer."""
        return self.opts.block_bytes - staging_bytes(self.opts)

    def bytes_per_element(self, job: TensorJob) -> int:
        """Work memory per weight element while merging a block: the fp32 rows and rounded output in
        each of the rotating write slots, the fp32 delta, decoding and encoding temporaries."""
        out_size = DTYPES[job.dtype][0]
        cost = (WRITE_QUEUE + 2) * (4 + (0 if out_size == 4 else out_size)) + 4
        if not formats.is_dense(job.source):
            cost += job.source.work_bytes
        elif job.source.dtype != job.dtype:
            cost += out_size
        if job.encoding is not None:
            cost += job.encoding.work_bytes
        return cost + max((u.work_bytes for u in job.updates), default=0)

    def _over_budget(self, job: TensorJob, need: int) -> None:
        """One warning per cause (updated in place as more tensors share it), not one per tensor."""
        why = (
            f"{self.opts.save_method} re-quantization"
            if job.encoding
            else "DoRA norms"
            if job.updates
            else "an unsplittable tensor"
        )
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

    @staticmethod
    def _whole(job: TensorJob) -> bool:
        """Rows cannot be split: an encoding over whole tensors, or DoRA's norms over columns."""
        enc = job.encoding is not None and job.encoding.whole_tensor
        return enc or any(u.whole_tensor for u in job.updates)

    def _block_rows(self, job: TensorJob) -> int:
        rows = job.shape[0] if job.shape else 1
        if len(job.shape) < 2 or self._whole(job):
            return max(rows, 1)
        per_row = numel(job.shape[1:]) * self.bytes_per_element(job)
        n = self.budget // max(per_row, 1)
        return min(rows, max(self._align(job), n // self._align(job) * self._align(job)))

    @staticmethod
    def _align(job: TensorJob) -> int:
        # BLAS tiles rows (and columns, for transposed deltas) in small fixed groups: blocks that
        # start on a multiple of the alignment reproduce the unblocked product bit for bit. A fused
        # expert tensor's rows are experts, each computed on its own: any expert block will do.
        align = block_align(job.updates)
        if align == 1:
            return 1
        if job.encoding is not None and getattr(job.encoding, "row_align", 0):
            return math.lcm(job.encoding.row_align, align)  # and blocks start on the encoding's row blocks
        return align

    def _prepare(self, job: TensorJob, dev: torch.device) -> tuple[Callable, list]:
        """The base-row reader and the adapter tensors of ``job``, on ``dev`` (adapter tensors are
        checked for NaN/Inf as they are loaded)."""
        rows_of = formats.rows_of(job.source, self.reader, self.ws, dev)
        prepared = []
        for u in job.updates:
            host = [self._adapter_tensor(ref, role, CPU) for ref, role, on_host in u.refs() if on_host]
            u, host = u.prepared(host, self.fold_scaling)  # the host tensors as applied (may be combined)
            on_dev = [self._adapter_tensor(ref, role, dev) for ref, role, on_host in u.refs() if not on_host]
            prepared.append((u, [t.to(dev) for t in host] + on_dev))
        return rows_of, prepared

    def direct_ok(self, job: TensorJob) -> bool:
        """Whether the job's rows can be merged straight into a writer's staging buffer: the tiled
        path (plain LoRA on a 2-D weight rounded to 16 bits) on the CPU."""
        if job.is_copy or job.encoding is not None or self.device.type != "cpu":
            return False
        return self._tileable(job.shape, [(u, ()) for u in job.updates], torch_dtype(job.dtype))

    def blocks(self, job: TensorJob, writer=None) -> Iterator[tuple[str, memoryview | int]]:
        """``(tensor name, bytes)`` of the job's output(s), in order. On an accelerator that runs out
        of memory, the block is retried at half the rows, and at the smallest block on the CPU.

        With ``writer`` (a job that is ``direct_ok``; the caller owns the writer meanwhile), the rows
        are produced in the writer's staging buffer where it has room, else written to it, and each
        item is ``(name, bytes written)``."""
        if job.is_copy:
            yield from self._copy(job.name, job.source)
            return
        parts = job.encoding.copy_parts(job.source) if job.encoding is not None and not job.updates else None
        if parts:  # stored already in the output's encoding: its bytes as they are
            for (name, _, _), ref in zip(job.outputs, parts, strict=True):
                yield from self._copy(name, ref)
            return
        out_dtype = torch_dtype(job.dtype)
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
            dest = StagingDest(writer, job.name, out_dtype) if writer is not None else None
            try:
                t = time.perf_counter()
                out = self._merge_block(job, rows_of, prepared, r0, r1, rows, out_dtype, dest)
                encoded = list(job.encoding.encode(job.name, out, self.ws, r0, rows)) if job.encoding else None
                self.stage["merge"] += time.perf_counter() - t
            except torch.OutOfMemoryError:
                step, dev = self._after_oom(job, dev, step, r1 - r0)
                rows_of, prepared = self._prepare(job, dev)
                continue
            self.peak_anon = max(self.peak_anon, anon_bytes())
            if dest is not None:
                if dest.rows < out.shape[0]:  # not tiled after all: the rest of the block as a copy
                    writer.write(job.name, tensor_bytes(out[dest.rows :]))
                yield job.name, out.numel() * out.element_size()
            elif encoded is not None:
                for name, t in encoded:
                    yield name, tensor_bytes(t)
            else:
                yield job.name, tensor_bytes(out)
            r0 = r1

    def _copy(self, name: str, ref: TensorRef) -> Iterator[tuple[str, memoryview]]:
        for mv in self.reader.chunks(ref):
            yield name, mv

    def _after_oom(self, job: TensorJob, dev: torch.device, step: int, rows: int) -> tuple[int, torch.device]:
        """The block size and device to retry with after an out-of-memory error."""
        if dev.type == "cpu":
            raise OutputError(
                f"out of memory merging {job.name!r} even in blocks of {rows} rows",
                hint="lower --max-memory (smaller blocks) or free memory",
            ) from None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        align = self._align(job)
        if step > align and not self._whole(job):
            step = max(align, (step // 2) // align * align)
            self.report.notes.append(f"{job.name}: {dev.type} out of memory, retrying in {step}-row blocks")
            return step, dev
        self.report.notes.append(f"{job.name}: {self.device.type} out of memory, merged on the CPU")
        return step, torch.device("cpu")

    def _merge_block(self, job, rows_of, prepared, r0: int, r1: int, rows: int, out_dtype, dest=None) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the merged tensor, rounded to ``out_dtype`` (a view of a work buffer;
        with ``dest``, the tiled path hands each tile to it instead)."""
        whole = r0 == 0 and r1 == rows
        shape = (r1 - r0, *job.shape[1:]) if len(job.shape) >= 2 else job.shape
        t = time.perf_counter()
        blk = rows_of(r0, r1).reshape(shape)
        if not prepared and blk.dtype == out_dtype and job.encoding is not None:
            self.stage["read" if formats.is_dense(job.source) else "dequant"] += time.perf_counter() - t
            return blk  # nothing to merge: the values as stored, for the encoding to convert
        if blk.dtype != out_dtype and out_dtype != torch.float32:
            # the base as loaded in the output dtype, as PEFT would see it (into a reused buffer: no fresh
            # pages per block)
            blk = self.ws.take("rounded", shape, out_dtype, blk.device).copy_(blk.reshape(shape))
        slot = self.ws.next_slot()
        if self._tileable(shape, prepared, out_dtype):
            self.stage["read" if formats.is_dense(job.source) else "dequant"] += time.perf_counter() - t
            out, finite = self._merge_tiles(blk, prepared, r0, out_dtype, slot, dest)
            if not finite:
                raise self._nonfinite(job, r0, r1)
            return out
        w = self.ws.take(f"w{slot}", shape, torch.float32, blk.device)
        w.copy_(blk)
        self.stage["read" if formats.is_dense(job.source) else "dequant"] += time.perf_counter() - t
        for u, tensors in prepared:
            w = u.apply(self.ws, tensors, w, shape, r0, r1, whole, out_dtype)
        if out_dtype == torch.float32:
            out = w
        else:
            out = self.ws.take(f"o{slot}", shape, out_dtype, w.device)
            out.copy_(w)
        if not self.opts.allow_nonfinite and not finite_in(w, out_dtype):
            raise self._nonfinite(job, r0, r1)
        return out

    @staticmethod
    def _nonfinite(job: TensorJob, r0: int, r1: int) -> NonFiniteError:
        return NonFiniteError(
            f"merging into {job.name!r} produced NaN or Inf (rows {r0}..{r1})",
            hint="the adapter's update overflows the output dtype; try --dtype fp32 or bf16, "
            "or --allow-nonfinite to write it anyway",
        )

    @staticmethod
    def _tileable(shape: tuple[int, ...], prepared: list, out_dtype) -> bool:
        """Plain LoRA on a 2-D weight rounded to 16 bits: the common case, merged in L2-sized tiles."""
        plain = all(u.tileable for u, _ in prepared)
        return len(shape) == 2 and out_dtype in (torch.bfloat16, torch.float16) and bool(prepared) and plain

    def _merge_tiles(self, blk: torch.Tensor, prepared: list, r0: int, out_dtype, slot: int, dest=None):
        """The block in tiles of about ``TILE_BYTES`` of fp32 rows: widen, add each update, round, so that a
        tile's temporaries stay in the cache instead of streaming whole blocks through memory four times.
        The same operations on the same rows as the whole-block path (tiles start on multiples of
        ``ROW_ALIGN``): the same bits. Returns the rounded block and whether it is finite. With ``dest``
        each tile is rounded into the writer's staging buffer where it fits (no copy afterwards), else
        into the block and written from there."""
        n, cols = blk.shape
        step = min(n, max(ROW_ALIGN, TILE_BYTES // (4 * cols) // ROW_ALIGN * ROW_ALIGN))
        out = self.ws.take(f"o{slot}", blk.shape, out_dtype, blk.device)
        w = self.ws.take("tile_w", (step, cols), torch.float32, blk.device)
        d = self.ws.take("tile_d", (step, cols), torch.float32, blk.device)
        check = not self.opts.allow_nonfinite
        # each tile's (min, max), checked once per block: no host round trip per tile
        stats = self.ws.take("tile_stats", (-(-n // step), 2), torch.float32, blk.device)
        for i, t0 in enumerate(range(0, n, step)):
            t1 = min(n, t0 + step)
            wt, dt = w[: t1 - t0], d[: t1 - t0]
            wt.copy_(blk[t0:t1])
            for u, tensors in prepared:
                u.apply_tile(tensors, wt, dt, r0 + t0, r0 + t1)
            target = dest.view(t1 - t0, cols) if dest is not None else None
            (out[t0:t1] if target is None else target).copy_(wt)
            if dest is not None:
                dest.done(target, out[t0:t1])
            if check:
                torch.aminmax(wt, out=(stats[i, 0], stats[i, 1]))
        return out, not check or finite_in(stats, out_dtype)


class StagingDest:
    """Tiles of one output tensor rounded straight into a writer's ``O_DIRECT`` staging buffer
    (``reserve``/``commit``); a tile that does not fit what is left of the buffer is rounded into the
    work buffer and written (copied) instead. ``rows``: rows handed to the writer so far."""

    def __init__(self, writer, name: str, dtype: torch.dtype):
        self.writer, self.name, self.dtype = writer, name, dtype
        self.size = dtype.itemsize
        self.rows = 0

    def view(self, rows: int, cols: int) -> torch.Tensor | None:
        mv = self.writer.reserve(self.name, rows * cols * self.size, self.size)
        return None if mv is None else torch.frombuffer(mv, dtype=self.dtype).view(rows, cols)

    def done(self, target: torch.Tensor | None, fallback: torch.Tensor) -> None:
        if target is None:
            self.writer.write(self.name, tensor_bytes(fallback))
        else:
            self.writer.commit(self.name, target.numel() * self.size)
        self.rows += fallback.shape[0]


def finite_in(w: torch.Tensor, dtype: torch.dtype) -> bool:
    """No NaN/Inf in fp32 ``w``, and nothing that overflows ``dtype`` when rounded (no temporaries)."""
    if w.numel() == 0:
        return True
    lo, hi = torch.aminmax(w)
    lim = torch.finfo(dtype).max
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)) and -lim <= float(lo) and float(hi) <= lim
