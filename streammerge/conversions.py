"""Checkpoint key layouts: how transformers renames a checkpoint's keys into its module tree on load.

transformers 5 keeps vision-language models as ``model.language_model.*``, ``model.visual.*`` ... in
memory (the names PEFT adapters use), while ``save_pretrained`` of a model built or loaded from the
transformers-4 layout writes ``model.layers.*``, ``visual.*``, ``language_model.model.*`` ... . On load,
transformers maps one to the other with per-architecture renaming rules (its
``conversion_mapping.py``). The rules below are those rules as data, per config ``model_type``,
applied in order as regex substitutions to a checkpoint module name; they were read from
transformers 5.24 (and checked against its loader in the tests). A name already in the module-tree
layout passes through unchanged, so both layouts are handled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TRANSFORMERS_VERSION = "5.24"

_QWEN2_VL = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
)
_LANGUAGE_MODEL = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.", "model.language_model."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
)
_VISION_TOWER = (  # CLIP / SigLIP towers: the Hub's ``vision_tower.vision_model.*`` and the bare ``vision_tower.*``
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
)
_LEGACY = ((r"^model\.language_model\.model\.", "model.language_model."),)

#: config ``model_type`` -> the renaming rules transformers applies to its checkpoint keys on load.
RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen2_vl": _QWEN2_VL + _LEGACY,
    "qwen2_5_vl": _QWEN2_VL + _LEGACY,
    "llava": _LANGUAGE_MODEL + _VISION_TOWER + _LEGACY,
    "gemma3": _LANGUAGE_MODEL + _VISION_TOWER + _LEGACY,
    "mllama": (*_LANGUAGE_MODEL, (r"^vision_model\.", "model.vision_model."), *_LEGACY),
    # MoE: Mixtral's ``block_sparse_moe`` is transformers 5's ``mlp`` (its experts' w1/w3/w2 are the
    # per-expert pieces of the fused parameters: streammerge.experts.SPLITS)
    "mixtral": ((r"\.block_sparse_moe\.", ".mlp."),),
    "minimax": ((r"\.block_sparse_moe\.", ".mlp."),),
    # PhiMoE also calls its router ``router`` (the checkpoint's ``block_sparse_moe.gate``)
    "phimoe": ((r"\.block_sparse_moe\.", ".mlp."), (r"\.mlp\.gate$", ".mlp.router")),
}

#: architectures whose routed experts transformers 5 fuses into 3-D parameters on load (its conversion
#: mapping merges ``experts.N.<proj>.weight``): the per-expert modules of their checkpoints are not
#: modules of the model PEFT wraps, so ``target_modules`` never reaches them (checked against
#: transformers' mapping in the tests)
FUSED_EXPERTS = frozenset(
    {
        "afmoe",
        "cohere2_moe",
        "deepseek_v2",
        "deepseek_v3",
        "deepseek_v32",
        "dots1",
        "ernie4_5_moe",
        "exaone_moe",
        "flex_olmo",
        "glm4_moe",
        "glm4_moe_lite",
        "glm4v_moe",
        "glm_moe_dsa",
        "hunyuan_v1_moe",
        "jamba",
        "kimi_linear",
        "lfm2_moe",
        "longcat_flash",
        "minimax",
        "minimax_m2",
        "mixtral",
        "nemotron_h",
        "olmoe",
        "phimoe",
        "qwen2_moe",
        "qwen3_5_moe_text",
        "qwen3_moe",
        "qwen3_next",
        "qwen3_omni_moe",
        "qwen3_omni_moe_text",
        "qwen3_omni_moe_thinker",
        "solar_open",
    }
)
_PER_EXPERT = re.compile(r"\.experts\.\d+\.(?:gate_proj|up_proj|down_proj|w1|w2|w3)$")


def fused_away(model_type: str, module: str) -> bool:
    """A checkpoint module that is one expert's projection of experts ``model_type`` fuses on load."""
    return model_type in FUSED_EXPERTS and _PER_EXPERT.search(module) is not None


def to_module_tree(name: str, rules) -> tuple[str, list[str]]:
    """A checkpoint module name in the module tree's spelling, and the rules that changed it."""
    applied = []
    for pattern, repl in rules:
        new = re.sub(pattern, repl, name, count=1)
        if new != name:
            applied.append(f"{pattern} -> {repl}")
            name = new
    return name, applied


@dataclass
class ConversionMap:
    """Adapter module names (module tree) <-> checkpoint module names, through an architecture's rules.
    Two checkpoint modules that become the same module-tree name are ambiguous: never guessed."""

    model_type: str
    to_tree: dict[str, str] = field(default_factory=dict)
    rules_of: dict[str, list[str]] = field(default_factory=dict)
    from_tree: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, model_type: str, base_modules) -> ConversionMap | None:
        rules = RULES.get(model_type)
        if rules is None:
            return None
        cm = cls(model_type)
        for b in sorted(base_modules):
            tree, applied = to_module_tree(b, rules)
            cm.to_tree[b], cm.rules_of[b] = tree, applied
            cm.from_tree.setdefault(tree, []).append(b)
        return cm

    def to_base(self, module: str) -> str | None:
        found = self.from_tree.get(module, [])
        return found[0] if len(found) == 1 else None

    def to_base_prefix(self, module: str) -> str | None:
        """A module that holds no tensor of its own in the checkpoint (fused experts stored per expert):
        the checkpoint's spelling of it, from the modules below it."""
        found = set()
        for tree, bases in self.from_tree.items():
            if tree.startswith(module + ".") and len(bases) == 1 and bases[0].endswith(tree[len(module) :]):
                found.add(bases[0][: len(bases[0]) - (len(tree) - len(module))])
        return found.pop() if len(found) == 1 else None

    def to_peft(self, base_module: str) -> str | None:
        return self.to_tree.get(base_module)

    def ambiguous(self, module: str) -> list[str]:
        found = self.from_tree.get(module, [])
        return found if len(found) > 1 else []

    def describe(self, module: str) -> str:
        base = self.to_base(module) or self.to_base_prefix(module)
        applied = to_module_tree(base, RULES[self.model_type])[1] if base else []
        how = "; ".join(applied) if applied else "unchanged"
        return f"transformers {TRANSFORMERS_VERSION} {self.model_type} key conversion: {how}"


#: architectures that build GPT-2's ``Conv1D`` (weight stored [in, out]) for these module names; every
#: other projection transformers builds is an ``nn.Linear`` (read from transformers 5's models, checked
#: against the built models in the tests)
CONV1D_MODULES = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "imagegpt": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "decision_transformer": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "clvp": ("c_fc", "c_proj"),
}


def is_conv1d(model_type: str, module: str) -> bool:
    """Whether transformers builds ``module`` of a ``model_type`` model as a ``Conv1D``: the only layer on
    which PEFT honours ``fan_in_fan_out`` (on ``nn.Linear`` it warns and ignores it; on ``Conv1D`` it
    sets it)."""
    return module.rsplit(".", 1)[-1] in CONV1D_MODULES.get(model_type, ())
