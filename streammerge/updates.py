"""The update protocol: what an adapter does to one base tensor. Each update says which adapter tensors
it needs (:meth:`refs`), whether it needs the whole tensor at once (``whole_tensor``: DoRA's norms) or
else the row multiple its blocks must start on (``row_align``), how much work memory it adds per element,
and how it applies itself to a block of rows (:meth:`apply`, pure arithmetic from :mod:`lora`). The
executor knows nothing else about them; an adapter type (:mod:`streammerge.adapters`) produces them.
Planning imports this module without torch: the arithmetic imports :mod:`lora` (and torch) when it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .source import TensorRef

ROW_ALIGN = 64  # BLAS tiles rows in fixed groups: blocks starting on a multiple reproduce the whole product
COL_ALIGN = 256  # the same for the columns of a transposed delta


class _Update:
    """Defaults of the protocol: row blocks on ``ROW_ALIGN``, no extra work memory, loaded tensors used as is."""

    whole_tensor = False
    work_bytes = 0
    tileable = False  # plain LoRA rounded per tile into 16 bits (the executor's cache-sized fast path)
    multiplicative = False  # it scales or rotates the weight: its order against other adapters matters
    on_quantized = True  # parity-tested against PEFT on quantized (bnb, FP8, MXFP4) bases

    @property
    def row_align(self) -> int:
        return ROW_ALIGN

    def refs(self) -> tuple[tuple[TensorRef, str, bool], ...]:
        """``(tensor, role in messages, whether it is loaded on the host first)`` for each tensor needed."""
        raise NotImplementedError

    def prepared(self, tensors: list, fold_scaling: bool) -> tuple[_Update, list]:
        """This update and its host-loaded tensors as they will be applied (a chance to fold constants)."""
        return self, tensors


@dataclass(frozen=True)
class LowRank(_Update):
    """``W += weight * transpose?(B @ A) * scaling``; ``round_delta`` rounds the delta to W's dtype first
    (PEFT's Embedding merge)."""

    a: TensorRef
    b: TensorRef
    scaling: float
    weight: float
    transposed: bool
    round_delta: bool
    origin: str

    @property
    def row_align(self) -> int:
        return COL_ALIGN if self.transposed else ROW_ALIGN

    @property
    def tileable(self) -> bool:
        return not self.transposed and not self.round_delta

    def refs(self):
        return ((self.a, "lora_A", True), (self.b, "lora_B", True))

    def prepared(self, tensors: list, fold_scaling: bool):
        from . import lora

        a, b = tensors
        if fold_scaling and lora.scaling_folds_exactly(a, b, self.scaling):
            return replace(self, scaling=1.0), [a, b * self.scaling]  # the same bits, one pass fewer
        return self, tensors

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        a, b = tensors
        if self.transposed:
            delta = lora.lowrank_delta(a if whole else a[:, r0:r1].contiguous(), b, self.scaling, True)
        else:
            d = ws.take("d", shape, lora.torch.float32, w.device)
            delta = lora.lowrank_delta(a, b if whole else b[r0:r1], self.scaling, False, out=d)
        return lora.apply_lowrank(w, delta, self.weight, out_dtype if self.round_delta else None)

    def apply_tile(self, tensors, wt, dt, r0: int, r1: int) -> None:
        """Rows ``[r0, r1)`` of the tensor in the fp32 tile ``wt`` (``dt``: the tile's delta buffer)."""
        from . import lora

        a, b = tensors
        lora.apply_lowrank(wt, lora.lowrank_delta(a, b[r0:r1], self.scaling, False, out=dt), self.weight, None)


@dataclass(frozen=True)
class BiasDelta(_Update):
    """``bias += weight * lora_B.bias * scaling``."""

    vec: TensorRef
    scaling: float
    weight: float
    origin: str

    def refs(self):
        return ((self.vec, "lora_B.bias", False),)

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        return lora.apply_bias(w, tensors[0], self.scaling, self.weight)


@dataclass(frozen=True)
class Dora(_Update):
    """DoRA: ``W = (m / ||W0 + dW||) * (W0 + dW)``, norms per output row (``embedding``: per column)."""

    a: TensorRef
    b: TensorRef
    magnitude: TensorRef
    scaling: float
    fan_in_fan_out: bool
    embedding: bool
    origin: str
    whole_tensor = True  # the norms run over whole columns

    def refs(self):
        return ((self.a, "lora_A", True), (self.b, "lora_B", True), (self.magnitude, "DoRA magnitude", False))

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        a, b, magnitude = tensors
        delta = lora.lowrank_delta(a, b, self.scaling, self.embedding or self.fan_in_fan_out)
        return lora.dora_merge(w, delta, magnitude, self.fan_in_fan_out, self.embedding)


@dataclass(frozen=True)
class RowReplace(_Update):
    """Trainable tokens: rows ``indices`` take ``values`` (cast to the output dtype)."""

    indices: tuple[int, ...]
    values: TensorRef
    origin: str

    def refs(self):
        return ((self.values, "trainable tokens", False),)

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        return lora.replace_rows(w, r0, self.indices, tensors[0])


@dataclass(frozen=True)
class ExpertDelta(_Update):
    """PEFT's ParamWrapper update on expert tensors. ``expert`` None: the job is the fused 3-D tensor
    and its rows are the experts; else the job is expert ``expert``'s 2-D tensor, which holds rows
    ``rows`` of that expert's update. ``transposed``: stored [in, out]."""

    a: TensorRef
    b: TensorRef
    scaling: float
    weight: float
    experts: int
    rank: int
    expert: int | None
    rows: tuple[int, int] | None
    transposed: bool
    origin: str
    work_bytes = 4 + 2  # one expert's fp32 update and its rounded copy (counted per element: conservative)

    @property
    def row_align(self) -> int:
        return 1 if self.expert is None else ROW_ALIGN  # a fused tensor's rows are experts, each on its own

    def refs(self):
        return ((self.a, "lora_A", True), (self.b, "lora_B", True))

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        """Rows ``[r0, r1)`` get their expert update, one expert at a time (the temporaries stay one
        expert's size): experts ``r0..r1`` of a fused tensor, or rows of one expert's update."""
        from . import lora

        a, b = tensors
        if self.expert is not None:
            d = lora.expert_deltas(a, b, self.experts, self.rank, self.expert, self.expert + 1, self.scaling)[0]
            lora.add_rounded(w, d[self.rows[0] + r0 : self.rows[0] + r1], self.weight, out_dtype)
            return w
        for e in range(r0, r1):
            d = lora.expert_deltas(a, b, self.experts, self.rank, e, e + 1, self.scaling)[0]
            lora.add_rounded(w[e - r0], d.T if self.transposed else d, self.weight, out_dtype)
        return w


Update = LowRank | BiasDelta | Dora | RowReplace | ExpertDelta  # and the other types' (tuner_updates)


def block_align(updates) -> int:
    """The row multiple a tensor's blocks start on: 1 when a fused expert tensor's rows are experts,
    else the largest any of its updates needs."""
    if any(u.row_align == 1 and isinstance(u, ExpertDelta) for u in updates):
        return 1
    return math.lcm(ROW_ALIGN, *(u.row_align for u in updates))
