"""bitsandbytes 4-bit weights (nf4/fp4, optionally double-quantized) in the layout transformers saves.

Per weight ``<m>.weight``: packed codes (two per byte, high nibble first), ``.absmax`` (fp32, or uint8
with double quantization plus ``.nested_absmax`` / ``.nested_quant_map``), ``.quant_map`` and the JSON
``.quant_state.bitsandbytes__<type>`` (the only record of shape and dtype); pieces may sit in
different shards. Dequantization is plain torch, operation for operation what bitsandbytes'
reference kernels do (``code[q] * absmax[block]`` in fp32, then one cast), so it is exact on any
device and does not depend on bitsandbytes' native CPU kernels (wrong for some shapes in 0.50.2).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import QuantError
from ..source import FLOAT_NAMES, Checkpoint, TensorRef, numel, torch_dtype

LABEL = "bitsandbytes 4-bit"
SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
QSTATE_MARK = ".quant_state.bitsandbytes__"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Quant4Source:
    """A bitsandbytes 4-bit weight: packed codes plus statistics, each possibly in another shard."""

    name: str
    dtype: str  # the dtype bitsandbytes dequantizes to (quant_state "dtype")
    out_dtype: str  # a dense output's default: bnb_4bit_compute_dtype, else ``dtype``
    shape: tuple[int, ...]
    packed: TensorRef
    absmax: TensorRef
    quant_map: TensorRef
    state: TensorRef
    quant_type: str
    blocksize: int
    nested_absmax: TensorRef | None = None
    nested_quant_map: TensorRef | None = None
    nested_blocksize: int = 256
    nested_offset: float = 0.0

    label = LABEL
    #: decoding temporaries per element: int32 byte indices, fp32 values, fp32 scales, the rounded copy
    work_bytes = 2 + 4 + 4 + 2

    def rows(self, reader, ws, device) -> Callable[[int, int], torch.Tensor]:
        """Rows ``[r0, r1)`` dequantized in the quant_state dtype (as bitsandbytes returns them)."""
        import torch

        cols = numel(self.shape[1:])
        packed = reader.tensor(self.packed).reshape(-1).view(torch.uint8)
        code = reader.tensor(self.quant_map).to(device, torch.float32)
        absmax = reader.tensor(self.absmax).to(device)
        if self.nested_absmax is not None:
            nested = reader.tensor(self.nested_absmax).to(device)
            nested_code = reader.tensor(self.nested_quant_map).to(device)
            absmax = dequantize_absmax(absmax, nested, nested_code, self.nested_offset, self.nested_blocksize)
        absmax = absmax.float()
        qdtype = torch_dtype(self.dtype)

        def rows(r0: int, r1: int) -> torch.Tensor:
            n = (r1 - r0) * cols
            out = ws.take("dq", (n + 2,), torch.float32, device)  # reused: no fresh pages per block
            index = ws.take("dqi", (n // 2 + 1,), torch.int32, device)
            vals = dequantize_4bit_range(
                packed, absmax, code, self.blocksize, r0 * cols, r1 * cols, device, out=out, index=index
            )
            rounded = ws.take("dqr", (r1 - r0, *self.shape[1:]), qdtype, device)
            return rounded.copy_(vals.view(rounded.shape))

        return rows


def compute_dtype(config: dict) -> str | None:
    """``bnb_4bit_compute_dtype`` of a quantized checkpoint, if any."""
    name = (config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype")
    return FLOAT_NAMES.get(name) if isinstance(name, str) else None


def dense_config_dtype(config: dict) -> str | None:
    """The dtype a dense output's config.json declares when the base held 4-bit weights."""
    return compute_dtype(config)


