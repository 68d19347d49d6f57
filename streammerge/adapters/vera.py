"""PEFT VeRA adapters (peft_type VERA): two random projections shared by the whole model
(``base_model.vera_A`` [r, max in], ``base_model.vera_B`` [max out, r], saved with ``save_projection``) and per
layer two scaling vectors (``vera_lambda_b`` [out], ``vera_lambda_d`` [r]); PEFT's merge adds
``transpose?((lambda_b * B[:out]) @ (lambda_d * A[:, :in]))``. An adapter saved without its projections
(``save_projection: false``) would need PEFT's seeded initialisation regenerated: refused by name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import VeraDelta
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import index, read_config, require

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>vera_lambda_b|vera_lambda_d)(?:\.[^.]+)?$")
SHARED = ("base_model.vera_A", "base_model.vera_B")


@dataclass(frozen=True)
class VeraModule:
    """The VeRA scaling vectors of one wrapped layer and the model's shared projections."""

    module: str
    a: TensorRef
    b: TensorRef
    lambda_b: TensorRef
    lambda_d: TensorRef
    weight: float
    origin: str
    kind = "vera"

    def parts(self) -> list[str]:
        return [self.lambda_b.name, self.lambda_d.name, self.a.name, self.b.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        out_f, in_f = ((shape[1], shape[0]) if conv1d else shape) if len(shape) == 2 else (-1, -1)
        r = self.a.shape[0]
        fits = self.lambda_b.shape == (out_f,) and self.lambda_d.shape == (r,)
        if not fits or self.a.shape[1] < in_f or self.b.shape[0] < out_f or in_f < 0:
            raise AdapterError(
                f"{where}: module {self.module!r}: {self.lambda_b.name} {list(self.lambda_b.shape)}, "
                f"{self.lambda_d.name} {list(self.lambda_d.shape)} and the shared projections "
                f"{list(self.a.shape)} / {list(self.b.shape)} do not fit {weight!r} {list(shape)}",
                hint="the adapter was trained on a different model",
            )
        upd = VeraDelta(self.a, self.b, self.lambda_b, self.lambda_d, out_f, in_f, self.weight, conv1d, self.origin)
        return [(weight, upd)]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a VeRA adapter directory: the shared projections, the vectors per module, saved full layers."""
    cfg = read_config(adir, weight)
    if cfg.get("save_projection", True) is not True:
        raise AdapterError(
            f"{adir / CONFIG_NAME}: save_projection is false: the shared vera_A / vera_B projections are not in the "
            "file",
            hint="save the adapter again with VeraConfig(save_projection=True) (PEFT's default)",
        )
    ad, groups = index(adir, reader, cfg, weight, "VERA", _KEY, skip=SHARED)
    a, b = require(ad, "base_model", {k: ad.tensors[k] for k in SHARED if k in ad.tensors}, SHARED)
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"{ad.weights_file}: vera_A {list(a.shape)} and vera_B {list(b.shape)} must be [r, in] and [out, r]"
        )
    for module, parts in groups.items():
        lam_b, lam_d = require(ad, module, parts, ("vera_lambda_b", "vera_lambda_d"))
        ad.others[module] = VeraModule(module, a, b, lam_b, lam_d, weight, ad.path)
    return ad
