"""What the loaders of PEFT's other tuner types share: the ``:WEIGHT`` check, and indexing the file into
each module's tensors (by the type's key pattern, whose ``module`` and ``part`` groups name them) and the
saved full layers (``modules_to_save``), resolved as for LoRA."""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, TensorRef, read_json
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter, load_typed_weights, load_weights, normalize, resolve_saved_layer, saved_layer


def read_config(adir: Path, weight, fixed: str | None = None) -> dict:
    """The adapter's config, once ``weight`` is checked: a finite number, and 1 when ``fixed`` says why a
    weighted merge has no meaning for this type."""
    finite = not isinstance(weight, bool) and isinstance(weight, (int, float)) and math.isfinite(weight)
    if fixed is not None and (not finite or weight != 1):
        raise AdapterError(f"{adir}: {fixed} ({weight!r})", hint="pass the adapter without :WEIGHT")
    if not finite:
        raise AdapterError(f"{adir}: adapter weight {weight!r} is not a finite number")
    return read_json(adir / CONFIG_NAME, CONFIG_NAME, AdapterError)


def index(
    adir: Path, reader: Reader, cfg: dict, weight: float, ptype: str, key: re.Pattern, skip=(), lora_keys: bool = False
) -> tuple[Adapter, dict[str, dict[str, TensorRef]]]:
    """The adapter and its tensors grouped per module (``{module: {part: tensor}}``); every other key is a
    saved full layer. ``skip``: keys the type reads itself (shared tensors); ``lora_keys``: the type's own
    keys look like LoRA's (AdaLoRA)."""
    wfile, refs = load_weights(adir, reader) if lora_keys else load_typed_weights(adir, reader, ptype)
    if not refs:
        raise AdapterError(f"{wfile}: holds no tensors")
    ad = Adapter(str(adir), wfile, weight, cfg, tensors=refs)
    groups: dict[str, dict[str, TensorRef]] = {}
    spellings: dict[str, dict[str, list[TensorRef]]] = {}
    for name, ref in refs.items():
        if name in skip:
            continue
        m = key.match(normalize(name))
        if m is None:
            kind, target = saved_layer(normalize(name))
            spellings.setdefault(target, {}).setdefault(kind, []).append(ref)
            continue
        slot = groups.setdefault(m["module"], {})
        if m["part"] in slot:
            raise AdapterError(
                f"{wfile}: module {m['module']!r} has two {m['part']} tensors ({slot[m['part']].name!r}, {name!r})",
                hint="the file holds several adapters; save each adapter on its own",
            )
        slot[m["part"]] = ref
    for target, kinds in spellings.items():
        resolve_saved_layer(ad, target, kinds)
    return ad, groups


def require(ad: Adapter, module: str, parts: dict, names) -> list[TensorRef]:
    """``parts``' tensors ``names``, in that order; a missing one is an error naming the module."""
    missing = [n for n in names if n not in parts]
    if missing:
        raise AdapterError(
            f"{ad.weights_file}: module {module!r} lacks {', '.join(missing)}", hint="the adapter file is incomplete"
        )
    return [parts[n] for n in names]


def floating(ad: Adapter, *tensors: TensorRef) -> None:
    for t in tensors:
        if t.dtype not in ("F16", "BF16", "F32", "F64"):
            raise AdapterError(f"{ad.weights_file}: {t.name} has dtype {t.dtype}; it must be floating point")
