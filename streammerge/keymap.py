"""Key maps: how an adapter's module names (as the wrapped model names them) become a checkpoint's tensor
names. One prefix rule is chosen for the whole adapter (``h.0.attn.c_attn`` in an original GPT-2,
``transformer.`` when saved from GPT2LMHeadModel ...), so a partial match can never hide behind a per-key
guess; and which tensors are the embeddings, and whether they are tied."""

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
OUTPUT_NAMES = ("lm_head", "embed_out")
OUT_KEY = "lm_head.weight"


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

    def describe(self, module: str) -> str:
        if not self.strip and not self.add:
            return "same name"
        return f"prefix: {self.strip or '(none)'!r} -> {self.add or '(none)'!r}"


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


def choose_keymap(modules: list[str], base_modules: set[str], special: set[str] = frozenset(), extra=()) -> KeyMap:
    """The rename rule under which the most adapter modules exist in the base (identity on ties);
    ``extra``: further candidates (an architecture's key conversion)."""
    best, best_hits = KeyMap(), -1
    for km in [*candidate_keymaps(modules, base_modules), *extra]:
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


def is_tied(config: dict, names: set[str], output_key: str = OUT_KEY) -> bool:
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


def is_vocab(target: str, embed_key: str | None) -> bool:
    """An input or output embedding: the tensors whose rows a resized vocabulary changes."""
    return target == embed_key or module_of(target)[0].endswith(OUTPUT_NAMES)
