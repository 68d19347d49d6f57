"""The mxfp4 output (``--save-method mxfp4``): a gpt-oss MXFP4 base stays MXFP4. Merged expert tensors
are re-packed per group of 32 with the rule of OpenAI's MX kernels (triton_kernels' ``downcast_to_mxfp``,
which transformers calls on a GPU): scale = the group's amax / 6 rounded up to a power of two (e8m0),
each value divided by it and rounded to the nearest e2m1 value, halves away from zero, saturating at
6; expert tensors the adapter did not touch are copied byte for byte; ``quantization_config`` is the
base's. Experts are encoded one expert block at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import QuantError
from ..formats.mxfp4 import BLOCKS, SCALES, Mxfp4Source

#: midpoints between the e2m1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6: the code is how many lie at or below |x|
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n] float (n % 32 == 0) -> (codes U8 [..., n/32, 16], e8m0 scales U8 [..., n/32])."""
    import torch

    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    amax = g.abs().amax(dim=-1, keepdim=True)
    bits = ((amax / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000  # round up to a power of two
    scale = bits.view(torch.float32)
    q = g * torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)  # 1 / 2^k: exact
    mag = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for m in MIDPOINTS:
        mag += q.abs() >= m
    codes = mag | (torch.signbit(q).to(torch.uint8) << 3)
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return packed, (bits.squeeze(-1) >> 23).to(torch.uint8)


@dataclass(frozen=True)
class Mxfp4Encoding:
    """Re-pack a merged expert tensor [E, in, out] as ``_blocks`` / ``_scales``."""

    whole_tensor = False
    row_align = 1  # rows are experts, each packed on its own
    work_bytes = 4 + 4 + 2

    def outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
        e, n_in, n_out = shape
        return [(name + BLOCKS, "U8", (e, n_out, n_in // 32, 16)), (name + SCALES, "U8", (e, n_out, n_in // 32))]

    def copy_parts(self, src) -> list | None:
        return [src.blocks, src.scales] if isinstance(src, Mxfp4Source) else None

    def encode(self, name: str, out: torch.Tensor, ws, r0: int, rows: int) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        n, n_in, n_out = out.shape
        packed, scales = encode(out.transpose(1, 2))
        acc = ws.take("mxs", (rows, n_out, n_in // 32), torch.uint8, torch.device("cpu"))  # survives a device change
        acc[r0 : r0 + n] = scales.cpu()
        yield name + BLOCKS, packed
        if r0 + n == rows:
            yield name + SCALES, acc.clone()  # a copy: the writer thread still holds it


def encoding_for(name: str, src, shape: tuple[int, ...], embed_key: str | None, opts) -> Mxfp4Encoding | None:
    return Mxfp4Encoding() if isinstance(src, Mxfp4Source) else None


def edit_config(config: dict, base_config: dict, jobs: list, embed_key, where: str, notes: list[str]) -> None:
    encoded = [j for j in jobs if j.encoding is not None]
    if not encoded:
        raise QuantError(
            f"{where}: --save-method mxfp4 keeps an MXFP4 base in MXFP4, and this base holds no MXFP4 tensor",
            hint="use --save-method merged_16bit",
        )
    config["quantization_config"] = dict(base_config.get("quantization_config") or {"quant_method": "mxfp4"})
    changed = sum(1 for j in encoded if j.updates)
    notes.append(
        f"mxfp4: {changed} merged expert tensor(s) re-packed as MXFP4; {len(encoded) - changed} untouched "
        "one(s) copied as stored"
    )
