"""The updates of PEFT's other tuner types (IA3, LoHa, LoKr, AdaLoRA, VeRA, SHiRA, DeLoRA, HRA, OFT,
FourierFT, MiSS, C3A, RandLoRA, VB-LoRA), each following :mod:`streammerge.updates`' protocol."""

from __future__ import annotations

from dataclasses import dataclass

from .source import TensorRef
from .updates import COL_ALIGN, ROW_ALIGN, _Update


@dataclass(frozen=True)
class Scale(_Update):
    """(IA)^3: ``W *= l`` elementwise, ``l`` along the rows (``rows``: one factor per row, the bias's too)
    or along the columns; one rounding, as PEFT's ``torch.mul(W, l)`` in fp32."""

    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    vec: TensorRef
    rows: bool
    origin: str
    multiplicative = True

    def refs(self):
        return ((self.vec, "ia3_l", False),)

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        vec = tensors[0].reshape(-1)
        if self.rows:
            return w.mul_(vec[r0:r1].view(-1, *([1] * (w.dim() - 1))))
        return w.mul_(vec)


@dataclass(frozen=True)
class Hadamard(_Update):
    """LoHa: ``W += weight * ((w1a @ w1b) * (w2a @ w2b)) * scaling`` (``w1a``, ``w2a``: [out, r])."""

    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    w1a: TensorRef
    w1b: TensorRef
    w2a: TensorRef
    w2b: TensorRef
    scaling: float
    weight: float
    origin: str

    def refs(self):
        return tuple((t, n, True) for t, n in zip((self.w1a, self.w1b, self.w2a, self.w2b), _HADA, strict=True))

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        w1a, w1b, w2a, w2b = tensors
        if not whole:
            w1a, w2a = w1a[r0:r1], w2a[r0:r1]
        return lora.apply_lowrank(w, lora.hadamard_delta(w1a, w1b, w2a, w2b, self.scaling), self.weight, None)


