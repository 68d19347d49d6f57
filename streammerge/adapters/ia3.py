"""PEFT (IA)^3 adapters (peft_type IA3): one learned vector ``ia3_l`` per targeted layer that scales it,
on the input side for the modules named in ``feedforward_modules`` (``ia3_l`` [1, in]: the weight's
columns) and on the output side otherwise (``ia3_l`` [out, 1]: the weight's rows and the bias). PEFT's
merge is ``W * l`` in fp32 rounded once (transposed for GPT-2's ``Conv1D``, whose weight is [in, out]), and
``b * l`` for an output-side vector; ``modules_to_save`` layers replace the base's as for LoRA."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Scale
from ..updates import Update
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import floating, index, read_config

_IA3_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>ia3_l)(?:\.[^.]+)?$")


@dataclass(frozen=True)
class ScaleModule:
    """The (IA)^3 vector of one wrapped layer."""

    module: str
    vec: TensorRef
    feedforward: bool
    kind = "ia3"

    def parts(self) -> list[str]:
        return [self.vec.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias: tuple | None, where: str) -> list:
        """``(tensor, update)`` for the weight (and the bias of an output-side vector), checked against
        ``shape`` ([out, in], or [in, out] for a ``Conv1D``); ``bias``: (name, shape) or None."""
        if len(shape) != 2:
            raise AdapterError(f"{where}: {self.vec.name} targets {weight!r} {list(shape)}: IA3 needs a 2-D weight")
        out_f, in_f = (shape[1], shape[0]) if conv1d else shape
        want = (1, in_f) if self.feedforward else (out_f, 1)
        if tuple(self.vec.shape) != want:
            side = "input (feedforward_modules)" if self.feedforward else "output"
            raise AdapterError(
                f"{where}: {self.vec.name} {list(self.vec.shape)} does not fit {weight!r} {list(shape)}: an "
                f"{side}-side vector is {list(want)}",
                hint="the adapter was trained on a different model, or feedforward_modules does not belong to it",
            )
        rows = self.feedforward == conv1d  # input side of [in, out] or output side of [out, in]
        found: list[tuple[str, Update]] = [(weight, Scale(self.vec, rows, self.module))]
        if bias is not None and not self.feedforward:
            found.append((bias[0], Scale(self.vec, True, self.module)))
        return found


def _feedforward(spec, module: str) -> bool:
    """PEFT's test: a regex string matches the whole name; a list entry is a plain suffix of it."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module.endswith(key) for key in spec or ())


def _check_config(cfg: dict, where: Path) -> None:
    def strings(v) -> bool:
        return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))

    for key in ("target_modules", "feedforward_modules", "exclude_modules"):
        v = cfg.get(key)
        if v is not None and not strings(v):
            raise AdapterError(f"{where}: {key!r} must be a module name pattern or a list of names, found {v!r}")
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise AdapterError(f"{where}: {key!r} is not a valid regular expression ({e})") from None
    mts = cfg.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(x, str) for x in mts)):
        raise AdapterError(f"{where}: 'modules_to_save' must be a list of module names, found {mts!r}")
    if cfg.get("fan_in_fan_out") not in (None, True, False):
        raise AdapterError(f"{where}: 'fan_in_fan_out' must be true or false, found {cfg['fan_in_fan_out']!r}")


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index an IA3 adapter directory: its vectors per module and its saved full layers."""
    why = "an IA3 adapter cannot be merged with a weight: its vectors multiply the weights (no weighted sum)"
    cfg = read_config(adir, weight, fixed=why)
    _check_config(cfg, adir / CONFIG_NAME)
    ad, groups = index(adir, reader, cfg, 1.0, "IA3", _IA3_KEY)
    for module, parts in groups.items():
        floating(ad, parts["ia3_l"])
        ad.others[module] = ScaleModule(module, parts["ia3_l"], _feedforward(cfg.get("feedforward_modules"), module))
    return ad
