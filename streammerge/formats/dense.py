"""Dense (16/32-bit) tensors: stored as they are used; rows are zero-copy views moved to the device."""

from __future__ import annotations

from collections.abc import Callable

from ..source import TensorRef


def rows(ref: TensorRef, reader, device) -> Callable:
    t = reader.tensor(ref)
    t = t.reshape(1, -1) if t.dim() == 0 else t
    return lambda r0, r1: t[r0:r1].to(device)
