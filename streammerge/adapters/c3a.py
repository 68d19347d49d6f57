"""PEFT C3A adapters (peft_type C3A): per ``nn.Linear`` layer ``c3a_kernel`` [out / b, in / b, b], the
kernels of a block-circulant matrix; PEFT's merge adds ``circulant(kernel) / in``, the matrix built by FFTs
in fp32 and rounded to the weight's dtype before and after the division."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Circulant
from .peft_lora import Adapter
from .typed import floating, index, read_config

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>c3a_kernel)(?:\.[^.]+)?$")


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
    cfg = read_config(adir, weight)
    ad, groups = index(adir, reader, cfg, weight, "C3A", _KEY)
    for module, parts in groups.items():
        floating(ad, parts["c3a_kernel"])
        ad.others[module] = C3aModule(module, parts["c3a_kernel"], weight, ad.path)
    return ad
