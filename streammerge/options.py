"""What a run is asked: :class:`MergeOptions`, and the parsing of user-facing values into it."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from .errors import InputError, UsageError
from .outputs import SAVE_METHODS, output  # noqa: F401  (re-exported)
from .source import DTYPE_ALIASES

# --gguf-type: what llama.cpp's converter writes itself, and the k-quants its quantizer makes from that
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "auto")
KQUANTS = (
    "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m",
    "q5_0", "q5_1", "q5_k_s", "q5_k_m", "q6_k",
)  # fmt: skip
ALL_TYPES = GGUF_TYPES + KQUANTS
DEFAULT_MAX_MEMORY = "128MiB"
CHECKSUMS = ("xxh3", "crc32", "sha256")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
WRITE_QUEUE = 1  # blocks queued for the writer thread; work buffers rotate through WRITE_QUEUE + 2 slots


@dataclass(frozen=True)
class QuantOut:
    """Re-quantize an output to bitsandbytes 4-bit (``merged_4bit``)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True


@dataclass(frozen=True)
class MergeOptions:
    dtype: str = "auto"  # auto or a safetensors float dtype name
    shard_size: int = 5_000_000_000
    device: str = "auto"
    save_method: str = "merged_16bit"
    quant: QuantOut | None = None  # merged_4bit settings for a 16-bit base (None: the input's own)
    compress: int | None = None  # zstd level: write *.safetensors.zst shards (archival)
    checksum: str = "xxh3"  # per-shard checksum in the journal and report: xxh3, crc32 or sha256
    allow_nonfinite: bool = False
    block_bytes: int = 64 * 1024 * 1024
    direct_io: bool = True  # write plain shards with O_DIRECT where the filesystem allows it
    gguf_type: str = "auto"  # --save-method gguf: f32, f16, bf16, q8_0, auto, or a llama.cpp k-quant


@dataclass(frozen=True)
class RunOptions:
    """How a merge runs (not what it makes): where its shards are written, whether it continues an
    interrupted run or replaces an output, the device, and whether a progress bar is shown."""

    executor: str = "inprocess"  # inprocess, local (worker processes) or ray
    workers: int = 2
    address: str | None = None  # a Ray cluster's address
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    progress: bool = False


_UNITS = {
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


def parse_size(text: str | int) -> int:
    """``5GB``, ``512MiB``, ``1e9`` or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    num, unit = s[:i], s[i:]
    if unit not in _UNITS or not num:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    value = float(num) * _UNITS[unit]
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


def resolve_device(name: str):
    """``auto`` -> CUDA when available, else the CPU; ``cuda`` without a device is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu or cuda")
    return torch.device(name)


def parse_compress(spec: str | int | None) -> int | None:
    """``zstd`` or ``zstd:LEVEL`` (1-22; default 3) -> the zstd level; None -> no compression."""
    if spec is None or spec is False:
        return None
    text = str(spec)
    name, _, level = text.partition(":")
    if name != "zstd":
        raise UsageError(f"unknown compression {text!r}", hint="use zstd or zstd:LEVEL")
    try:
        value = int(level) if level else 3
    except ValueError:
        raise UsageError(f"--compress {text!r}: the level must be an integer") from None
    if not 1 <= value <= 22:
        raise UsageError(f"--compress {text!r}: zstd levels go from 1 to 22")
    return value


def _quant_out(save_method: str, quant_type, blocksize, double_quant) -> QuantOut | None:
    if quant_type is None and blocksize is None and double_quant is None:
        return None
    if "quant" not in output(save_method).takes:
        raise UsageError("--quant-type/--blocksize/--double-quant only apply to --save-method merged_4bit")
    if quant_type not in (None, "nf4", "fp4"):
        raise UsageError(f"unknown quant type {quant_type!r}", hint="use nf4 or fp4")
    if blocksize not in (None, *BLOCKSIZES):
        raise UsageError(f"invalid blocksize {blocksize}", hint="use a power of two from 32 to 4096")
    return QuantOut(quant_type or "nf4", blocksize or 64, True if double_quant is None else double_quant)


def _gguf_type(save_method: str, gguf_type: str | None) -> str:
    if gguf_type is None:
        return "auto"
    if "gguf_type" not in output(save_method).takes:
        raise UsageError("--gguf-type only applies to --save-method gguf")
    if gguf_type.lower() not in ALL_TYPES:
        raise UsageError(f"unknown GGUF type {gguf_type!r}", hint=f"use one of {', '.join(ALL_TYPES)}")
    return gguf_type.lower()


def make_options(
    dtype: str = "auto",
    shard_size: str | int = "5GB",
    device: str = "auto",
    save_method: str = "merged_16bit",
    allow_nonfinite: bool = False,
    max_memory: int | str | float = DEFAULT_MAX_MEMORY,
    quant_type: str | None = None,
    blocksize: int | None = None,
    double_quant: bool | None = None,
    compress: str | int | None = None,
    checksum: str = "xxh3",
    direct_io: bool = True,
    gguf_type: str | None = None,
) -> MergeOptions:
    """Validated :class:`MergeOptions` from user-facing values. ``compress``: ``zstd[:LEVEL]``."""
    out = output(save_method)
    opts = MergeOptions(
        dtype=resolve_dtype(dtype),
        shard_size=parse_size(shard_size),
        device=device,
        save_method=save_method,
        allow_nonfinite=allow_nonfinite,
        block_bytes=parse_memory(max_memory),
        quant=_quant_out(save_method, quant_type, blocksize, double_quant),
        compress=parse_compress(compress),
        checksum=checksum,
        direct_io=bool(direct_io),
        gguf_type=_gguf_type(save_method, gguf_type),
    )
    if checksum not in CHECKSUMS:
        raise UsageError(f"unknown checksum {checksum!r}", hint=f"use one of {', '.join(CHECKSUMS)}")
    if opts.compress is not None and not out.compressible:
        raise UsageError("--compress applies to merged outputs, not --save-method lora")
    return opts
