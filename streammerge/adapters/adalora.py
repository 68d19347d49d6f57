"""PEFT AdaLoRA adapters (peft_type ADALORA): SVD-shaped LoRA (``lora_A`` [r, in], ``lora_E`` [r, 1] the
singular values, ``lora_B`` [out, r]) whose per-module ranks the training pruned; the saved config's
``rank_pattern`` holds each pruned module's mask and the saved tensors hold its kept rows. PEFT's merge:
``W += transpose?(B @ (A * E)) * scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha`` (the module's
rank when ``lora_alpha`` is 0) and ``ranknum = init_r`` (the rank before pruning), in fp32, rounded once;
``fan_in_fan_out`` on GPT-2's ``Conv1D`` only, as for LoRA. PEFT's loader rebuilds each pruned module,
which rounds its factors to the model's 16-bit dtype (its merged and unmerged models both use the rounded
factors): the merge here does the same."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import SvdDelta
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import floating, index, read_config, require

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_E)(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")


@dataclass(frozen=True)
class SvdModule:
    """The AdaLoRA factors of one wrapped layer."""

    module: str
    a: TensorRef
    b: TensorRef
    e: TensorRef
    scaling: float
    ranknum: float
    weight: float
    resized: bool  # in rank_pattern: PEFT rebuilds it at load, rounding its factors to the model's dtype
    origin: str
    kind = "adalora"

    def parts(self) -> list[str]:
        return [self.a.name, self.b.name, self.e.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        out_f, in_f = ((shape[1], shape[0]) if conv1d else shape) if len(shape) == 2 else (-1, -1)
        if self.a.shape[1] != in_f or self.b.shape[0] != out_f:
            raise AdapterError(
                f"{where}: module {self.module!r}: {self.a.name} {list(self.a.shape)} and {self.b.name} "
                f"{list(self.b.shape)} do not fit {weight!r} {list(shape)}",
                hint="the adapter was trained on a different model",
            )
        args = (self.scaling, self.ranknum, self.weight, conv1d, self.resized, self.origin)
        upd = SvdDelta(self.a, self.b, self.e, *args)
        return [(weight, upd)]


def _number(cfg: dict, key: str, where: Path, minimum: float) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum:
        raise AdapterError(f"{where}: {key!r} must be a finite number >= {minimum:g}, found {v!r}")
    return v


def _masks(cfg: dict, where: Path) -> dict[str, int]:
    """``rank_pattern``: module -> kept rank (the mask's true entries), keyed by module name."""
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterError(f"{where}: 'rank_pattern' must map modules to rank masks, found {pattern!r}")
    kept = {}
    for name, mask in pattern.items():
        if not (isinstance(mask, list) and all(isinstance(x, bool) for x in mask)):
            raise AdapterError(f"{where}: 'rank_pattern' entry {name!r} must be a list of true/false, found {mask!r}")
        kept[re.sub(r"\.lora_E(\.[^.]+)?$", "", name)] = sum(mask)
    return kept


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index an AdaLoRA adapter directory: its factors per module and its saved full layers."""
    where = adir / CONFIG_NAME
    cfg = read_config(adir, weight)
    init_r = _number(cfg, "init_r", where, 1)
    alpha = _number(cfg, "lora_alpha", where, 0)
    for key in ("use_dora", "use_rslora"):
        if cfg.get(key):
            raise AdapterError(f"{where}: {key} is set, which AdaLoRA does not have (PEFT refuses it too)")
    kept = _masks(cfg, where)
    ad, groups = index(adir, reader, cfg, weight, "ADALORA", _KEY, lora_keys=True)
    for module, parts in groups.items():
        ad.others[module] = _module(ad, module, parts, init_r, alpha, kept.get(module))
    return ad


def _module(ad: Adapter, module: str, parts: dict, init_r: float, alpha: float, kept: int | None) -> SvdModule:
    wfile = ad.weights_file
    a, b, e = require(ad, module, parts, ("lora_A", "lora_B", "lora_E"))
    r = a.shape[0] if len(a.shape) == 2 else -1
    fits = len(b.shape) == 2 and b.shape[1] == r and tuple(e.shape) == (r, 1)
    if not fits or r != (init_r if kept is None else kept):
        want = f"the rank_pattern mask's {kept}" if kept is not None else f"init_r={init_r:g}"
        raise AdapterError(
            f"{wfile}: module {module!r}: {a.name} {list(a.shape)}, {b.name} {list(b.shape)}, {e.name} "
            f"{list(e.shape)} do not have {want} (lora_A [r, in], lora_B [out, r], lora_E [r, 1])",
            hint="the config does not belong to these weights",
        )
    floating(ad, a, b, e)
    scaling = alpha if alpha > 0 else float(r if kept is not None else init_r)
    return SvdModule(module, a, b, e, scaling, float(init_r), ad.weight, kept is not None, ad.path)
