"""PEFT C3A adapters (peft_type C3A): per ``nn.Linear`` layer ``c3a_kernel`` [out / b, in / b, b], the
kernels of a block-circulant matrix; PEFT's merge adds ``circulant(kernel) / in``, the matrix built by FFTs
in fp32 and rounded to the weight's dtype before and after the division."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef, read_json
from ..tuner_updates import Circulant
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter, load_typed_weights, normalize, resolve_saved_layer, saved_layer

_KEY = re.compile(r"^(?P<module>.+?)\.c3a_kernel(?:\.[^.]+)?$")


@dataclass(frozen=True)
class C3aModule:
    """The C3A kernels of one wrapped layer."""

    module: str
    kernel: TensorRef
    weight: float
    origin: str
    kind = "c3a"

    def parts(self) -> list[str]:
        return [self.kernel.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        m, n, b = self.kernel.shape if len(self.kernel.shape) == 3 else (0, 0, 0)
        if len(shape) != 2 or conv1d or (m * b, n * b) != tuple(shape):
            raise AdapterError(
                f"{where}: {self.kernel.name} {list(self.kernel.shape)} does not fit {weight!r} {list(shape)} "
                "(an nn.Linear [out, in] = [m * b, n * b])",
                hint="the adapter was trained on a different model",
            )
        return [(weight, Circulant(self.kernel, shape[1], self.weight, self.origin))]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a C3A adapter directory: the kernels per module and the saved full layers."""
    where = adir / CONFIG_NAME
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise AdapterError(f"{adir}: adapter weight {weight!r} is not a finite number")
    cfg = read_json(where, CONFIG_NAME, AdapterError)
    wfile, refs = load_typed_weights(adir, reader, "C3A")
    ad = Adapter(str(adir), wfile, weight, cfg, tensors=refs)
    spellings: dict[str, dict[str, list[TensorRef]]] = {}
    for name, ref in refs.items():
        m = _KEY.match(normalize(name))
        if m is None:
            kind, target = saved_layer(normalize(name))
            spellings.setdefault(target, {}).setdefault(kind, []).append(ref)
        elif ref.dtype not in ("F16", "BF16", "F32", "F64"):
            raise AdapterError(f"{wfile}: {ref.name} has dtype {ref.dtype}; c3a_kernel is floating point")
        else:
            ad.others[m["module"]] = C3aModule(m["module"], ref, weight, ad.path)
    for target, kinds in spellings.items():
        resolve_saved_layer(ad, target, kinds)
    return ad
