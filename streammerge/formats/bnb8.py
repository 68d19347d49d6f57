"""bitsandbytes LLM.int8 weights as transformers saves them: ``<m>.weight`` int8 [out, in], ``<m>.SCB``
fp32 [out] (row scales) and optionally ``<m>.weight_format``. Dequantized as bitsandbytes does."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import QuantError
from ..source import Checkpoint, TensorRef, config_dtype

LABEL = "bitsandbytes 8-bit"
#: bitsandbytes' int8 dequantization multiplies by this reciprocal of 127 (not a division).
INT8_SCALE = 7.874015718698502e-3


@dataclass(frozen=True)
class Int8Source:
    """A bitsandbytes LLM.int8 weight: int8 rows and their fp32 scales."""

    name: str
    dtype: str  # the model dtype the dequantized weight is cast to
    shape: tuple[int, ...]
    cb: TensorRef
    scb: TensorRef
    weight_format: TensorRef | None = None

    label = LABEL
    work_bytes = 4  # the fp32 product

    @property
    def out_dtype(self) -> str:
        return self.dtype

    def rows(self, reader, ws, device) -> Callable[[int, int], torch.Tensor]:
        """Rows ``[r0, r1)`` dequantized to fp32."""
        cb, scb = reader.tensor(self.cb), reader.tensor(self.scb)
        return lambda r0, r1: dequantize_int8_rows(cb[r0:r1].to(device), scb[r0:r1].to(device))


def dequantize_int8_rows(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8 row-wise dequantization, as bitsandbytes: ``CB * SCB[:, None] * (1/127)`` in fp32."""
    return cb * scb.view(-1, 1) * INT8_SCALE


def stray(names: Iterable[str], used: set[str]) -> list[str]:
    return [n for n in names if n not in used and n.endswith((".SCB", ".weight_format"))]


def group(ckpt: Checkpoint, read_bytes: Callable[[TensorRef], bytes]) -> dict[str, Int8Source]:
    t = ckpt.tensors
    model_dtype = config_dtype(ckpt.config) or "F16"
    out: dict[str, Int8Source] = {}
    for n in t:
        if not n.endswith(".SCB"):
            continue
        m = n[: -len(".SCB")]
        cb, scb = t.get(m + ".weight"), t[n]
        if cb is None or cb.dtype != "I8" or len(cb.shape) != 2 or scb.shape != (cb.shape[0],) or scb.dtype != "F32":
            found = f"{cb.dtype} {list(cb.shape)}" if cb else "nothing"
            raise QuantError(
                f"{ckpt.path}: 8-bit weight {m + '.weight'!r}: expected int8 [out, in] with F32 SCB [out], found "
                f"{found} and SCB {scb.dtype} {list(scb.shape)}"
            )
        out[m + ".weight"] = Int8Source(m + ".weight", model_dtype, cb.shape, cb, scb, t.get(m + ".weight_format"))
    return out


def dense_config_dtype(config: dict) -> str | None:
    """The dtype a dense output's config.json declares when the base held 8-bit weights."""
    return config_dtype(config)
