"""PEFT FourierFT adapters (peft_type FOURIERFT): per layer a spectrum ``fourierft_spectrum`` [n] at ``n``
frequencies that PEFT draws with ``torch.randperm`` seeded by the config's ``random_loc_seed``; PEFT's
merge adds ``Re(ifft2(dense spectrum)) * scaling`` (transposed on GPT-2's ``Conv1D``). ``n`` per module
from ``n_frequency`` / ``n_frequency_pattern``, checked against the saved spectrum."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef
from ..tuner_updates import Fourier
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter
from .typed import index, read_config

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>fourierft_spectrum)(?:\.[^.]+)?$")


@dataclass(frozen=True)
class FourierModule:
    """The FourierFT spectrum of one wrapped layer."""

    module: str
    spectrum: TensorRef
    seed: int
    scaling: float
    weight: float
    origin: str
    kind = "fourierft"

    def parts(self) -> list[str]:
        return [self.spectrum.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        if len(shape) != 2 or self.spectrum.shape[0] > shape[0] * shape[1]:
            raise AdapterError(f"{where}: {self.spectrum.name} does not fit {weight!r} {list(shape)}")
        out_f, in_f = (shape[1], shape[0]) if conv1d else shape
        upd = Fourier(self.spectrum, out_f, in_f, self.seed, self.scaling, self.weight, conv1d, self.origin)
        return [(weight, upd)]


def _n_frequency(cfg: dict, module: str) -> int:
    """PEFT's lookup: the first ``n_frequency_pattern`` key that ends the module name, else ``n_frequency``."""
    for key, value in (cfg.get("n_frequency_pattern") or {}).items():
        if re.match(rf".*\.{key}$", module):
            return value
    return cfg.get("n_frequency", 1000)


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a FourierFT adapter directory: the spectra per module and the saved full layers."""
    where = adir / CONFIG_NAME
    cfg = read_config(adir, weight)
    seed, scaling = cfg.get("random_loc_seed", 777), cfg.get("scaling", 150.0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AdapterError(f"{where}: 'random_loc_seed' must be an integer, found {seed!r}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise AdapterError(f"{where}: 'scaling' must be a finite number, found {scaling!r}")
    ad, groups = index(adir, reader, cfg, weight, "FOURIERFT", _KEY)
    for module, parts in groups.items():
        ref, n = parts["fourierft_spectrum"], _n_frequency(cfg, module)
        if tuple(ref.shape) != (n,) or ref.dtype not in ("F16", "BF16", "F32", "F64"):
            raise AdapterError(
                f"{ad.weights_file}: {ref.name} {ref.dtype} {list(ref.shape)} is not the [{n}] float spectrum the "
                "config's n_frequency / n_frequency_pattern give this module",
                hint="the config does not belong to these weights",
            )
        ad.others[module] = FourierModule(module, ref, seed, scaling, weight, ad.path)
    return ad