def _parts(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """weight name -> {part: tensor name}, grouped by the quant_state key (not by module names)."""
    names = set(names)
    found: dict[str, dict[str, str]] = {}
    for n in names:
        if QSTATE_MARK in n:
            found.setdefault(n[: n.index(QSTATE_MARK)], {})["quant_state"] = n
    for w, parts in found.items():
        parts["weight"] = w
        for suf in SUFFIXES:
            if w + suf in names:
                parts[suf[1:]] = w + suf
    return found


def stray(names: Iterable[str], used: set[str]) -> list[str]:
    """4-bit companion-looking keys that belong to no 4-bit weight (a checkpoint missing pieces)."""
    return [n for n in names if n not in used and (n.endswith(SUFFIXES) or QSTATE_MARK in n)]


def group(ckpt: Checkpoint, read_bytes: Callable[[TensorRef], bytes]) -> dict[str, Quant4Source]:
    t = ckpt.tensors
    out: dict[str, Quant4Source] = {}
    for w, parts in _parts(t).items():
        missing = [p for p in ("weight", "absmax", "quant_map") if p not in parts or parts[p] not in t]
        if missing:
            raise QuantError(f"{ckpt.path}: 4-bit weight {w!r} lacks {', '.join(missing)}")
        state = parse_quant_state(read_bytes(t[parts["quant_state"]]), f"{ckpt.path}: {parts['quant_state']}")
        nested = "nested_absmax" in parts
        if nested != ("nested_quant_map" in parts) or nested != ("nested_offset" in state):
            raise QuantError(f"{ckpt.path}: {w!r} has an incomplete double-quantization state")
        shape = tuple(state["shape"])
        n, bs = numel(shape), state["blocksize"]
        blocks = -(-n // bs)
        packed, absmax = t[parts["weight"]], t[parts["absmax"]]
        want_absmax = ("U8" if nested else "F32", blocks)
        if packed.nbytes != (n + 1) // 2 or (absmax.dtype, absmax.numel) != want_absmax:
            raise QuantError(
                f"{ckpt.path}: 4-bit weight {w!r} of shape {list(shape)}: packed {packed.nbytes} bytes "
                f"(expected {(n + 1) // 2}), absmax {absmax.dtype}[{absmax.numel}] (expected "
                f"{want_absmax[0]}[{blocks}])",
                hint="the quant_state does not match the stored tensors; the checkpoint is corrupt",
            )
        dtype = FLOAT_NAMES[state["dtype"]]
        out[w] = Quant4Source(
            w,
            dtype,
            compute_dtype(ckpt.config) or dtype,
            shape,
            packed,
            absmax,
            t[parts["quant_map"]],
            t[parts["quant_state"]],
            state["quant_type"],
            bs,
            t.get(parts.get("nested_absmax", "")),
            t.get(parts.get("nested_quant_map", "")),
            int(state.get("nested_blocksize", 256)),
            float(state.get("nested_offset", 0.0)),
        )
    return out


def parse_quant_state(raw: bytes, where: str) -> dict:
    """The JSON record bitsandbytes packs into ``<m>.weight.quant_state.bitsandbytes__<type>``."""
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantError(f"{where}: quant_state is not valid JSON ({e})", hint="the checkpoint is corrupt") from None
    if not isinstance(state, dict):
        raise QuantError(f"{where}: quant_state must be a JSON object")
    need = {"quant_type": str, "blocksize": int, "dtype": str, "shape": list}
    for k, t in need.items():
        if not isinstance(state.get(k), t):
            raise QuantError(f"{where}: quant_state field {k!r} must be {t.__name__}, found {state.get(k)!r}")
    if state["quant_type"] not in ("nf4", "fp4"):
        raise QuantError(f"{where}: unknown quant_type {state['quant_type']!r}", hint="expected nf4 or fp4")
    if state["blocksize"] not in BLOCKSIZES:
        raise QuantError(f"{where}: invalid blocksize {state['blocksize']}")
    if state["dtype"] not in ("bfloat16", "float16", "float32"):
        raise QuantError(f"{where}: unsupported dtype {state['dtype']!r}")
    if not all(isinstance(d, int) and d >= 0 for d in state["shape"]):
        raise QuantError(f"{where}: invalid shape {state['shape']!r}")
    if "nested_absmax" in state or "nested_blocksize" in state:
        for k in ("nested_blocksize", "nested_offset"):
            if not isinstance(state.get(k), (int, float)):
                raise QuantError(f"{where}: double-quantized state lacks {k!r}")
    return state


def dequantize_absmax(
    absmax_u8: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: float,
    nested_blocksize: int,
) -> torch.Tensor:
    """Double quantization: ``nested_code[absmax] * nested_absmax[j // nested_blocksize] + offset`` (fp32)."""
    import torch

    n = absmax_u8.numel()
    idx = torch.arange(n, device=absmax_u8.device) // nested_blocksize
    out = nested_code.float()[absmax_u8.reshape(-1).long()] * nested_absmax.float()[idx]
    return out + torch.tensor(offset, dtype=torch.float32, device=out.device)


def dequantize_4bit_range(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    e0: int,
    e1: int,
    device: torch.device | None = None,
    out: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elements ``[e0, e1)`` of a 4-bit tensor, dequantized to fp32: ``code[q] * absmax[i // blocksize]``.

    Each byte holds two codes, high nibble first; a 256-entry table gives both values of a byte in one
    lookup, and the block scale is applied by broadcasting over ``[blocks, blocksize]``. Only the bytes
    of the range move to ``device``. ``out`` (fp32, at least ``e1 - e0 + 2`` elements) and ``index``
    (int32, half that) are reusable work buffers on ``device``; without them fresh ones are allocated."""
    import torch

    dev = device or absmax.device
    b0, b1 = e0 // 2, (e1 + 1) // 2
    c = code.to(dev, torch.float32)
    pairs = torch.stack([c.repeat_interleave(16), c.repeat(16)], dim=1)  # byte -> (code[hi], code[lo])
    raw = packed[b0:b1].to(dev)  # move the bytes, then widen them: a quarter of the transfer
    raw = raw.int() if index is None else index[: b1 - b0].copy_(raw)
    if out is None:
        vals = pairs.index_select(0, raw).reshape(-1)
    else:
        vals = torch.index_select(pairs, 0, raw, out=out[: 2 * (b1 - b0)].view(-1, 2)).view(-1)
    start = e0 - 2 * b0
    vals = vals[start : start + (e1 - e0)]
    k0 = e0 // blocksize
    if e0 % blocksize == 0 and (e1 - e0) % blocksize == 0:
        scale = absmax[k0 : e1 // blocksize].view(-1, 1)
        return vals.view(-1, blocksize).mul_(scale).view(-1)
    k1 = (e1 - 1) // blocksize + 1
    scale = absmax[k0:k1].repeat_interleave(blocksize)[e0 - k0 * blocksize :][: e1 - e0]
    return vals.mul_(scale)
