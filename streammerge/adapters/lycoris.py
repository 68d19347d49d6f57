"""PEFT's LyCORIS adapters: LoHa (peft_type LOHA: ``W += ((w1a @ w1b) * (w2a @ w2b)) * alpha / r``) and
LoKr (peft_type LOKR: ``W += kron(w1, w2) * alpha / r``, each factor stored whole or as a low-rank pair),
per module with ``rank_pattern`` / ``alpha_pattern``, on ``nn.Linear`` layers (PEFT builds them on no other
layer a language model checkpoint holds as a 2-D weight). The conv-only CP factors (``hada_t1``,
``lokr_t2``) are refused. ``modules_to_save`` layers replace the base's, as for LoRA."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Hadamard, Kron
from .lora_config import CONFIG_NAME, check_numbers
from .peft_lora import Adapter
from .typed import index, read_config, require

PARTS = {
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}


@dataclass(frozen=True)
class FactorModule:
    """The LoHa or LoKr factors of one wrapped layer."""

    module: str
    kind: str  # "loha" | "lokr"
    parts_: tuple[tuple[str, TensorRef], ...]
    r: int
    alpha: float
    scaling: float
    weight: float
    origin: str

    def parts(self) -> list[str]:
        return [t.name for _, t in self.parts_]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        if len(shape) != 2 or conv1d:
            raise AdapterError(f"{where}: {self.module!r}: {self.kind} needs an nn.Linear weight, found {weight!r}")
        p = dict(self.parts_)
        if self.kind == "loha":
            return [(weight, self._hadamard(p, shape, where))]
        return [(weight, self._kron(p, shape, where))]

    def _hadamard(self, p: dict, shape, where: str) -> Hadamard:
        out_f, in_f = shape
        want = {"hada_w1_a": (out_f, self.r), "hada_w1_b": (self.r, in_f)}
        want |= {"hada_w2_a": (out_f, self.r), "hada_w2_b": (self.r, in_f)}
        bad = [f"{p[k].name} {list(p[k].shape)} != {list(v)}" for k, v in want.items() if tuple(p[k].shape) != v]
        if bad:
            raise _misfit(where, self.module, shape, self.r, bad)
        return Hadamard(*(p[k] for k in want), self.scaling, self.weight, self.origin)

    def _kron(self, p: dict, shape, where: str) -> Kron:
        w1 = (p["lokr_w1"],) if "lokr_w1" in p else (p["lokr_w1_a"], p["lokr_w1_b"])
        w2 = (p["lokr_w2"],) if "lokr_w2" in p else (p["lokr_w2_a"], p["lokr_w2_b"])
        (a, b), (c, d) = _factor_shape(w1), _factor_shape(w2)
        pairs_fit = all(len(f) == 1 or f[0].shape[1] == f[1].shape[0] for f in (w1, w2))
        if not pairs_fit or (a * c, b * d) != tuple(shape):
            shapes = [f"{t.name} {list(t.shape)}" for t in (*w1, *w2)]
            raise _misfit(where, self.module, shape, self.r, [f"kron gives [{a * c}, {b * d}]: {', '.join(shapes)}"])
        return Kron(w1, w2, c, self.scaling, self.weight, self.origin)


def _factor_shape(f: tuple[TensorRef, ...]) -> tuple[int, int]:
    return (f[0].shape[0], f[0].shape[1]) if len(f) == 1 else (f[0].shape[0], f[1].shape[1])


def _misfit(where: str, module: str, shape, r: int, bad: list[str]) -> AdapterError:
    return AdapterError(
        f"{where}: module {module!r} does not fit its base weight {list(shape)} with r={r}",
        details=bad,
        hint="the adapter was trained on a different model, or r / rank_pattern do not belong to it",
    )


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a LoHa or LoKr adapter directory: its factors per module and its saved full layers."""
    cfg = read_config(adir, weight)
    ptype = str(cfg.get("peft_type", "")).upper()
    check_numbers(cfg, adir / CONFIG_NAME)
    key = re.compile(rf"^(?P<module>.+?)\.(?P<part>{'|'.join(PARTS[ptype])})(?:\.[^.]+)?$")
    ad, groups = index(adir, reader, cfg, weight, ptype, key)
    for module, parts in groups.items():
        ad.others[module] = _module(ad, ptype, module, parts)
    return ad


def _module(ad: Adapter, ptype: str, module: str, parts: dict[str, TensorRef]) -> FactorModule:
    wfile = ad.weights_file
    if {"hada_t1", "hada_t2", "lokr_t2"} & set(parts):
        raise AdapterError(f"{wfile}: module {module!r} has CP-decomposed (conv) factors, which a linear layer lacks")
    need = [("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")] if ptype == "LOHA" else []
    if ptype == "LOKR":
        need = [("lokr_w1",) if "lokr_w1" in parts else ("lokr_w1_a", "lokr_w1_b")]
        need.append(("lokr_w2",) if "lokr_w2" in parts else ("lokr_w2_a", "lokr_w2_b"))
    require(ad, module, parts, [k for group in need for k in group])
    for t in parts.values():
        if t.dtype not in ("F16", "BF16", "F32", "F64") or len(t.shape) != 2:
            raise AdapterError(f"{wfile}: {t.name} {t.dtype} {list(t.shape)}: factors must be 2-D floating point")
    r, alpha, scaling = ad.rank_alpha(module)  # alpha / r (LyCORIS configs have no use_rslora)
    chosen = tuple((k, parts[k]) for group in need for k in group)
    return FactorModule(module, ptype.lower(), chosen, r, alpha, scaling, ad.weight, ad.path)
