"""Stored base formats, one module each: recognise a format's tensors from the checkpoint header and
config, group companion keys into one logical tensor (a *source*), and decode row blocks of it to
float on a device.

A source is a :class:`~streammerge.source.TensorRef` for a dense tensor, or a format's own frozen
dataclass with ``name``, ``shape``, ``dtype`` (what decoding yields), ``out_dtype`` (the model dtype a
dense output gets by default), ``label``, ``work_bytes`` (temporaries per element while decoding) and
``rows(reader, ws, device)`` -> a function giving decoded rows ``[r0, r1)``. Its TensorRef fields are
the stored tensors it reads (:func:`~streammerge.source.stored_refs`).

Adding a format: one module with ``group(ckpt, read_bytes) -> dict[name, source]`` and
``stray(names, used) -> list[str]``, listed in :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import QuantError
from ..source import Checkpoint, TensorRef, stored_refs
from . import bnb4, bnb8, dense, fp8, mxfp4

#: the quantized formats, tried in order; whatever none claims is dense.
FORMATS = (bnb4, bnb8, fp8, mxfp4)
#: ``quantization_config.quant_method`` values these formats read
KNOWN_METHODS = {"bitsandbytes", "fp8", "mxfp4"}
#: methods seen on the Hub that are refused by name, with what to do instead
REFUSED_METHODS = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "compressed-tensors": "compressed-tensors",
    "hqq": "HQQ",
    "eetq": "EETQ",
    "aqlm": "AQLM",
    "quanto": "quanto",
    "torchao": "torchao",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
    "bitnet": "BitNet",
    "fbgemm_fp8": "FBGEMM FP8",
    "spqr": "SpQR",
}

Source = TensorRef | bnb4.Quant4Source | bnb8.Int8Source | fp8.Fp8Source | mxfp4.Mxfp4Source


def check_method(ckpt: Checkpoint) -> None:
    """A quantized checkpoint in a format no module reads is refused by name, never merged as if dense."""
    qc = ckpt.config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method is None or method in KNOWN_METHODS:
        return
    name = REFUSED_METHODS.get(str(method), repr(method))
    raise QuantError(
        f"{ckpt.path}: the base is quantized with {name} (quantization_config.quant_method={method!r}), "
        "which streammerge cannot dequantize exactly",
        hint="merge onto the original 16-bit checkpoint of this model (usually the repo without the "
        f"-{str(method).upper()} suffix), or dequantize it to a 16-bit checkpoint first",
    )


def logical_tensors(ckpt: Checkpoint, read_bytes: Callable[[TensorRef], bytes]) -> dict[str, Source]:
    """The checkpoint as the model sees it, in stored order: each quantized weight grouped with its
    companion tensors (found by keys, not module names) under its dequantized shape and dtype."""
    check_method(ckpt)
    grouped: dict[str, Source] = {}
    for fmt in FORMATS:
        grouped.update(fmt.group(ckpt, read_bytes))
    used = {r.name for s in grouped.values() for r in stored_refs(s)}
    stray = [n for fmt in FORMATS for n in fmt.stray(ckpt.tensors, used)]
    if stray:
        raise QuantError(
            f"{ckpt.path}: {len(stray)} quantization tensor(s) belong to no quantized weight",
            details=sorted(stray),
            hint="the checkpoint is incomplete (a shard missing?) or was saved by an unsupported tool",
        )
    # a source named like one of its stored tensors sits where that tensor is; one named otherwise
    # (MXFP4: ``<p>`` from ``<p>_blocks``) where its first stored tensor is
    renamed = {r.name: lg for lg, src in grouped.items() if lg not in ckpt.tensors for r in stored_refs(src)}
    out: dict[str, Source] = {}
    for name, ref in ckpt.tensors.items():
        if name in grouped:
            out[name] = grouped[name]
        elif name in renamed:
            out.setdefault(renamed[name], grouped[renamed[name]])
        elif name not in used:
            out[name] = ref
    return out


def is_dense(src) -> bool:
    return isinstance(src, TensorRef)


def rows_of(src: Source, reader, ws, device) -> Callable:
    """Rows ``[r0, r1)`` of ``src`` on ``device``, decoded (quantized formats) or as stored (dense)."""
    return dense.rows(src, reader, device) if is_dense(src) else src.rows(reader, ws, device)


def quantized_counts(sources: dict[str, Source]) -> dict[str, int]:
    """How many logical tensors of each quantized format (by label), in :data:`FORMATS` order."""
    counts: dict[str, int] = {}
    for s in sources.values():
        if not is_dense(s):
            counts[s.label] = counts.get(s.label, 0) + 1
    return counts
