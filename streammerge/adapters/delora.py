"""PEFT DeLoRA adapters (peft_type DELORA): a low-rank update whose scale is bounded, per layer
``delora_A`` [r, in], ``delora_B`` [out, r], ``delora_lambda`` [1] and the base's input-channel norms
``delora_w_norm`` [in] saved with it; PEFT's merge adds ``(B @ diag(lambda / r / (|A_i| |B^i|)) @ A) *
w_norm``, rounded to the weight's dtype first, on ``nn.Linear`` layers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Delora
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter, _pattern_value
from .typed import index, read_config, require

PARTS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
_KEY = re.compile(rf"^(?P<module>.+?)\.(?P<part>{'|'.join(PARTS)})(?:\.[^.]+)?$")


@dataclass(frozen=True)
class DeloraModule:
    """The DeLoRA tensors of one wrapped layer."""

    module: str
    a: TensorRef
    b: TensorRef
    lam: TensorRef
    w_norm: TensorRef
    r: int
    weight: float
    origin: str
    kind = "delora"

    def parts(self) -> list[str]:
        return [self.a.name, self.b.name, self.lam.name, self.w_norm.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        out_f, in_f = shape if len(shape) == 2 and not conv1d else (-1, -1)
        want = {self.a: (self.r, in_f), self.b: (out_f, self.r), self.lam: (1,), self.w_norm: (in_f,)}
        bad = [f"{t.name} {list(t.shape)} != {list(s)}" for t, s in want.items() if tuple(t.shape) != s]
        if bad or out_f < 0:
            raise AdapterError(
                f"{where}: module {self.module!r} does not fit {weight!r} {list(shape)} (an nn.Linear, r={self.r})",
                details=bad,
                hint="the adapter was trained on a different model, or r / rank_pattern do not belong to it",
            )
        return [(weight, Delora(self.a, self.b, self.lam, self.w_norm, self.r, self.weight, self.origin))]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a DeLoRA adapter directory: its tensors per module and the saved full layers."""
    cfg = read_config(adir, weight)
    r0 = cfg.get("r")
    if isinstance(r0, bool) or not isinstance(r0, int) or r0 <= 0:
        raise AdapterError(f"{adir / CONFIG_NAME}: 'r' must be a positive integer, found {r0!r}")
    ad, groups = index(adir, reader, cfg, weight, "DELORA", _KEY)
    for module, parts in groups.items():
        a, b, lam, w_norm = require(ad, module, parts, PARTS)
        r = a.shape[0] if len(a.shape) == 2 else -1
        want = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r0))
        if r != want:
            raise AdapterError(f"{ad.weights_file}: module {module!r}: delora_A has rank {r}, the config says {want}")
        ad.others[module] = DeloraModule(module, a, b, lam, w_norm, r, weight, ad.path)
    return ad
