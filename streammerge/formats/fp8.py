"""FP8 block-scaled weights (DeepSeek-V3/R1, Qwen3-*-FP8, transformers' FineGrainedFP8 quantizer).

Per quantized Linear ``<m>``: ``<m>.weight`` F8_E4M3 [out, in] and ``<m>.weight_scale_inv`` [ceil(out/b0),
ceil(in/b1)] (F32; F8_E8M0 with ``scale_fmt: ue8m0``), ``(b0, b1)`` = ``weight_block_size``. Decoding:
``W[i, j] = fp32(w[i, j]) * scale_inv[i // b0, j // b1]`` in fp32, edge blocks cropped (DeepSeek's rule;
transformers' dequantizing loader agrees bit for bit on block multiples and cannot read the rest), then
one rounding to the model dtype. Everything is checked before a byte is read: a weight without its
scale, a scale grid that does not match the block size, an unknown ``fmt``, NaN/Inf or negative scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import QuantError
from ..source import Checkpoint, TensorRef, config_dtype

LABEL = "FP8 block-scaled"
SCALE = "_scale_inv"  # <m>.weight -> <m>.weight_scale_inv
ACTIVATION_SCALES = (".activation_scale", ".input_scale")  # static activation quantization: no weight meaning
SCALE_DTYPES = ("F32", "F8_E8M0")


@dataclass(frozen=True)
class Fp8Source:
    """An FP8 weight and its per-block inverse scales."""

    name: str
    dtype: str  # what decoding yields: fp32 values, rounded once to the output dtype by the executor
    out_dtype: str
    shape: tuple[int, ...]
    weight: TensorRef
    scale: TensorRef
    block: tuple[int, int]
    activation: TensorRef | None = None  # a static activation scale: no meaning once dequantized (dropped)

    label = LABEL
    work_bytes = 4 + 4  # the fp32 values and the expanded row scales

    def rows(self, reader, ws, device) -> Callable[[int, int], torch.Tensor]:
        """Rows ``[r0, r1)`` dequantized to fp32: ``fp32(w) * scale_inv`` per block, edge blocks cropped."""
        import torch

        w = reader.tensor(self.weight)
        b0, b1 = self.block
        s = reader.tensor(self.scale).reshape(-(-self.shape[0] // b0), -(-self.shape[1] // b1))  # [] / [1]: [1, 1]
        cols = self.shape[1]
        full = cols // b1

        def rows(r0: int, r1: int) -> torch.Tensor:
            out = ws.take("f8", (r1 - r0, cols), torch.float32, device)
            out.copy_(w[r0:r1])  # fp8 -> fp32 is exact
            k0 = r0 // b0
            sc = s[k0 : (r1 - 1) // b0 + 1].to(device, torch.float32)
            srow = sc.repeat_interleave(b0, dim=0)[r0 - k0 * b0 :][: r1 - r0]
            if full:
                out[:, : full * b1].view(r1 - r0, full, b1).mul_(srow[:, :full, None])
            if cols % b1:
                out[:, full * b1 :].mul_(srow[:, full:])
            return out

        return rows


def dense_config_dtype(config: dict) -> str | None:
    """FP8 checkpoints declare their model dtype (DeepSeek: bfloat16); without one, bf16."""
    return config_dtype(config) or "BF16"


def _settings(ckpt: Checkpoint) -> tuple[tuple[int, int] | None, str]:
    qc = ckpt.config.get("quantization_config") or {}
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise QuantError(
            f"{ckpt.path}: quantization_config fmt {qc.get('fmt')!r} is not supported",
            hint="streammerge reads FP8 e4m3 block-scaled checkpoints (DeepSeek / transformers' FineGrainedFP8)",
        )
    block = qc.get("weight_block_size")
    if block is None:
        return None, fmt
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise QuantError(f"{ckpt.path}: weight_block_size must be two positive integers, found {block!r}")
    return (block[0], block[1]), fmt


def stray(names: Iterable[str], used: set[str]) -> list[str]:
    return [n for n in names if n not in used and n.endswith(".weight" + SCALE)]


def group(ckpt: Checkpoint, read_bytes: Callable[[TensorRef], bytes]) -> dict[str, Fp8Source]:
    t = ckpt.tensors
    f8 = [n for n, ref in t.items() if ref.dtype.startswith("F8_") and ref.dtype != "F8_E8M0"]
    if not f8:
        return {}
    block, _ = _settings(ckpt)
    out_dtype = dense_config_dtype(ckpt.config)
    found: dict[str, Fp8Source] = {}
    for name in f8:
        w = t[name]
        if w.dtype != "F8_E4M3":
            raise QuantError(f"{ckpt.path}: {name!r} is {w.dtype}; only F8_E4M3 weights are supported")
        if len(w.shape) != 2:
            raise QuantError(f"{ckpt.path}: FP8 tensor {name!r} {list(w.shape)}: only 2-D weights are supported")
        s = t.get(name + SCALE)
        if s is None:
            raise QuantError(
                f"{ckpt.path}: FP8 weight {name!r} has no {name + SCALE!r}",
                hint="without its scales the weight's values are meaningless (transformers would load it "
                "unscaled); the checkpoint is incomplete: a shard missing?",
            )
        module = name.rpartition(".")[0]
        act = next((t[module + a] for a in ACTIVATION_SCALES if module + a in t), None)
        found[name] = Fp8Source(name, "F32", out_dtype, w.shape, w, s, _block_of(ckpt, w, s, block), act)
        _check_scales(ckpt, s, read_bytes)
    return found


def _block_of(ckpt: Checkpoint, w: TensorRef, s: TensorRef, block: tuple[int, int] | None) -> tuple[int, int]:
    """The block the scale grid is made of: ``weight_block_size`` (or one block per tensor for a single
    scale); the grid must be ``[ceil(out/b0), ceil(in/b1)]``."""
    if s.dtype not in SCALE_DTYPES:
        raise QuantError(f"{ckpt.path}: {s.name!r} is {s.dtype}; FP8 scales must be F32 (or F8_E8M0)")
    out_f, in_f = w.shape
    if s.numel == 1 and block is None:
        return out_f, in_f
    b0, b1 = block or (128, 128)
    want = (-(-out_f // b0), -(-in_f // b1))
    if s.shape != want:
        raise QuantError(
            f"{ckpt.path}: {s.name!r} is {list(s.shape)}, but {w.name!r} {list(w.shape)} in blocks of "
            f"{[b0, b1]} needs scales {list(want)}",
            hint="weight_block_size in config.json does not match the stored scales",
        )
    return b0, b1


def _check_scales(ckpt: Checkpoint, s: TensorRef, read_bytes: Callable[[TensorRef], bytes]) -> None:
    """No NaN, Inf or negative scale (read with numpy: planning does not need torch)."""
    import numpy as np

    raw = read_bytes(s)
    if s.dtype == "F8_E8M0":  # a biased power-of-two exponent; 0xFF is NaN
        bad = b"\xff" in raw
    else:
        vals = np.frombuffer(raw, dtype=np.float32)
        bad = not bool(np.isfinite(vals).all()) or bool((vals < 0).any())
    if bad:
        raise QuantError(f"{ckpt.path}: {s.name!r} holds NaN, Inf or negative scales", hint="the checkpoint is corrupt")
