"""Adapter types, one module each, keyed by ``adapter_config.json``'s ``peft_type`` (PEFT's names):
``peft_lora`` (LORA: LoRA, rsLoRA, DoRA, embedding LoRA, trainable tokens, ``target_parameters``), ``ia3``
(IA3) and ``lycoris`` (LOHA, LOKR). A type reads its config and its tensors' headers into an
:class:`Adapter`, whose modules :mod:`streammerge.match` pairs with the base and turns into
:mod:`streammerge.updates`. Adding a type is one module plus one entry in ``TYPES`` (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError
from ..source import Reader, read_json
from . import ia3, lycoris, peft_lora
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
TYPES = {"LORA": peft_lora, "IA3": ia3, "LOHA": lycoris, "LOKR": lycoris}


def load_adapter(path: Path | str, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index the adapter at ``path`` with the module of its ``peft_type``."""
    adir = find_adapter_dir(Path(path))
    ptype = read_json(adir / CONFIG_NAME, CONFIG_NAME, AdapterError).get("peft_type", "LORA")
    kind = TYPES.get(ptype.upper()) if isinstance(ptype, str) else None
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
