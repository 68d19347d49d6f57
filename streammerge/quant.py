"""Pure (de)quantization of bitsandbytes tensors in the layout transformers saves.

Dequantization is plain torch, operation for operation what bitsandbytes' reference kernels do
(``code[q] * absmax[block]`` in fp32, then one cast), so it is exact on any device and does not
depend on bitsandbytes' native CPU kernels (which returned wrong values for some shapes).
Re-quantization calls bitsandbytes itself (imported lazily: only ``merged_4bit`` needs it).
"""

from __future__ import annotations

import functools
import json

import torch

from .errors import QuantError

#: bitsandbytes' int8 dequantization multiplies by this reciprocal of 127 (not a division).
INT8_SCALE = 7.874015718698502e-3
QUANT_STATE_BYTES = 512  # the packed quant_state JSON is space-padded to this length when we write it


def dequantize_absmax(
    absmax_u8: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: float,
    nested_blocksize: int,
) -> torch.Tensor:
    """Double quantization: ``nested_code[absmax] * nested_absmax[j // nested_blocksize] + offset`` (fp32)."""
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


def dequantize_int8_rows(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 row-wise dequantization, as bitsandbytes: ``CB * SCB[:, None] * (1/127)`` in fp32."""
    return cb * scb.view(-1, 1) * INT8_SCALE


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
    if state["blocksize"] not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
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


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int,
    quant_type: str,
    double_quant: bool,
    storage: torch.dtype = torch.uint8,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Quantize as bitsandbytes' ``quantize_4bit`` does; returns the packed weight and the companion
    tensors keyed by suffix (``absmax``, ``quant_map``, ``nested_*``, ``quant_state.bitsandbytes__<type>``),
    JSON space-padded. ``dtype``: the weight's dtype recorded in the state when ``w`` holds its values
    in another one. On the CPU the codes come from :func:`quantize_4bit_codes`; elsewhere from
    bitsandbytes' own kernel."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise QuantError("--save-method merged_4bit needs bitsandbytes", hint="pip install 'streammerge[bnb]'") from e
    w = w.contiguous()
    if w.device.type != "cpu" or not _bnb_cpu_kernel_is_bucketize():
        packed, state = bnbf.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type, quant_storage=storage
        )
    else:  # bitsandbytes.functional.quantize_4bit, with the codes from the faster equivalent kernel
        code = bnbf.get_4bit_type(quant_type, device=w.device)
        packed, absmax = quantize_4bit_codes(w, code, blocksize, quant_type != "nf4", storage)
        extra = {}
        if double_quant:
            offset = absmax.mean()
            absmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
            extra = {"offset": offset, "state2": state2}
        state = bnbf.QuantState(
            absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code, quant_type=quant_type, **extra
        )
    if dtype is not None:
        state.dtype = dtype
    parts = state.as_dict(packed=True)
    key = next(k for k in parts if k.startswith("quant_state."))
    raw = bytes(parts[key].cpu().numpy())
    if len(raw) > QUANT_STATE_BYTES:
        raise QuantError(f"quant_state JSON is {len(raw)} bytes, more than {QUANT_STATE_BYTES}")
    parts[key] = torch.frombuffer(bytearray(raw.ljust(QUANT_STATE_BYTES, b" ")), dtype=torch.uint8)
    return packed, {k: v.cpu().contiguous() for k, v in parts.items()}


@functools.cache
def _bnb_cpu_kernel_is_bucketize() -> bool:
    """Whether the installed bitsandbytes quantizes on the CPU by bucketizing on the code midpoints,
    the kernel :func:`quantize_4bit_codes` reproduces (0.50 does; other versions use bitsandbytes)."""
    try:
        from bitsandbytes.backends.default import ops
    except ImportError:
        return False
    return hasattr(ops, "_get_4bit_quantize_bounds")


def quantize_4bit_codes(
    a: torch.Tensor, code: torch.Tensor, blocksize: int, reorder: bool, storage: torch.dtype = torch.uint8
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU 4-bit quantization kernel, operation for operation: blockwise absmax, scale
    by its reciprocal (the last partial block: divide), clamp to [-1, 1], code index by the midpoints
    between sorted codes, two codes per byte, high nibble first. Its binary search
    (``torch.bucketize``, two thirds of its time) is replaced by counting the midpoints below each
    value, which is the same index (``bucketize`` with ``right=False``) in half the time. Returns the
    packed ``[n/2, 1]`` bytes (viewed as ``storage``) and the fp32 absmax per block."""
    order = torch.argsort(code)
    bounds = ((code[order[:-1]] + code[order[1:]]) / 2).tolist()
    flat = a.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.gt(scaled, bounds[0]).to(torch.uint8)
    above = torch.empty(scaled.shape, dtype=torch.bool)
    for b in bounds[1:]:
        q.add_(torch.gt(scaled, b, out=above))
    nan = torch.isnan(scaled)
    if bool(nan.any()):  # bucketize puts NaN after every boundary
        q[nan] = len(bounds)
    if reorder:  # fp4's codes are not sorted: map the sorted position back to the code index
        q = order.to(torch.uint8)[q.long()]
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    if storage != torch.uint8:
        packed = packed.squeeze().view(storage).unsqueeze(1)
    return packed, absmax
