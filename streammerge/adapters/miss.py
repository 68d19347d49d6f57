"""PEFT MiSS adapters (peft_type MISS): per ``nn.Linear`` layer ``miss_block`` [r, out] (``init_weights:
"mini"``: [r, mini_r], repeated along the outputs), tiled across the weight's input columns and added:
``W[o, c] += block[c % r, o]``, in fp32, rounded once, as PEFT's merge. The ``bat`` form, whose update
multiplies blocks of the weight itself, is refused by name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Tiled
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import floating, index, read_config

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>miss_block)(?:\.[^.]+)?$")


@dataclass(frozen=True)
class MissModule:
    """The MiSS block of one wrapped layer."""

    module: str
    block: TensorRef
    mini_r: int | None
    weight: float
    origin: str
    kind = "miss"

    def parts(self) -> list[str]:
        return [self.block.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        out_f, in_f = shape if len(shape) == 2 and not conv1d else (-1, -1)
        r, cols = self.block.shape if len(self.block.shape) == 2 else (0, 0)
        width = self.mini_r if self.mini_r is not None else out_f
        if out_f < 0 or cols != width or not 0 < r <= in_f or (self.mini_r and out_f % self.mini_r):
            raise AdapterError(
                f"{where}: {self.block.name} {list(self.block.shape)} does not fit {weight!r} {list(shape)} "
                f"(an nn.Linear; the block is [r, {'mini_r' if self.mini_r else 'out'}])",
                hint="the adapter was trained on a different model",
            )
        return [(weight, Tiled(self.block, out_f, self.mini_r, self.weight, self.origin))]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a MiSS adapter directory: the blocks per module and the saved full layers."""
    where = adir / CONFIG_NAME
    cfg = read_config(adir, weight)
    form = cfg.get("init_weights", True)
    if form == "bat":
        raise AdapterError(
            f"{where}: init_weights 'bat': MiSS's bat form multiplies blocks of the weight itself; it is not "
            "supported yet",
            hint="merge it with PEFT's merge_and_unload",
        )
    mini_r = cfg.get("mini_r") if form == "mini" else None
    if form == "mini" and (isinstance(mini_r, bool) or not isinstance(mini_r, int) or mini_r <= 0):
        raise AdapterError(f"{where}: init_weights 'mini' needs a positive integer 'mini_r', found {mini_r!r}")
    ad, groups = index(adir, reader, cfg, weight, "MISS", _KEY)
    for module, parts in groups.items():
        floating(ad, parts["miss_block"])
        ad.others[module] = MissModule(module, parts["miss_block"], mini_r, weight, ad.path)
    return ad
