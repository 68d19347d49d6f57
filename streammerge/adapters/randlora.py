"""PEFT RandLoRA adapters (peft_type RANDLORA): two random bases shared by the whole model
(``base_model.randlora_A`` [r, 1 or bases, min dim], ``base_model.randlora_B`` [max dim, bases, r], saved with
``save_projection``) and per layer the trainable scales ``randlora_lambda`` [r, bases] and
``randlora_gamma`` [bases, min]; PEFT's merge adds the full-rank combination of the scaled bases times
``randlora_alpha / r``. Saved without its bases (``save_projection: false``): refused by name."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef, read_json
from ..tuner_updates import RandLora
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter, load_typed_weights, normalize, resolve_saved_layer, saved_layer

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>randlora_lambda|randlora_gamma|randlora_A|randlora_B)(?:\.[^.]+)?$")
SHARED = ("base_model.randlora_A", "base_model.randlora_B")


@dataclass(frozen=True)
class RandLoraModule:
    """The RandLoRA scales of one wrapped layer and the model's shared bases."""

    module: str
    a: TensorRef
    b: TensorRef
    lam: TensorRef
    gamma: TensorRef
    scaling: float
    weight: float
    origin: str
    kind = "randlora"

    def parts(self) -> list[str]:
        return [self.lam.name, self.gamma.name, self.a.name, self.b.name]

    def updates(self, weight: str, shape: tuple[int, ...], conv1d: bool, bias, where: str) -> list:
        out_f, in_f = ((shape[1], shape[0]) if conv1d else shape) if len(shape) == 2 else (0, 0)
        r, _, lo = self.a.shape  # one base shared by all (second dimension 1) or one per base
        bases = self.b.shape[1]
        nb = self.lam.shape[1] if len(self.lam.shape) == 2 else 0
        fits = self.lam.shape == (r, nb) and self.gamma.shape == (nb, min(out_f, in_f)) and 0 < nb <= bases
        if not fits or lo < min(out_f, in_f) or self.b.shape[0] < max(out_f, in_f):
            raise AdapterError(
                f"{where}: module {self.module!r}: {self.lam.name} {list(self.lam.shape)} and {self.gamma.name} "
                f"{list(self.gamma.shape)} with the shared bases {list(self.a.shape)} / {list(self.b.shape)} do "
                f"not fit {weight!r} {list(shape)}",
                hint="the adapter was trained on a different model",
            )
        args = (out_f, in_f, self.scaling, self.weight, conv1d, self.origin)
        return [(weight, RandLora(self.a, self.b, self.lam, self.gamma, *args))]


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index a RandLoRA adapter directory: the shared bases, the scales per module, saved full layers."""
    where = adir / CONFIG_NAME
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise AdapterError(f"{adir}: adapter weight {weight!r} is not a finite number")
    cfg = read_json(where, CONFIG_NAME, AdapterError)
    if cfg.get("save_projection", True) is not True:
        raise AdapterError(
            f"{where}: save_projection is false: the shared randlora_A / randlora_B bases are not in the file",
            hint="save the adapter again with RandLoraConfig(save_projection=True) (PEFT's default)",
        )
    r, alpha = cfg.get("r"), cfg.get("randlora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{where}: 'r' must be a positive integer, found {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{where}: 'randlora_alpha' must be a finite number, found {alpha!r}")
    wfile, refs = load_typed_weights(adir, reader, "RANDLORA")
    if any(refs.get(k) is None for k in SHARED):
        raise AdapterError(f"{wfile}: the shared bases {', '.join(SHARED)} are missing")
    a, b = (refs[k] for k in SHARED)
    if len(a.shape) != 3 or len(b.shape) != 3 or a.shape[0] != b.shape[2] or a.shape[1] not in (1, b.shape[1]):
        raise AdapterError(f"{wfile}: randlora_A {list(a.shape)} and randlora_B {list(b.shape)} do not pair up")
    ad = Adapter(str(adir), wfile, weight, cfg, tensors=refs)
    groups: dict[str, dict[str, TensorRef]] = {}
    spellings: dict[str, dict[str, list[TensorRef]]] = {}
    for name, ref in refs.items():
        m = _KEY.match(normalize(name))
        if name in SHARED:
            continue
        if m is None:
            kind, target = saved_layer(normalize(name))
            spellings.setdefault(target, {}).setdefault(kind, []).append(ref)
        elif m["part"] in ("randlora_A", "randlora_B"):  # PEFT saves each module's view of the shared bases too
            shared = refs[f"base_model.{m['part']}"]
            if ref.shape != shared.shape:
                raise AdapterError(f"{wfile}: {name} {list(ref.shape)} is not the shared {list(shared.shape)}")
            ad.superseded[name] = shared.name
        else:
            groups.setdefault(m["module"], {})[m["part"]] = ref
    for target, kinds in spellings.items():
        resolve_saved_layer(ad, target, kinds)
    for module, parts in groups.items():
        if set(parts) != {"randlora_lambda", "randlora_gamma"}:
            raise AdapterError(f"{wfile}: module {module!r} lacks one of randlora_lambda / randlora_gamma")
        lam, gamma = parts["randlora_lambda"], parts["randlora_gamma"]
        ad.others[module] = RandLoraModule(module, a, b, lam, gamma, alpha / r, weight, ad.path)
    return ad
