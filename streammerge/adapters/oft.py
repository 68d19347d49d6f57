"""PEFT OFT adapters (peft_type OFT): per ``nn.Linear`` layer ``oft_R.weight`` [r, b (b - 1) / 2], the
packed skew-symmetric blocks of a block-diagonal rotation of the input side (one shared block with
``block_share``); PEFT's merge ``W = (R @ W^T)^T``, ``R`` the Cayley transform of each block (a Neumann
series of ``num_cayley_neumann_terms`` terms, or exact), after COFT's projection with ``coft``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Orthogonal
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import floating, index, read_config

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>oft_R)(?:\.(?!weight$)[^.]+)?\.weight$")


@dataclass(frozen=True)
class OftModule:
    """The OFT rotation blocks of one wrapped layer."""

    module: str
    vec: TensorRef
    config: tuple  # (block_share, neumann, terms, coft, eps)
    origin: str
    kind = "oft"

    def parts(self) -> list[str]:
        return [self.vec.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        share, neumann, terms, coft, eps = self.config
        n, packed = self.vec.shape if len(self.vec.shape) == 2 else (0, 0)
        b = int((1 + math.isqrt(1 + 8 * packed)) // 2)
        in_f = shape[1] if len(shape) == 2 and not conv1d else -1
        blocks = in_f // b if b > 1 else 0
        if b * (b - 1) // 2 != packed or blocks * b != in_f or (n != 1 if share else n != blocks):
            raise AdapterError(
                f"{where}: {self.vec.name} {list(self.vec.shape)} does not fit {weight!r} {list(shape)} "
                f"(an nn.Linear whose input splits into blocks of the packed size{', shared' if share else ''})",
                hint="the adapter was trained on a different model",
            )
        return [(weight, Orthogonal(self.vec, b, blocks, neumann, terms, coft, eps, self.origin))]


def _options(cfg: dict, where: Path) -> tuple:
    share, neumann, coft = (
        cfg.get(k, d) for k, d in (("block_share", False), ("use_cayley_neumann", True), ("coft", False))
    )
    terms, eps = cfg.get("num_cayley_neumann_terms", 5), cfg.get("eps", 6e-5)
    if not all(isinstance(x, bool) for x in (share, neumann, coft)):
        raise AdapterError(f"{where}: block_share, use_cayley_neumann and coft must be true or false")
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise AdapterError(f"{where}: 'num_cayley_neumann_terms' must be a positive integer, found {terms!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise AdapterError(f"{where}: 'eps' must be a finite number >= 0, found {eps!r}")
    return share, neumann, terms, coft, float(eps)


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index an OFT adapter directory: the rotation blocks per module and the saved full layers."""
    cfg = read_config(adir, weight, fixed="an OFT adapter cannot be merged with a weight: it rotates the weights")
    options = _options(cfg, adir / CONFIG_NAME)
    ad, groups = index(adir, reader, cfg, 1.0, "OFT", _KEY)
    for module, parts in groups.items():
        floating(ad, parts["oft_R"])
        ad.others[module] = OftModule(module, parts["oft_R"], options, ad.path)
    return ad
