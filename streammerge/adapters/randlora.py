"""PEFT RandLoRA adapters (peft_type RANDLORA): two random bases shared by the whole model
(``base_model.randlora_A`` [r, 1 or bases, min dim], ``base_model.randlora_B`` [max dim, bases, r], saved with
``save_projection``) and per layer the trainable scales ``randlora_lambda`` [r, bases] and
``randlora_gamma`` [bases, min]; PEFT's merge adds the full-rank combination of the scaled bases times
``randlora_alpha / r``. Saved without its bases (``save_projection: false``): refused by name."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import RandLora
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import index, read_config, require

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>randlora_lambda|randlora_gamma|randlora_A|randlora_B)(?:\.[^.]+)?$")
SHARED = ("base_model.randlora_A", "base_model.randlora_B")


@dataclass(frozen=True)
class RandLoraModule:
    """The RandLoRA scales of one wrapped layer and the model's shared bases."""

    module: str
    a: TensorRef
    b: TensorRef
    lam: TensorRef
    gamma: TensorRef
    scaling: float
    weight: float
    origin: str
    kind = "randlora"

    def parts(self) -> list[str]:
        return [self.lam.name, self.gamma.name, self.a.name, self.b.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        out_f, in_f = ((shape[1], shape[0]) if conv1d else shape) if len(shape) == 2 else (0, 0)
        r, _, lo = self.a.shape  # one base shared by all (second dimension 1) or one per base
        bases = self.b.shape[1]
        nb = self.lam.shape[1] if len(self.lam.shape) == 2 else 0
        fits = self.lam.shape == (r, nb) and self.gamma.shape == (nb, min(out_f, in_f)) and 0 < nb <= bases
        if not fits or lo < min(out_f, in_f) or self.b.shape[0] < max(out_f, in_f):
            raise AdapterError(
                f"{where}: module {self.module!r}: {self.lam.name} {list(self.lam.shape)} and {self.gamma.name} "
                f"{list(self.gamma.shape)} with the shared bases {list(self.a.shape)} / {list(self.b.shape)} do "
                f"not fit {weight!r} {list(shape)}",
                hint="the adapter was trained on a different model",
            )
        args = (out_f, in_f, self.scaling, self.weight, conv1d, self.origin)
        return [(weight, RandLora(self.a, self.b, self.lam, self.gamma, *args))]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a RandLoRA adapter directory: the shared bases, the scales per module, saved full layers."""
    where = adir / CONFIG_NAME
    cfg = read_config(adir, weight)
    if cfg.get("save_projection", True) is not True:
        raise AdapterError(
            f"{where}: save_projection is false: the shared randlora_A / randlora_B bases are not in the file",
            hint="save the adapter again with RandLoraConfig(save_projection=True) (PEFT's default)",
        )
    r, alpha = cfg.get("r"), cfg.get("randlora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{where}: 'r' must be a positive integer, found {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{where}: 'randlora_alpha' must be a finite number, found {alpha!r}")
    ad, groups = index(adir, reader, cfg, weight, "RANDLORA", _KEY, skip=SHARED)
    a, b = require(ad, "base_model", {k: ad.tensors[k] for k in SHARED if k in ad.tensors}, SHARED)
    if len(a.shape) != 3 or len(b.shape) != 3 or a.shape[0] != b.shape[2] or a.shape[1] not in (1, b.shape[1]):
        raise AdapterError(
            f"{ad.weights_file}: randlora_A {list(a.shape)} and randlora_B {list(b.shape)} do not pair up"
        )
    for module, parts in groups.items():
        for view, shared in (("randlora_A", a), ("randlora_B", b)):  # PEFT saves each module's view of the bases too
            ref = parts.pop(view, None)
            if ref is not None and ref.shape != shared.shape:
                raise AdapterError(
                    f"{ad.weights_file}: {ref.name} {list(ref.shape)} is not the shared {list(shared.shape)}"
                )
            if ref is not None:
                ad.superseded[ref.name] = shared.name
        lam, gamma = require(ad, module, parts, ("randlora_lambda", "randlora_gamma"))
        ad.others[module] = RandLoraModule(module, a, b, lam, gamma, alpha / r, weight, ad.path)
    return ad
