"""MXFP4 experts (gpt-oss): ``<p>_blocks`` U8 [E, out, in/32, 16] (two e2m1 values per byte, the even
element in the low nibble) and ``<p>_scales`` U8 [E, out, in/32] (e8m0: ``2 ** (s - 127)`` per group of
32). The logical tensor is ``<p>`` [E, in, out], the layout transformers' dequantizing loader
(``convert_moe_packed_tensors``) gives and a dense gpt-oss checkpoint stores; its rows are experts, so
a fused expert tensor is decoded one expert block at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import QuantError
from ..source import Checkpoint, TensorRef, config_dtype

LABEL = "MXFP4"
BLOCKS, SCALES = "_blocks", "_scales"
#: e2m1 code -> value (bit 3 is the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Mxfp4Source:
    """A gpt-oss expert parameter packed as MXFP4: logical shape [E, in, out]."""

    name: str
    dtype: str  # decoded values are exact in fp32 (3 significant bits times a power of two)
    out_dtype: str
    shape: tuple[int, ...]
    blocks: TensorRef
    scales: TensorRef

    label = LABEL
    work_bytes = 4 + 4 + 8  # the fp32 values, their transpose, the per-byte table lookups

    def rows(self, reader, ws, device) -> Callable[[int, int], torch.Tensor]:
        """Experts ``[r0, r1)`` decoded to fp32, [n, in, out]."""
        blocks, scales = reader.tensor(self.blocks), reader.tensor(self.scales)
        return lambda r0, r1: decode(blocks[r0:r1].to(device), scales[r0:r1].to(device)).transpose(1, 2)


def decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[n, out, G, 16] codes and [n, out, G] exponents -> [n, out, G * 32] fp32, as transformers'
    ``convert_moe_packed_tensors``: low nibble = even element, high = odd, times ``2 ** (s - 127)``."""
    import torch

    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    vals = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)
    vals = vals.reshape(*blocks.shape[:-1], 32)
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).to(torch.float32))
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def dense_config_dtype(config: dict) -> str | None:
    return config_dtype(config) or "BF16"


def stray(names: Iterable[str], used: set[str]) -> list[str]:
    return [n for n in names if n not in used and n.endswith((BLOCKS, SCALES))]


def group(ckpt: Checkpoint, read_bytes: Callable[[TensorRef], bytes]) -> dict[str, Mxfp4Source]:

    t = ckpt.tensors
    out_dtype = dense_config_dtype(ckpt.config)
    found: dict[str, Mxfp4Source] = {}
    for name in [n for n in t if n.endswith(BLOCKS)]:
        p = name[: -len(BLOCKS)]
        b, s = t[name], t.get(p + SCALES)
        if s is None:
            raise QuantError(
                f"{ckpt.path}: MXFP4 blocks {name!r} have no {p + SCALES!r}", hint="the checkpoint is incomplete"
            )
        if b.dtype != "U8" or len(b.shape) != 4 or b.shape[-1] != 16 or s.dtype != "U8" or s.shape != b.shape[:3]:
            raise QuantError(
                f"{ckpt.path}: MXFP4 {name!r} {b.dtype} {list(b.shape)} with {s.name!r} {s.dtype} {list(s.shape)}: "
                "expected U8 [E, out, in/32, 16] and U8 [E, out, in/32]"
            )
        if b"\xff" in read_bytes(s):
            raise QuantError(f"{ckpt.path}: {s.name!r} holds the e8m0 NaN code 255", hint="the checkpoint is corrupt")
        e, out_f, groups, _ = b.shape
        found[p] = Mxfp4Source(p, "F32", out_dtype, (e, groups * 32, out_f), b, s)
    return found
