"""PEFT HRA adapters (peft_type HRA): per ``nn.Linear`` layer ``hra_u`` [in, r], whose columns define
Householder reflections; PEFT's merge rotates the weight from the input side, ``W @ H`` with ``H`` their
product (or ``I - 2 U U^T`` of the orthonormalised columns with ``apply_GS``), in fp32, rounded once."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef, read_json
from ..tuner_updates import Rotate
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter, load_typed_weights, normalize, resolve_saved_layer, saved_layer

_KEY = re.compile(r"^(?P<module>.+?)\.hra_u(?:\.[^.]+)?$")


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
    where = adir / CONFIG_NAME
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight != 1:
        raise AdapterError(
            f"{adir}: an HRA adapter cannot be merged with a weight ({weight!r}): it rotates the weights",
            hint="pass the adapter without :WEIGHT",
        )
    cfg = read_json(where, CONFIG_NAME, AdapterError)
    gs = cfg.get("apply_GS", False)
    if not isinstance(gs, bool):
        raise AdapterError(f"{where}: 'apply_GS' must be true or false, found {gs!r}")
    wfile, refs = load_typed_weights(adir, reader, "HRA")
    ad = Adapter(str(adir), wfile, 1.0, cfg, tensors=refs)
    spellings: dict[str, dict[str, list[TensorRef]]] = {}
    for name, ref in refs.items():
        m = _KEY.match(normalize(name))
        if m is None:
            kind, target = saved_layer(normalize(name))
            spellings.setdefault(target, {}).setdefault(kind, []).append(ref)
        else:
            if ref.dtype not in ("F16", "BF16", "F32", "F64"):
                raise AdapterError(f"{wfile}: {ref.name} has dtype {ref.dtype}; hra_u is floating point")
            ad.others[m["module"]] = HraModule(m["module"], ref, gs, ad.path)
    for target, kinds in spellings.items():
        resolve_saved_layer(ad, target, kinds)
    return ad
