"""PEFT VB-LoRA adapters (peft_type VBLORA): one vector bank shared by the whole model
(``base_model.vblora_vector_bank`` [vectors, length]) and per layer the logits ``vblora_logits_A`` [r, in /
length, vectors] and ``vblora_logits_B`` [out / length, r, vectors], whose top-k softmax mixes the bank's
vectors into ``A`` and ``B``; PEFT's merge adds ``transpose?(B @ A)``. An adapter saved with
``save_only_topk_weights`` (for inference in PEFT only) is refused by name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import VectorBank
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import index, read_config, require

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>vblora_logits_A|vblora_logits_B)(?:\.[^.]+)?$")
BANK = "base_model.vblora_vector_bank"


@dataclass(frozen=True)
class VbloraModule:
    """The VB-LoRA logits of one wrapped layer and the model's vector bank."""

    module: str
    logits_a: TensorRef
    logits_b: TensorRef
    bank: TensorRef
    topk: int
    weight: float
    origin: str
    kind = "vblora"

    def parts(self) -> list[str]:
        return [self.logits_a.name, self.logits_b.name, self.bank.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        out_f, in_f = ((shape[1], shape[0]) if conv1d else shape) if len(shape) == 2 else (0, 0)
        vectors, length = self.bank.shape
        la, lb = self.logits_a.shape, self.logits_b.shape
        fits = len(la) == 3 and len(lb) == 3 and la[2] == lb[2] == vectors and la[0] == lb[1]
        if not fits or la[1] * length != in_f or lb[0] * length != out_f or not 0 < self.topk <= vectors:
            raise AdapterError(
                f"{where}: module {self.module!r}: {self.logits_a.name} {list(la)} and {self.logits_b.name} "
                f"{list(lb)} with the bank {list(self.bank.shape)} (topk {self.topk}) do not fit {weight!r} "
                f"{list(shape)}",
                hint="the adapter was trained on a different model",
            )
        upd = VectorBank(self.logits_a, self.logits_b, self.bank, self.topk, self.weight, conv1d, self.origin)
        return [(weight, upd)]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a VB-LoRA adapter directory: the vector bank, the logits per module, saved full layers."""
    where = adir / CONFIG_NAME
    cfg = read_config(adir, weight)
    if cfg.get("save_only_topk_weights"):
        raise AdapterError(
            f"{where}: save_only_topk_weights is set: the file keeps only each row's top-k logits, for "
            "inference in PEFT; it is not supported here",
            hint="save the adapter again with save_only_topk_weights=False",
        )
    topk = cfg.get("topk", 2)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise AdapterError(f"{where}: 'topk' must be a positive integer, found {topk!r}")
    ad, groups = index(adir, reader, cfg, weight, "VBLORA", _KEY, skip=(BANK,))
    bank = ad.tensors.get(BANK)
    if bank is None or len(bank.shape) != 2:
        raise AdapterError(f"{ad.weights_file}: the shared vector bank {BANK} [vectors, length] is missing")
    for module, parts in groups.items():
        la, lb = require(ad, module, parts, ("vblora_logits_A", "vblora_logits_B"))
        ad.others[module] = VbloraModule(module, la, lb, bank, topk, weight, ad.path)
    return ad
