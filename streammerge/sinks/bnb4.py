"""The merged_4bit output: merged weights re-quantized to bitsandbytes 4-bit in the layout transformers
saves (written by the safetensors sink). Which tensors are quantized (the Linear weights inside the
layer stack, as transformers would), their companion tensors, and the config's
``quantization_config``. Quantization calls bitsandbytes itself (imported lazily)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import QuantError
from ..formats.bnb4 import Quant4Source
from ..keymap import module_of
from ..options import QuantOut
from ..source import CONFIG_DTYPE_NAME, numel

QUANT_STATE_BYTES = 512  # the packed quant_state JSON is space-padded to this length when we write it


@dataclass(frozen=True)
class Bnb4Encoding:
    """Re-quantize one output tensor to bitsandbytes 4-bit."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    whole_tensor = True  # block statistics span rows: the merged tensor is quantized at once
    work_bytes = 4 + 17  # the fp32 copy handed to bitsandbytes, and its own temporaries

    def outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
        """Names, dtypes and shapes transformers writes for one 4-bit weight (uint8 storage)."""
        n = numel(shape)
        blocks = -(-n // self.blocksize)
        dq = self.double_quant
        out = [(name, "U8", ((n + 1) // 2, 1)), (f"{name}.absmax", "U8" if dq else "F32", (blocks,))]
        out.append((f"{name}.quant_map", "F32", (16,)))
        if dq:
            out += [(f"{name}.nested_absmax", "F32", (-(-blocks // 256),)), (f"{name}.nested_quant_map", "F32", (256,))]
        out.append((f"{name}.quant_state.bitsandbytes__{self.quant_type}", "U8", (QUANT_STATE_BYTES,)))
        return out

    def copy_parts(self, src) -> list | None:
        return None  # a 4-bit base's weight is re-quantized with the requested settings even when untouched

    def encode(self, name: str, out: torch.Tensor, ws, r0: int, rows: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of :meth:`outputs` for the merged values ``out`` (rounded to the output dtype)."""
        # the quantizer works in fp32: handing it the rounded values in a reused fp32 buffer spares it
        # a fresh fp32 copy per tensor (page faults: 15-16 s instead of 10.8 s per 1.7 GB; same bits)
        import torch

        vals = out if out.dtype == torch.float32 else ws.take("q", out.shape, torch.float32, out.device)
        vals.copy_(out)
        packed, parts = quantize_4bit(vals, self.blocksize, self.quant_type, self.double_quant, dtype=out.dtype)
        yield name, packed
        for part, _, _ in self.outputs(name, out.shape)[1:]:
            yield part, parts[part[len(name) + 1 :]]


def quantizable(name: str, shape: tuple[int, ...], embed_key: str | None) -> bool:
    """For a 16-bit base written as ``merged_4bit``: the Linear weights inside the layer stack (not
    embeddings, the output head, norms or MoE routers): the modules transformers would quantize."""
    mod, param = module_of(name)
    last = mod.rsplit(".", 1)[-1]
    return (
        param == "weight"
        and len(shape) == 2
        and name != embed_key
        and any(part.isdigit() for part in mod.split("."))
        and last not in ("gate", "router", "lm_head")
        and "norm" not in last
        and "embed" not in last
    )


def encoding_for(name: str, src, shape: tuple[int, ...], embed_key: str | None, opts) -> Bnb4Encoding | None:
    """A 4-bit input keeps its own settings (unless overridden); a 16-bit one gets the defaults."""
    q: QuantOut | None = opts.quant
    if isinstance(src, Quant4Source):
        q = q or QuantOut(src.quant_type, src.blocksize, src.nested_absmax is not None)
    elif quantizable(name, shape, embed_key):
        q = q or QuantOut()
    else:
        return None
    return Bnb4Encoding(q.quant_type, q.blocksize, q.double_quant)


def edit_config(config: dict, base_config: dict, jobs: list, embed_key: str | None, where: str, notes: list) -> None:
    """``quantization_config`` as transformers writes it for the quantized jobs."""
    qjobs = [j for j in jobs if j.encoding is not None]
    if not qjobs:
        raise QuantError(f"{where}: --save-method merged_4bit found no Linear weight to quantize")
    q = qjobs[0].encoding
    skipped = sorted(
        {module_of(j.name)[0] for j in jobs if j.encoding is None and len(j.shape) == 2 and j.name != embed_key}
    )
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": q.quant_type,
        "bnb_4bit_use_double_quant": q.double_quant,
        "bnb_4bit_compute_dtype": CONFIG_DTYPE_NAME[qjobs[0].dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skipped or None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }
    if len({j.encoding for j in qjobs}) > 1:
        raise QuantError(f"{where}: weights use different 4-bit settings; pass --quant-type/--blocksize")
    notes.append(
        f"merged_4bit: {len(qjobs)} weights re-quantized to {q.quant_type} (blocksize {q.blocksize}, double "
        f"quant {q.double_quant}); re-quantizing after a merge loses precision: prefer merged_16bit for quality"
    )


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int,
    quant_type: str,
    double_quant: bool,
    storage: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Quantize as bitsandbytes' ``quantize_4bit`` does; returns the packed weight and the companion
    tensors keyed by suffix (``absmax``, ``quant_map``, ``nested_*``, ``quant_state.bitsandbytes__<type>``),
    JSON space-padded. ``dtype``: the weight's dtype recorded in the state when ``w`` holds its values
    in another one. On the CPU the codes come from :func:`quantize_4bit_codes`; elsewhere from
    bitsandbytes' own kernel."""
    import torch

    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise QuantError("--save-method merged_4bit needs bitsandbytes", hint="pip install 'streammerge[bnb]'") from e
    w = w.contiguous()
    if w.device.type != "cpu" or not _bnb_cpu_kernel_is_bucketize():
        packed, state = bnbf.quantize_4bit(
            w,
            blocksize=blocksize,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=storage or torch.uint8,
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
    a: torch.Tensor, code: torch.Tensor, blocksize: int, reorder: bool, storage: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU 4-bit quantization kernel, operation for operation: blockwise absmax, scale
    by its reciprocal (the last partial block: divide), clamp to [-1, 1], code index by the midpoints
    between sorted codes, two codes per byte, high nibble first. Its binary search
    (``torch.bucketize``, two thirds of its time) is replaced by counting the midpoints below each
    value, which is the same index (``bucketize`` with ``right=False``) in half the time. Returns the
    packed ``[n/2, 1]`` bytes (viewed as ``storage``) and the fp32 absmax per block."""
    import torch

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
    if storage not in (None, torch.uint8):
        packed = packed.squeeze().view(storage).unsqueeze(1)
    return packed, absmax
