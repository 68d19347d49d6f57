"""Adapter types, one module each, keyed by ``adapter_config.json``'s ``peft_type`` (PEFT's names; the
table ``TYPES`` below): ``peft_lora`` (LORA: LoRA, rsLoRA, DoRA, embedding LoRA, trainable tokens,
``target_parameters``) first. A type reads its config and its tensors' headers into an :class:`Adapter`,
whose modules :mod:`streammerge.match` pairs with the base and turns into :mod:`streammerge.updates`.
Adding a type is one module plus one entry in ``TYPES`` (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, read_json
from . import (
    adalora,
    c3a,
    delora,
    fourierft,
    hra,
    ia3,
    ln_tuning,
    lycoris,
    miss,
    oft,
    peft_lora,
    randlora,
    shira,
    vblora,
    vera,
)
from .peft_lora import (
    CONFIG_NAME,
    PEFT_PREFIX,
    Adapter,
    LoraModule,
    ParamLora,
    TokenDelta,
    find_adapter_dir,
    saved_layer,
    targets_module,
)

#: peft_type -> the module that loads such an adapter (``load_adapter(path, reader, weight)``)
TYPES = {"LORA": peft_lora, "IA3": ia3, "LOHA": lycoris, "LOKR": lycoris, "ADALORA": adalora, "LN_TUNING": ln_tuning,
         "VERA": vera, "SHIRA": shira, "DELORA": delora, "HRA": hra,
         "OFT": oft, "FOURIERFT": fourierft, "MISS": miss,
         "C3A": c3a, "RANDLORA": randlora, "VBLORA": vblora}  # fmt: skip


#: PEFT types that change no weight: there is no merged model to write
NO_WEIGHTS = {
    "PROMPT_TUNING": "it prepends learned virtual tokens to the input",
    "P_TUNING": "it prepends virtual tokens made by a prompt encoder",
    "PREFIX_TUNING": "it prepends learned key/value prefixes in every layer",
    "MULTITASK_PROMPT_TUNING": "it prepends learned, task-specific virtual tokens",
    "ADAPTION_PROMPT": "it adds gated prompt attention to the top layers",
    "CPT": "it prepends context-aware virtual tokens",
    "CARTRIDGE": "it prepends a learned key/value cache",
    "POLY": "it routes each input between several LoRA modules",
    "XLORA": "it mixes several LoRA adapters per token with a learned classifier",
}


def load_adapter(path: Path | str, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index the adapter at ``path`` with the module of its ``peft_type``."""
    adir = find_adapter_dir(Path(path))
    ptype = read_json(adir / CONFIG_NAME, CONFIG_NAME, AdapterError).get("peft_type", "LORA")
    kind = TYPES.get(ptype.upper()) if isinstance(ptype, str) else None
    if isinstance(ptype, str) and ptype.upper() in NO_WEIGHTS:
        raise AdapterError(
            f"{adir / CONFIG_NAME}: peft_type {ptype} has no merged form: {NO_WEIGHTS[ptype.upper()]} and changes "
            "no weight of the base",
            hint="serve it with PEFT on top of the base model (PEFT's merge_and_unload has nothing to merge either)",
        )
    if kind is None:
        raise AdapterError(
            f"{adir / CONFIG_NAME}: adapter type {ptype!r} is not supported; streammerge merges "
            f"{', '.join(TYPES)} adapters (peft_type)",
            hint="merge other adapter types with PEFT's merge_and_unload",
        )
    return kind.load_adapter(adir, reader, weight)


__all__ = [
    "CONFIG_NAME",
    "PEFT_PREFIX",
    "TYPES",
    "Adapter",
    "LoraModule",
    "ParamLora",
    "TokenDelta",
    "find_adapter_dir",
    "load_adapter",
    "saved_layer",
    "targets_module",
]
