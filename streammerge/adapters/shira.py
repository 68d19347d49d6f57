"""PEFT SHiRA adapters (peft_type SHIRA): a sparse high-rank update per layer, ``shira_indices`` [2, n]
(row, column) and ``shira_weight`` [n]; PEFT's merge adds the sparse tensor (scaled by 1.0, its saved
scale) to the dense weight, on ``nn.Linear`` layers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Sparse
from .peft_lora import Adapter
from .typed import index, read_config, require

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>shira_indices|shira_weight)(?:\.[^.]+)?$")
_INTS = ("I8", "I16", "I32", "I64", "U8")


@dataclass(frozen=True)
class SparseModule:
    """The SHiRA entries of one wrapped layer."""

    module: str
    indices: TensorRef
    values: TensorRef
    weight: float
    origin: str
    kind = "shira"

    def parts(self) -> list[str]:
        return [self.indices.name, self.values.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        if len(shape) != 2 or conv1d:
            raise AdapterError(f"{where}: {self.module!r}: SHiRA needs an nn.Linear weight, found {weight!r}")
        n = self.values.shape[0] if len(self.values.shape) == 1 else -1
        if tuple(self.indices.shape) != (2, n) or n * 2 >= 1 << 24:
            raise AdapterError(
                f"{where}: {self.indices.name} {list(self.indices.shape)} and {self.values.name} "
                f"{list(self.values.shape)} must be [2, n] and [n] (n below 2^23)",
            )
        return [(weight, Sparse(self.indices, self.values, 1.0, self.weight, self.origin))]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a SHiRA adapter directory: the sparse entries per module and the saved full layers."""
    cfg = read_config(adir, weight)
    ad, groups = index(adir, reader, cfg, weight, "SHIRA", _KEY)
    for module, parts in groups.items():
        indices, values = require(ad, module, parts, ("shira_indices", "shira_weight"))
        if indices.dtype not in _INTS or values.dtype not in ("F16", "BF16", "F32"):
            raise AdapterError(
                f"{ad.weights_file}: module {module!r}: shira_indices must be integers, shira_weight floats"
            )
        ad.others[module] = SparseModule(module, indices, values, weight, ad.path)
    return ad
