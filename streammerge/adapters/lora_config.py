"""``adapter_config.json`` of a PEFT LoRA adapter: every field PEFT reads checked for its type and range
(numbers finite, with the field named in the error), and the variants that cannot be merged from files
refused by name."""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import AdapterError

CONFIG_NAME = "adapter_config.json"
#: ``init_lora_weights`` values for which PEFT rewrites the base weights when the adapter loads.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _positive(v, integer: bool = False) -> bool:
    """A JSON number PEFT can use as a rank (``integer``) or an alpha: positive and finite (JSON from
    Python may hold NaN and Infinity, which the json module reads without complaint)."""
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        return False
    return math.isfinite(v) and v > 0


_REFUSED = {
    "alora_invocation_tokens": "aLoRA only applies after its invocation tokens; it has no merged form",
    "layer_replication": "layer_replication builds new layers at load time; it cannot be merged from files",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "arrow_config": "Arrow routes between several LoRA experts per token; it has no single merged form",
    "kasa_config": "KaSA changes the base weights' singular values; it is not supported",
    "monteclora_config": "MonteCLoRA is a variational LoRA variant; it is not supported",
    "velora_config": "VeLoRA is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
}


class _Invalid(Exception):
    """One field is wrong: ``args`` = (message, hint or None)."""


def _fail(msg: str, hint: str | None = None):
    raise _Invalid(msg, hint)


def check_config(cfg: dict, where: Path) -> None:
    """Every field PEFT reads, with its type and range; the adapter types and variants that have no merge."""
    try:
        for check in (_check_type, _check_numbers, _check_flags, _check_names, _check_init, _check_variants):
            check(cfg)
    except _Invalid as e:
        raise AdapterError(f"{where}: {e.args[0]}", hint=e.args[1]) from None


def _check_type(cfg: dict) -> None:
    ptype = cfg.get("peft_type", "LORA")
    if not isinstance(ptype, str) or ptype.upper() != "LORA":
        _fail(
            f"adapter type {ptype!r} is not supported; streammerge merges LoRA adapters (peft_type LORA)",
            "merge other adapter types with PEFT's merge_and_unload",
        )


def check_numbers(cfg: dict, where: Path) -> None:
    """``r``, ``lora_alpha`` (``alpha`` in LyCORIS configs), the rank and alpha patterns and
    ``layers_to_transform`` of any adapter type that has them."""
    if "alpha" in cfg and "lora_alpha" not in cfg:
        cfg = {**cfg, "lora_alpha": cfg["alpha"]}
    try:
        _check_numbers(cfg)
    except _Invalid as e:
        raise AdapterError(f"{where}: {e.args[0]}".replace("'lora_alpha'", "'alpha'"), hint=e.args[1]) from None


def _check_numbers(cfg: dict) -> None:
    if not _positive(cfg.get("r"), integer=True):
        _fail(f"'r' must be a positive integer, found {cfg.get('r')!r}")
    if not _positive(cfg.get("lora_alpha")):
        _fail(f"'lora_alpha' must be a positive finite number, found {cfg.get('lora_alpha')!r}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        v = cfg.get(key) or {}
        if not isinstance(v, dict):
            _fail(f"{key!r} must map module patterns to positive numbers, found {v!r}")
        for k, x in v.items():
            if not _positive(x, integer):
                what = "a positive integer" if integer else "a positive finite number"
                _fail(f"{key!r} entry {k!r} must be {what}, found {x!r}")
            _regex(k, f"{key!r} key {k!r}")
    ltt = cfg.get("layers_to_transform")
    if ltt is not None and not (_integer(ltt) or (isinstance(ltt, list) and all(map(_integer, ltt)))):
        _fail(f"'layers_to_transform' must be a layer index or a list of them, found {ltt!r}")


def _check_flags(cfg: dict) -> None:
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias", "ensure_weight_tying"):
        v = cfg.get(key, False)
        if v is not None and not isinstance(v, bool):
            _fail(f"{key!r} must be true or false, found {v!r}")
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        _fail(f"'bias' must be none, all or lora_only, found {bias!r}")


def _check_names(cfg: dict) -> None:
    for key in ("target_modules", "exclude_modules"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str) and not _strings(v):
            _fail(f"{key!r} must be a module name pattern or a list of module names, found {v!r}")
        if isinstance(v, str):
            _regex(v, repr(key))
    mts = cfg.get("modules_to_save")
    if mts is not None and not _strings(mts):
        _fail(f"'modules_to_save' must be a list of module names, found {mts!r}")
    tti = cfg.get("trainable_token_indices")
    if tti is not None and not isinstance(tti, (list, dict)):
        _fail(f"'trainable_token_indices' must be a list of token ids or a dict of them, found {tti!r}")
    if isinstance(tti, dict) and not all(isinstance(v, list) for v in tti.values()):
        _fail(f"'trainable_token_indices' values must be lists of token ids, found {tti!r}")
    tp = cfg.get("target_parameters")
    if tp is not None and not (_strings(tp) and all(x.strip(".") == x for x in tp)):
        _fail(f"'target_parameters' must be a list of parameter names ('<module>.<parameter>' or bare), found {tp!r}")


def _check_init(cfg: dict) -> None:
    init = cfg.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        _fail(f"'init_lora_weights' must be true, false or a method name, found {init!r}")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        _fail(
            f"init_lora_weights={init!r}: PEFT rewrites the base weights when this adapter loads, "
            "so merging it onto the original base from files would give a wrong model",
            "convert it to a plain LoRA first: PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) writes one with init_lora_weights=true",
        )


def _check_variants(cfg: dict) -> None:
    for key, why in _REFUSED.items():
        if cfg.get(key):
            _fail(f"{key} is set: {why}", "merge this adapter with PEFT's merge_and_unload")
    if cfg.get("use_qalora"):
        _fail("use_qalora is set: QA-LoRA pools inputs and has no plain merged form here")


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _regex(text: str, what: str) -> None:
    try:
        re.compile(text)
    except re.error as e:
        _fail(f"{what} is not a valid regular expression ({e})")