_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass(frozen=True)
class Kron(_Update):
    """LoKr: ``W += weight * kron(w1, w2) * scaling``; each factor stored whole (one tensor) or as a
    low-rank pair whose product it is. A row block must hold whole rows of ``w1``: ``w2_rows`` apart."""

    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    w1: tuple[TensorRef, ...]
    w2: tuple[TensorRef, ...]
    w2_rows: int
    scaling: float
    weight: float
    origin: str

    @property
    def row_align(self) -> int:
        return self.w2_rows

    def refs(self):
        return tuple((t, t.name.rsplit(".", 1)[-1], True) for t in (*self.w1, *self.w2))

    def prepared(self, tensors: list, fold_scaling: bool):
        n = len(self.w1)
        w1 = tensors[0] if n == 1 else tensors[0] @ tensors[1]
        w2 = tensors[n] if len(self.w2) == 1 else tensors[n] @ tensors[n + 1]
        return self, [w1, w2]

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        w1, w2 = tensors
        k = self.w2_rows
        return lora.apply_lowrank(w, lora.kron_delta(w1[r0 // k : r1 // k], w2, self.scaling), self.weight, None)


@dataclass(frozen=True)
class SvdDelta(_Update):
    """AdaLoRA: ``W += weight * transpose?(B @ (A * E)) * scaling / (ranknum + 1e-5)``. ``resized``: the
    module's rank was pruned (``rank_pattern``), and PEFT's loader, which rebuilds such a module, rounds its
    factors to the model's 16-bit dtype first: so are they here."""

    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    a: TensorRef
    b: TensorRef
    e: TensorRef
    scaling: float
    ranknum: float
    weight: float
    transposed: bool
    resized: bool
    origin: str

    @property
    def row_align(self) -> int:
        return COL_ALIGN if self.transposed else ROW_ALIGN

    def refs(self):
        return ((self.a, "lora_A", True), (self.b, "lora_B", True), (self.e, "lora_E", True))

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        a, b, e = tensors
        if self.resized and out_dtype.itemsize == 2:
            a, b, e = (t.to(out_dtype).float() for t in (a, b, e))
        ae = a * e  # PEFT's A * E (E: [r, 1], one factor per row of A), exact
        if not whole:
            ae, b = (ae[:, r0:r1].contiguous(), b) if self.transposed else (ae, b[r0:r1])
        delta = lora.svd_delta(ae, b, self.scaling, self.ranknum, self.transposed)
        return lora.apply_lowrank(w, delta, self.weight, None)


@dataclass(frozen=True)
class VeraDelta(_Update):
    """VeRA: ``W += weight * transpose?((lambda_b * B[:out]) @ (lambda_d * A[:, :in]))``, ``A``/``B`` the
    model's shared random projections (loaded by PEFT in fp32, as saved), in fp32, rounded once."""

    a: TensorRef
    b: TensorRef
    lambda_b: TensorRef
    lambda_d: TensorRef
    out_f: int
    in_f: int
    weight: float
    transposed: bool
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    @property
    def row_align(self) -> int:
        return COL_ALIGN if self.transposed else ROW_ALIGN

    def refs(self):
        return (
            (self.a, "vera_A", True), (self.b, "vera_B", True),
            (self.lambda_b, "vera_lambda_b", True), (self.lambda_d, "vera_lambda_d", True),
        )  # fmt: skip

    def prepared(self, tensors: list, fold_scaling: bool):
        a, b, lb, ld = tensors
        return self, [a[:, : self.in_f], b[: self.out_f], lb, ld]

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        a, b, lb, ld = tensors
        if not whole:
            a, ld = (a[:, r0:r1], ld) if self.transposed else (a, ld)
            b, lb = (b, lb) if self.transposed else (b[r0:r1], lb[r0:r1])
        return lora.apply_lowrank(w, lora.vera_delta(a, b, lb, ld, self.transposed), self.weight, None)


@dataclass(frozen=True)
class Sparse(_Update):
    """SHiRA: ``W[i, j] += weight * value * scaling`` at the stored indices (PEFT adds a sparse COO tensor
    to the dense weight: duplicates accumulate), in fp32, rounded once."""

    indices: TensorRef
    values: TensorRef
    scaling: float
    weight: float
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    def refs(self):
        return ((self.indices, "shira_indices", True), (self.values, "shira_weight", True))

    def prepared(self, tensors: list, fold_scaling: bool):
        idx, vals = tensors  # the indices were widened to float32 on loading: exact below 2^24
        return self, [idx.long(), vals * self.scaling]

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        idx, vals = tensors
        sel = (idx[0] >= r0) & (idx[0] < r1)
        vals = vals[sel] * self.weight if self.weight != 1.0 else vals[sel]
        return w.index_put_((idx[0][sel] - r0, idx[1][sel]), vals, accumulate=True)


@dataclass(frozen=True)
class Delora(_Update):
    """DeLoRA: ``W += weight * round((B @ diag(lambda / r / (|A_i| |B^i|)) @ A) * w_norm)``: PEFT rounds the
    delta to the weight's dtype before adding it (two roundings)."""

    a: TensorRef
    b: TensorRef
    lam: TensorRef
    w_norm: TensorRef
    r: int
    weight: float
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    def refs(self):
        return (
            (self.a, "delora_A", True), (self.b, "delora_B", True),
            (self.lam, "delora_lambda", True), (self.w_norm, "delora_w_norm", True),
        )  # fmt: skip

    def prepared(self, tensors: list, fold_scaling: bool):
        from . import lora

        a, b, lam, w_norm = tensors
        return self, [a, b, lora.delora_scales(a, b, lam, self.r), w_norm]

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        a, b, diag, w_norm = tensors
        delta = lora.delora_delta(a, b if whole else b[r0:r1], diag, w_norm)
        return lora.apply_lowrank(w, delta, self.weight, out_dtype)


@dataclass(frozen=True)
class Rotate(_Update):
    """HRA: ``W = W @ H``, ``H`` [in, in] the product of the module's Householder reflections, built once
    in fp32 (held while the tensor merges: ``in * in * 4`` bytes); row blocks of ``W``, rounded once."""

    u: TensorRef
    gram_schmidt: bool
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there
    multiplicative = True

    @property
    def work_bytes(self) -> int:
        return 4  # the rotated block beside the block

    def refs(self):
        return ((self.u, "hra_u", True),)

    def prepared(self, tensors: list, fold_scaling: bool):
        from . import lora

        return self, [lora.householder(tensors[0], self.gram_schmidt)]

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        return w @ tensors[0]


@dataclass(frozen=True)
class Orthogonal(_Update):
    """OFT: ``W = (R @ W^T)^T`` with ``R`` [in, in] the block-diagonal rotation of the module, built once
    in fp32; as PEFT, ``torch.mm(R, W[rows]^T)`` on row blocks of ``W`` (column blocks of ``W^T``: aligned
    as a transposed delta's), rounded once."""

    vec: TensorRef
    block_size: int
    blocks: int
    neumann: bool
    terms: int
    coft: bool
    eps: float
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there
    multiplicative = True
    row_align = COL_ALIGN
    work_bytes = 4  # the rotated block beside the block

    def refs(self):
        return ((self.vec, "oft_R", True),)

    def prepared(self, tensors: list, fold_scaling: bool):
        from . import lora

        args = (self.block_size, self.blocks, self.neumann, self.terms, self.coft, self.eps)
        return self, [lora.oft_rotation(tensors[0], *args)]

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        import torch

        return torch.mm(tensors[0], w.t()).t()


@dataclass(frozen=True)
class Fourier(_Update):
    """FourierFT: ``W += weight * transpose?(Re(ifft2(spectrum at seeded frequencies)) * scaling)``; the
    transform needs the whole [out, in] delta, built once per module (held while its tensor merges), then
    added by row blocks, rounded once."""

    spectrum: TensorRef
    out_f: int
    in_f: int
    seed: int
    scaling: float
    weight: float
    transposed: bool
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    def refs(self):
        return ((self.spectrum, "fourierft_spectrum", True),)

    def prepared(self, tensors: list, fold_scaling: bool):
        from . import lora

        delta = lora.fourier_delta(tensors[0], self.out_f, self.in_f, self.seed, self.scaling)
        return self, [delta.T.contiguous() if self.transposed else delta]

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        return lora.apply_lowrank(w, tensors[0] if whole else tensors[0][r0:r1], self.weight, None)


@dataclass(frozen=True)
class Tiled(_Update):
    """MiSS (its default and ``mini`` forms): ``W[o, c] += block[c % r, o]``, the block [r, out] (``mini``:
    [r, mini_r] repeated along the outputs) tiled across the input columns, in fp32, rounded once."""

    block: TensorRef
    out_f: int
    mini_r: int | None
    weight: float
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    def refs(self):
        return ((self.block, "miss_block", True),)

    def prepared(self, tensors: list, fold_scaling: bool):
        b = tensors[0]
        if self.mini_r is not None:
            b = b.repeat(1, self.out_f // self.mini_r)
        return self, [b.t().contiguous()]  # [out, r]: row o holds output o's pattern

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        bt = tensors[0] if whole else tensors[0][r0:r1]
        r = bt.shape[1]
        reps = -(-shape[1] // r)
        return lora.apply_lowrank(w, bt.repeat(1, reps)[:, : shape[1]], self.weight, None)


@dataclass(frozen=True)
class Circulant(_Update):
    """C3A: ``W += weight * (round(circulant(kernel)) / in)``, rounded to the weight's dtype after the
    transform and again after the division, as PEFT computes it; the transform builds the module's whole
    [out, in] matrix once (held while its tensor merges), added by row blocks."""

    kernel: TensorRef
    in_f: int
    weight: float
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    def refs(self):
        return ((self.kernel, "c3a_kernel", True),)

    def prepared(self, tensors: list, fold_scaling: bool):
        from . import lora

        return self, [lora.circulant(tensors[0])]

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        d = (tensors[0] if whole else tensors[0][r0:r1]).to(out_dtype)
        d = (d / self.in_f).float()
        return lora.apply_lowrank(w, d, self.weight, None)


@dataclass(frozen=True)
class RandLora(_Update):
    """RandLoRA: ``W += weight * transpose?((left @ right).T) * scaling``, the factors built from the
    model's shared random bases and the module's scales (``lora.randlora_factors``); the delta's rows are
    columns of ``left @ right``, so blocks are aligned as a transposed delta's; in fp32, the delta rounded to
    the weight's dtype before the add, as PEFT's merge does."""

    a: TensorRef
    b: TensorRef
    lam: TensorRef
    gamma: TensorRef
    out_f: int
    in_f: int
    scaling: float
    weight: float
    transposed: bool
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    @property
    def row_align(self) -> int:
        return ROW_ALIGN if self.transposed else COL_ALIGN

    def refs(self):
        return (
            (self.a, "randlora_A", True), (self.b, "randlora_B", True),
            (self.lam, "randlora_lambda", True), (self.gamma, "randlora_gamma", True),
        )  # fmt: skip

    def prepared(self, tensors: list, fold_scaling: bool):
        from . import lora

        return self, list(lora.randlora_factors(*tensors, self.out_f, self.in_f))

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        left, right = tensors
        if whole:
            update = (left @ right).T
            delta = update.T if self.transposed else update
        elif self.transposed:  # rows of delta = rows of (left @ right)
            delta = left[r0:r1] @ right
        else:
            delta = (left @ right[:, r0:r1].contiguous()).T
        return lora.apply_lowrank(w, delta * self.scaling, self.weight, out_dtype)  # PEFT rounds the delta first


@dataclass(frozen=True)
class VectorBank(_Update):
    """VB-LoRA: ``W += weight * transpose?(B @ A)``, ``A`` and ``B`` mixtures of the model's shared vector
    bank chosen by the module's top-k logits, built once (as PEFT's ``_get_lora_matrices``); row blocks
    (column blocks when transposed), in fp32, rounded once."""

    logits_a: TensorRef
    logits_b: TensorRef
    bank: TensorRef
    topk: int
    weight: float
    transposed: bool
    origin: str
    on_quantized = False  # not yet parity-tested on quantized bases: refused there

    @property
    def row_align(self) -> int:
        return COL_ALIGN if self.transposed else ROW_ALIGN

    def refs(self):
        return (
            (self.logits_a, "vblora_logits_A", True), (self.logits_b, "vblora_logits_B", True),
            (self.bank, "vblora_vector_bank", True),
        )  # fmt: skip

    def prepared(self, tensors: list, fold_scaling: bool):
        from . import lora

        return self, list(lora.vblora_factors(*tensors, self.topk))

    def apply(self, ws, tensors, w, shape, r0: int, r1: int, whole: bool, out_dtype):
        from . import lora

        a, b = tensors
        if not whole:
            a, b = (a[:, r0:r1].contiguous(), b) if self.transposed else (a, b[r0:r1])
        return lora.apply_lowrank(w, lora.lowrank_delta(a, b, 1.0, self.transposed), self.weight, None)
