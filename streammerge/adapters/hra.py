"""PEFT HRA adapters (peft_type HRA): per ``nn.Linear`` layer ``hra_u`` [in, r], whose columns define
Householder reflections; PEFT's merge rotates the weight from the input side, ``W @ H`` with ``H`` their
product (or ``I - 2 U U^T`` of the orthonormalised columns with ``apply_GS``), in fp32, rounded once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Rotate
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import floating, index, read_config

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>hra_u)(?:\.[^.]+)?$")


@dataclass(frozen=True)
class HraModule:
    """The HRA reflections of one wrapped layer."""

    module: str
    u: TensorRef
    gram_schmidt: bool
    origin: str
    kind = "hra"

    def parts(self) -> list[str]:
        return [self.u.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        if len(shape) != 2 or conv1d or len(self.u.shape) != 2 or self.u.shape[0] != shape[1]:
            raise AdapterError(
                f"{where}: {self.u.name} {list(self.u.shape)} does not fit {weight!r} {list(shape)} "
                "(an nn.Linear weight [out, in] and hra_u [in, r])",
                hint="the adapter was trained on a different model",
            )
        return [(weight, Rotate(self.u, self.gram_schmidt, self.origin))]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index an HRA adapter directory: the reflections per module and the saved full layers."""
    cfg = read_config(adir, weight, fixed="an HRA adapter cannot be merged with a weight: it rotates the weights")
    gs = cfg.get("apply_GS", False)
    if not isinstance(gs, bool):
        raise AdapterError(f"{adir / CONFIG_NAME}: 'apply_GS' must be true or false, found {gs!r}")
    ad, groups = index(adir, reader, cfg, 1.0, "HRA", _KEY)
    for module, parts in groups.items():
        floating(ad, parts["hra_u"])
        ad.others[module] = HraModule(module, parts["hra_u"], gs, ad.path)
    return ad
