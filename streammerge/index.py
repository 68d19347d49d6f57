"""Pure key matching: PEFT module names -> base checkpoint tensor names.

PEFT names modules as the wrapped model sees them (``model.layers.0.self_attn.q_proj``); a
checkpoint may carry a different top-level prefix (``h.0.attn.c_attn`` in an original GPT-2,
``transformer.`` when saved from GPT2LMHeadModel). One prefix rule is chosen for the whole adapter,
so a partial match can never hide behind a per-key guess.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: weight names under which architectures keep their input embedding.
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
)


@dataclass(frozen=True)
class KeyMap:
    """Rename rule: drop ``strip`` from the front of a PEFT module name, then prepend ``add``."""

    strip: str = ""
    add: str = ""

    def to_base(self, module: str) -> str | None:
        if not module.startswith(self.strip):
            return None
        return self.add + module[len(self.strip) :]

    def to_peft(self, base_module: str) -> str | None:
        if not base_module.startswith(self.add):
            return None
        return self.strip + base_module[len(self.add) :]


def module_of(tensor_name: str) -> tuple[str, str]:
    """``a.b.weight`` -> (``a.b``, ``weight``)."""
    head, _, param = tensor_name.rpartition(".")
    return head, param


def candidate_keymaps(modules: Iterable[str], base_names: Iterable[str]) -> list[KeyMap]:
    maps = [KeyMap()]
    firsts = {m.split(".", 1)[0] + "." for m in modules if "." in m}
    maps += [KeyMap(strip=f) for f in sorted(firsts)]
    prefixes = {n.split(".", 1)[0] + "." for n in base_names if "." in n}
    maps += [KeyMap(add=p) for p in sorted(prefixes)]
    maps += [KeyMap(strip=f, add=p) for f in sorted(firsts) for p in sorted(prefixes) if f != p]
    return maps


def choose_keymap(modules: list[str], base_modules: set[str], special: set[str] = frozenset()) -> KeyMap:
    """The rename rule under which the most adapter modules exist in the base (identity on ties)."""
    best, best_hits = KeyMap(), -1
    for km in candidate_keymaps(modules, base_modules):
        hits = 0
        for m in modules:
            b = km.to_base(m)
            if b is not None and (b in base_modules or b in special):
                hits += 1
        if hits > best_hits:
            best, best_hits = km, hits
    return best


def find_input_embedding(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The checkpoint's input embedding weight, if it has exactly one recognisable one."""
    found = [n for n, s in shapes.items() if len(s) == 2 and n.endswith(EMBEDDING_SUFFIXES)]
    if len(found) > 1:
        found = [n for n in found if "vision" not in n and "encoder." not in n] or found
    return found[0] if len(found) == 1 else None


def is_tied(config: dict, names: set[str], output_key: str = "lm_head.weight") -> bool:
    """Whether the output embedding shares the input embedding's tensor.

    ``tie_word_embeddings`` decides when present (also under ``text_config``); when absent the
    checkpoint decides: no output projection stored means tied.
    """
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg, dict) and isinstance(cfg.get("tie_word_embeddings"), bool):
            if cfg["tie_word_embeddings"] and output_key in names:
                return False  # stored explicitly: treat as its own tensor
            return cfg["tie_word_embeddings"]
    return output_key not in names


# --- bitsandbytes companion keys -------------------------------------------------------------------

Q4_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
QSTATE_MARK = ".quant_state.bitsandbytes__"


def find_quantized(names: Iterable[str]) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Group bitsandbytes companion keys by the weight they belong to, detected by keys (not module names).

    Returns ``(four_bit, int8)``: weight name -> {part: tensor name}. 4-bit parts: ``weight``,
    ``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``, ``quant_state``. 8-bit parts:
    ``weight``, ``SCB`` and optionally ``weight_format``.
    """
    names = set(names)
    four: dict[str, dict[str, str]] = {}
    for n in names:
        if QSTATE_MARK in n:
            w = n[: n.index(QSTATE_MARK)]
            four.setdefault(w, {})["quant_state"] = n
    for w, parts in four.items():
        parts["weight"] = w
        for suf in Q4_SUFFIXES:
            if w + suf in names:
                parts[suf[1:]] = w + suf
    int8: dict[str, dict[str, str]] = {}
    for n in names:
        if n.endswith(".SCB"):
            m = n[: -len(".SCB")]
            parts = {"weight": m + ".weight", "SCB": n}
            if m + ".weight_format" in names:
                parts["weight_format"] = m + ".weight_format"
            int8[m + ".weight"] = parts
    return four, int8


def stray_quant_keys(names: Iterable[str], four: dict, int8: dict) -> list[str]:
    """Companion-looking keys that belong to no quantized weight (a checkpoint missing pieces)."""
    used = {v for parts in list(four.values()) + list(int8.values()) for v in parts.values()}
    return sorted(
        n for n in names if n not in used and (n.endswith((*Q4_SUFFIXES, ".SCB", ".weight_format")) or QSTATE_MARK in n)
    )
