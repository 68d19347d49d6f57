"""The merged_fp8 output: an FP8 base stays FP8. Weights the adapter changed are re-quantized to the
base's block layout with transformers' FP8 quantizer arithmetic (per block ``scale = 448 / amax``,
``w = clamp(W * scale, -448, 448)`` as e4m3, ``weight_scale_inv = 1 / scale``; with ``scale_fmt: ue8m0``
the inverse scale rounded up to a power of two first), edge blocks cropped; weights it did not touch
are copied byte for byte, scales too; ``quantization_config`` is the base's. Row blocks are whole
scale blocks, so a large weight is re-quantized block by block within the memory budget."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import QuantError
from ..formats.fp8 import SCALE, Fp8Source
from ..source import numel

FP8_MAX = 448.0


@dataclass(frozen=True)
class Fp8Encoding:
    """Re-quantize one merged weight to FP8 e4m3 in blocks of ``block``; ``scale_dtype`` F32 or F8_E8M0."""

    block: tuple[int, int]
    scale_dtype: str = "F32"
    scale_shape: tuple[int, ...] | None = None  # as the base stores it (a per-tensor scale: [] or [1])

    whole_tensor = False
    work_bytes = 4 + 4 + 1  # the fp32 copy (padded to whole blocks), the scaled values, the e4m3 bytes

    @property
    def row_align(self) -> int:
        return self.block[0]

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return -(-shape[0] // self.block[0]), -(-shape[1] // self.block[1])

    def outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
        scale_shape = self.scale_shape if self.scale_shape is not None else self.grid(shape)
        return [(name, "F8_E4M3", shape), (name + SCALE, self.scale_dtype, scale_shape)]

    def copy_parts(self, src) -> list | None:
        """An FP8 weight the adapter did not touch, in this very layout: its stored bytes, unchanged."""
        same = src.block == self.block and src.scale.dtype == self.scale_dtype and src.scale.shape == self.scale_shape
        if isinstance(src, Fp8Source) and same:
            return [src.weight, src.scale]
        return None

    def encode(self, name: str, out: torch.Tensor, ws, r0: int, rows: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The e4m3 rows of the merged block ``out`` (rows ``r0..``), and after the last block the scales."""
        import torch

        b0, b1 = self.block
        n, cols = out.shape
        nb, ncb = -(-n // b0), -(-cols // b1)
        padded = ws.take("f8q", (nb * b0, ncb * b1), torch.float32, out.device)
        if (nb * b0, ncb * b1) != (n, cols):
            padded.zero_()  # zeros leave each block's amax as it is: edge blocks are cropped
        padded[:n, :cols].copy_(out)
        blocks = padded.view(nb, b0, ncb, b1)
        amax = blocks.abs().amax(dim=(1, 3))
        scales = FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax))
        scales = torch.where(amax > 0, scales, torch.ones_like(scales))
        inv = (1.0 / scales).to(torch.float32)
        if self.scale_dtype == "F8_E8M0":
            inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
            scales = 1.0 / inv
        q = torch.clamp(blocks * scales[:, None, :, None], -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        # the scales of all row blocks gather on the CPU (a block retried on the CPU after a device ran out
        # of memory finds the earlier blocks' scales there)
        grid = ws.take("f8inv", self.grid((rows, cols)), torch.float32, torch.device("cpu"))
        grid[r0 // b0 : r0 // b0 + nb] = inv.cpu()
        yield name, q.view(nb * b0, ncb * b1)[:n, :cols].contiguous()
        if r0 + n == rows:
            dtype = torch.float8_e8m0fnu if self.scale_dtype == "F8_E8M0" else torch.float32
            shape = self.scale_shape if self.scale_shape is not None else grid.shape
            yield name + SCALE, grid.to(dtype, copy=True).reshape(shape)  # a copy: the writer still holds it


def encoding_for(name: str, src, shape: tuple[int, ...], embed_key: str | None, opts) -> Fp8Encoding | None:
    """The base's FP8 weights stay FP8 in their own block layout; 16-bit tensors stay 16-bit."""
    if not isinstance(src, Fp8Source):
        return None
    if src.activation is not None:
        raise QuantError(
            f"{src.name!r} has a static activation scale ({src.activation.name!r}): merged_fp8 does not carry "
            "those over",
            hint="use --save-method merged_16bit",
        )
    return Fp8Encoding(src.block, src.scale.dtype, src.scale.shape)


def edit_config(config: dict, base_config: dict, jobs: list, embed_key, where: str, notes: list[str]) -> None:
    """The base's ``quantization_config``, unchanged: the output is the same kind of FP8 checkpoint."""
    encoded = [j for j in jobs if j.encoding is not None]
    if not encoded:
        raise QuantError(
            f"{where}: --save-method merged_fp8 keeps an FP8 base in FP8, and this base holds no FP8 weight",
            hint="use --save-method merged_16bit",
        )
    config["quantization_config"] = dict(base_config.get("quantization_config") or {})
    config["quantization_config"].setdefault("quant_method", "fp8")
    changed = sum(1 for j in encoded if j.updates)
    elems = sum(numel(j.shape) for j in encoded if j.updates)
    notes.append(
        f"merged_fp8: {changed} merged weight(s) ({elems / 1e6:.1f}M values) re-quantized to FP8 in blocks of "
        f"{list(encoded[0].encoding.block)}; {len(encoded) - changed} untouched FP8 weight(s) copied as stored"
    )
