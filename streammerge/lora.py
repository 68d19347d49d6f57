"""Pure merge math, operation for operation what PEFT's ``merge_and_unload()`` computes.

Every function takes tensors and returns tensors; nothing here reads files. ``w`` arguments are
fp32 working copies of (a row block of) the base weight, already rounded to the output dtype.
"""

from __future__ import annotations

import math

import torch


def lowrank_delta(
    a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: ``transpose(B @ A) * scaling`` in fp32 (matmul first, then scale).
    ``out`` (not transposed only) receives the result in place: same kernels, same bits."""
    if out is not None and not transposed:
        torch.matmul(b.float(), a.float(), out=out)
        return out.mul_(scaling) if scaling != 1.0 else out  # x * 1.0 is x, bit for bit
    d = b.float() @ a.float()
    if transposed:
        d = d.T
    return d * scaling


def scaling_folds_exactly(a: torch.Tensor, b: torch.Tensor, scaling: float) -> bool:
    """Whether ``(B * scaling) @ A`` equals ``(B @ A) * scaling`` bit for bit in fp32, so that the
    scaling can be folded into ``B`` once per tensor instead of multiplying every delta element.

    True when ``scaling`` is a power of two (other than 1) and no value of either order of operations
    can fall into fp32's subnormal range or overflow: every element of B and A is a multiple of its
    own exponent's ulp, so every product, partial sum and FMA of the matmul is an exact multiple of
    ``G = 2**(e(bmin) + e(amin) - 46) >= bmin * amin * 2**-48``; a nonzero one is at least G. If
    ``G * min(|s|, 1) >= 2**-126`` they are all normal numbers in both orders, and multiplying by a
    power of two commutes with rounding on normal numbers."""
    m, _ = math.frexp(scaling)
    if abs(m) != 0.5 or scaling == 1.0 or a.numel() == 0 or b.numel() == 0:
        return False
    amin, amax = _abs_range(a)
    bmin, bmax = _abs_range(b)
    if amax == 0.0 or bmax == 0.0:
        return False
    small, big = min(abs(scaling), 1.0), max(abs(scaling), 1.0)
    no_subnormal = bmin * amin * small >= 2.0**-78 and bmin * small >= 2.0**-126
    no_overflow = b.shape[-1] * bmax * amax * big <= 2.0**100 and bmax * big <= 2.0**100
    return no_subnormal and no_overflow


def _abs_range(t: torch.Tensor) -> tuple[float, float]:
    """The smallest nonzero and the largest magnitude in ``t`` (inf, 0 when all zero)."""
    mag = t.abs()
    big = float(mag.max())
    small = float(torch.where(mag > 0, mag, torch.full_like(mag, math.inf)).min())
    return small, big


def apply_lowrank(w: torch.Tensor, delta: torch.Tensor, weight: float, round_to: torch.dtype | None) -> torch.Tensor:
    """``w += weight * delta``; with ``round_to`` the delta is first rounded to that dtype (Embedding)."""
    if weight != 1.0:
        delta = delta * weight
    if round_to is not None:
        delta = delta.to(round_to).float()
    w += delta
    return w


def apply_bias(bias: torch.Tensor, vec: torch.Tensor, scaling: float, weight: float) -> torch.Tensor:
    """PEFT: ``bias += lora_B.bias * scaling`` (in fp32 here; rounded once by the caller)."""
    d = vec.float() * scaling
    if weight != 1.0:
        d = d * weight
    bias += d
    return bias


def dora_merge(
    w0: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, fan_in_fan_out: bool, embedding: bool
) -> torch.Tensor:
    """PEFT's DoRA merge: ``(m / ||W0 + dW||) * (W0 + dW)``.

    Linear: norm over each output row (of the [out, in] view); Embedding: over each embedding
    dimension (PEFT transposes the [vocab, dim] weight first). ``w0``/``delta`` are fp32 in storage
    layout.
    """
    merged = w0 + delta
    if embedding or fan_in_fan_out:
        norm = torch.linalg.norm(w0.T + delta.T, dim=1)
        factor = (magnitude.float() / norm).view(1, -1)
    else:
        norm = torch.linalg.norm(w0 + delta, dim=1)
        factor = (magnitude.float() / norm).view(-1, 1)
    return factor * merged


def replace_rows(w: torch.Tensor, r0: int, indices: tuple[int, ...], values: torch.Tensor) -> torch.Tensor:
    """Trainable tokens: rows ``indices`` (absolute) that fall in this block ``[r0, r0+len(w))`` take ``values``."""
    r1 = r0 + w.shape[0]
    for k, i in enumerate(indices):
        if r0 <= i < r1:
            w[i - r0] = values[k].float()
    return w


def expert_deltas(
    a: torch.Tensor, b: torch.Tensor, experts: int, rank: int, e0: int, e1: int, scaling: float
) -> torch.Tensor:
    """PEFT's ParamWrapper update of experts ``[e0, e1)``: ``einsum("o r e, e r i -> e o i", B3, A3) *
    scaling`` with ``A3 = A.reshape(E, r, in)``, ``B3 = B.reshape(out, r, E)`` (fp32, [n, out, in])."""
    a3 = a.float().reshape(experts, rank, -1)[e0:e1]
    b3 = b.float().reshape(b.shape[0], rank, experts)[:, :, e0:e1]
    return torch.einsum("o r e, e r i -> e o i", b3, a3).mul_(scaling)  # x * s in place: the same bits


def add_rounded(w: torch.Tensor, delta: torch.Tensor, weight: float, round_to: torch.dtype) -> torch.Tensor:
    """PEFT adds a ParamWrapper's update cast to the weight's dtype (``param.data += delta.to(dtype)``):
    two roundings. ``w`` is fp32; adding the rounded delta to it widens it exactly."""
    if weight != 1.0:
        delta = delta.mul_(weight)
    return w.add_(delta.to(round_to))


def hadamard_delta(w1a, w1b, w2a, w2b, scaling: float) -> torch.Tensor:
    """LoHa (PEFT's ``HadaWeight``): ``((w1a @ w1b) * (w2a @ w2b)) * scaling``, in that order; rows of
    ``w1a``/``w2a`` are rows of the delta (a row block of them gives that block, bit for bit)."""
    return ((w1a @ w1b) * (w2a @ w2b)) * scaling


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoKr (PEFT's ``make_kron``): ``kron(w1, w2) * scaling``; rows ``w1[i]`` give delta rows
    ``i * len(w2) ...``, elementwise, so any block of whole ``w1`` rows is exact."""
    return torch.kron(w1, w2.contiguous()) * scaling


def svd_delta(ae: torch.Tensor, b: torch.Tensor, scaling: float, ranknum: float, transposed: bool) -> torch.Tensor:
    """AdaLoRA (PEFT's ``SVDLinear.get_delta_weight``): ``transpose(B @ (A * E)) * scaling / (ranknum + 1e-5)``,
    ``ae`` = ``A * E`` (exact elementwise), ``ranknum`` the initial rank held as a float32 tensor."""
    return lowrank_delta(ae, b, scaling, transposed) / (torch.tensor([float(ranknum)], device=b.device) + 1e-5)


def vera_delta(a, b, lambda_b, lambda_d, transposed: bool) -> torch.Tensor:
    """VeRA (PEFT's ``get_delta_weight``): ``transpose((lambda_b * B) @ (lambda_d * A))``, ``A`` and ``B`` the
    shared projections already sliced to the layer (rows of ``B``/``lambda_b`` are the delta's rows)."""
    d = (lambda_b.unsqueeze(-1) * b) @ (lambda_d.unsqueeze(-1) * a)
    return d.T if transposed else d


def delora_scales(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, r: int) -> torch.Tensor:
    """DeLoRA's ``diag(lambda / r / (||A_i|| * ||B^i||))`` (row norms of A, column norms of B, each at least
    1e-4), as PEFT builds it: from the whole A and B."""
    an = torch.clamp(a.norm(dim=1), min=1e-4)
    bn = torch.clamp(b.norm(dim=0), min=1e-4)
    return torch.diag_embed(lam / r / (an * bn))


def delora_delta(a, b_rows, diag, w_norm) -> torch.Tensor:
    """Rows of DeLoRA's ``(B @ diag @ A) * w_norm`` (``w_norm`` one factor per input column)."""
    return (b_rows @ diag @ a) * w_norm.unsqueeze(0)


def householder(u: torch.Tensor, gram_schmidt: bool) -> torch.Tensor:
    """HRA's product of Householder reflections (PEFT's ``get_delta_weight``, operation for operation):
    ``u`` [in, r]; with ``gram_schmidt`` its columns are orthonormalised first and the product is
    ``I - 2 U U^T``, else ``prod_i (I - 2 u_i u_i^T)`` over the normalised columns, applied in order."""
    n, rank = u.shape
    if gram_schmidt:
        cols = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
        for i in range(1, rank):
            ui = u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (cols[j].t() @ ui) * cols[j]
            cols.append((ui / ui.norm()).view(-1, 1))
        q = torch.cat(cols, dim=1)
        return torch.eye(n, dtype=u.dtype) - 2 * q @ q.t()
    u = u / u.norm(dim=0)
    h = torch.eye(n, dtype=u.dtype)
    for i in range(rank):
        ui = u[:, i].view(-1, 1)
        h = h - 2 * h @ ui @ ui.t()
    return h


def _skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Skew-symmetric [n, b, b] from the packed strict upper triangles ``vec`` [n, b (b - 1) / 2]."""
    rows, cols = torch.triu_indices(b, b, 1)
    m = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def _coft_project(vec: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT's projection of each block into an eps-ball around 0 (eps scaled by 1 / sqrt(blocks))."""
    q = _skew(vec, b)
    eps = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    zero = torch.zeros((q.size(1), q.size(1)), dtype=q.dtype).unsqueeze(0).expand_as(q)
    diff = q - zero
    norm = torch.norm(q - zero, dim=(1, 2), keepdim=True)
    out = torch.where((norm <= eps).bool(), q, zero + eps * (diff / norm))
    rows, cols = torch.triu_indices(b, b, 1)
    return out[:, rows, cols]


def oft_rotation(vec, b: int, blocks: int, neumann: bool, terms: int, coft: bool, eps: float) -> torch.Tensor:
    """OFT's block-diagonal rotation [blocks * b, blocks * b], as PEFT builds it: the Cayley transform of
    each skew block (a Neumann series of ``terms`` terms, or the exact solve), one block repeated when
    ``vec`` holds one (``block_share``)."""
    if coft:
        vec = _coft_project(vec, b, eps)
    q = _skew(vec, b)
    n = vec.shape[0]
    if neumann:
        r = torch.eye(b, dtype=vec.dtype).repeat(n, 1, 1)
        if terms > 1:
            r.add_(q, alpha=2.0)
            if terms > 2:
                q2 = torch.bmm(q, q)
                r.add_(q2, alpha=2.0)
                power = q2
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, q)
                    r.add_(power, alpha=2.0)
                power = torch.bmm(power, q)
                r.add_(power)
    else:
        eye = torch.eye(b).unsqueeze(0).expand(n, b, b)
        r = torch.linalg.solve(eye + q, eye - q, left=False)
    return torch.block_diag(*[r[0 if n == 1 else i] for i in range(blocks)])


def fourier_delta(spectrum: torch.Tensor, out_f: int, in_f: int, seed: int, scaling: float) -> torch.Tensor:
    """FourierFT (PEFT's ``get_delta_weight``): the spectrum scattered at the frequencies PEFT draws with
    ``torch.randperm`` from a generator seeded with ``seed``, ``Re(ifft2(.)) * scaling``, [out, in]."""
    flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[: spectrum.shape[0]]
    idx = torch.stack([flat // in_f, flat % in_f], dim=0)
    dense = torch.zeros(out_f, in_f)
    dense[idx[0, :], idx[1, :]] = spectrum.float()
    return torch.fft.ifft2(dense).real * scaling


def circulant(kernel: torch.Tensor) -> torch.Tensor:
    """C3A's block-circulant matrix [out, in] of ``kernel`` [m, n, b] (PEFT's ``get_circulant_fast``, the
    same FFTs in the same order)."""
    _, n, b = kernel.shape
    x = torch.eye(n * b, dtype=kernel.dtype).reshape(n * b, n, b)
    x = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(x), torch.fft.fft(kernel))
    return torch.fft.fft(x).real.flatten(start_dim=1).T


def randlora_factors(a, b, lam, gamma, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RandLoRA's two factors ``(left, right)`` with ``delta = (left @ right).T * scaling``, as PEFT's
    ``get_scaled_bases`` slices, scales and orders the shared bases ``a`` [r, bases, min] and ``b``
    [max, bases, r] (the trainable scales act on the smaller side)."""
    nb, lo, hi = lam.shape[1], min(out_f, in_f), max(out_f, in_f)
    update_b = b[:hi, :nb, :].flatten(start_dim=1)
    update_a = (lam[:, :, None] * a[:, :nb, :lo] * gamma[None,]).flatten(end_dim=1)
    first, second = (update_a, update_b) if lo == in_f else (update_b.T, update_a.T)
    return first.T, second.T


def vector_bank_mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """VB-LoRA's mixture (PEFT's ``_get_low_rank_matrix``): per row of ``logits`` the softmax of its top-k
    logits weighs the chosen vectors of ``bank``."""
    top, indices = logits.topk(topk, dim=-1)
    return (torch.nn.functional.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def vblora_factors(logits_a, logits_b, bank, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VB-LoRA's ``A`` [r, in] and ``B`` [out, r] from the module's logits and the shared vector bank."""
    a = vector_bank_mix(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = vector_bank_mix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b
