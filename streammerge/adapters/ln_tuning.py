"""PEFT LN tuning (peft_type LN_TUNING): a trained copy of each targeted normalisation layer, saved as
``<module>.ln_tuning_layers.<param>``; PEFT's merge swaps the copy in, so each tensor replaces the base's
(cast to its dtype), as a ``modules_to_save`` layer does."""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, read_json
from .lora_config import CONFIG_NAME
from .peft_lora import Adapter, load_typed_weights, normalize

_KEY = re.compile(r"^(?P<module>.+?)\.ln_tuning_layers(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)$")


def load_adapter(adir: Path, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index an LN-tuning adapter: one replacement per saved tensor of a tuned layer."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight != 1:
        raise AdapterError(
            f"{adir}: an LN_TUNING adapter cannot be merged with a weight ({weight!r}): its layers replace the base's",
            hint="pass the adapter without :WEIGHT",
        )
    cfg = read_json(adir / CONFIG_NAME, CONFIG_NAME, AdapterError)
    wfile, refs = load_typed_weights(adir, reader, "LN_TUNING")
    ad = Adapter(str(adir), wfile, 1.0, cfg, tensors=refs, targets_replaced=True)
    for key, ref in refs.items():
        m = _KEY.match(normalize(key))
        if m is None:
            raise AdapterError(
                f"{wfile}: {key!r} is not a tuned layer's tensor (<module>.ln_tuning_layers.<param>)",
                hint="the file does not belong to an LN_TUNING adapter",
            )
        name = f"{m['module']}.{m['param']}"
        if name in ad.replacements:
            raise AdapterError(f"{wfile}: two tensors replace {name!r}", hint="save each adapter on its own")
        if ref.dtype not in ("F16", "BF16", "F32", "F64"):
            raise AdapterError(f"{wfile}: {ref.name} has dtype {ref.dtype}; a tuned layer is floating point")
        ad.replacements[name] = ref
    return ad
