"""Adapter -> base: which base tensor each adapter tensor updates or replaces, and how.

PEFT names modules as the wrapped model sees them (``model.layers.0.self_attn.q_proj``); a
checkpoint may carry a different top-level prefix (``h.0.attn.c_attn`` in an original GPT-2,
``transformer.`` when saved from GPT2LMHeadModel). One prefix rule is chosen for the whole adapter,
so a partial match can never hide behind a per-key guess. On top of the key map: tied embeddings,
``modules_to_save`` replacements (resized vocabularies), trainable tokens and LoRA biases. Every
adapter tensor must be used exactly once. Pure: headers and configs in, :class:`Match` out.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from . import experts
from .adapters import Adapter, LoraModule, targets_module
from .conversions import ConversionMap, fused_away, is_conv1d
from .errors import AdapterError
from .keymap import OUT_KEY, KeyMap, choose_keymap, find_input_embedding, is_tied, is_vocab, module_of
from .source import TensorRef
from .updates import BiasDelta, Dora, LowRank, RowReplace, Update


@dataclass(frozen=True)
class ModuleRecord:
    """What the report says about one merged module."""

    adapter: str
    module: str
    tensor: str
    kind: str
    r: int
    alpha: float
    scaling: float
    weight: float
    rule: str = ""  # how the adapter's module name was mapped to the checkpoint's


@dataclass
class Match:
    """Per base tensor: its updates and its replacement; what the report and config must say."""

    embed_key: str | None
    tied: bool
    updates: dict[str, list[Update]] = field(default_factory=dict)
    replaced: dict[str, tuple[Adapter, TensorRef]] = field(default_factory=dict)
    records: list[ModuleRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    untie: bool = False


# --- matching --------------------------------------------------------------------------------------


def match_adapters(shapes: dict[str, tuple[int, ...]], config: dict, adapters: list[Adapter], where: str) -> Match:
    """Match every adapter tensor to the base tensors ``shapes`` (logical names and shapes) of the
    checkpoint at ``where``; check shapes; refuse unmatched or unused adapter tensors."""
    names = set(shapes)
    embed_key = find_input_embedding(shapes)
    m = _Matcher(shapes, names, config, Match(embed_key, embed_key is not None and is_tied(config, names)), where)
    for ad in adapters:
        m.adapter(ad)
    m.bias_updates()
    for name, ups in m.match.updates.items():
        if any(isinstance(u, Dora) for u in ups) and sum(isinstance(u, (Dora, LowRank)) for u in ups) > 1:
            raise AdapterError(
                f"{name!r}: a DoRA update cannot be combined with other LoRA updates on the same tensor",
                hint="merge the DoRA adapter on its own, then merge the others onto its output",
            )
        if any(u.multiplicative for u in ups) and len({u.origin for u in ups}) > 1:
            raise AdapterError(
                f"{name!r}: an IA3 vector or an HRA rotation scales or rotates the whole weight, so it cannot be "
                "combined with another adapter's update on the same tensor (the order would change the result)",
                hint="merge that adapter on its own, then merge the others onto its output",
            )
    return m.match


class _Matcher:
    """The matching state across the adapters of one merge."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], names: set[str], config: dict, match: Match, where: str):
        self.shapes, self.names, self.match, self.where = shapes, names, match, where
        self.base_modules = {module_of(n)[0] for n in names}
        self.model_type = str(config.get("model_type", ""))
        self.conversion = ConversionMap.build(self.model_type, self.base_modules)
        self.pending_bias: dict[str, list[tuple[Adapter, LoraModule]]] = {}

    def base_name(self, km: KeyMap, module: str, param: str = "weight") -> str | None:
        b = km.to_base(module)
        if b is None:
            return None
        name = f"{b}.{param}"
        if name in self.names:
            return name
        if self.match.tied and b == "lm_head" and param == "weight":
            return self.match.embed_key
        return None

    def adapter(self, ad: Adapter) -> None:
        if ad.weight == 0:
            self.match.warnings.append(f"{ad.label}: weight 0 merges nothing of this adapter")
        mods = [*ad.modules, *ad.tokens, *(module_of(n)[0] for n in ad.replacements), *ad.params, *ad.others]
        extra = [self.conversion] if self.conversion else []
        km = choose_keymap(mods, self.base_modules, {"lm_head"} if self.match.tied else set(), extra)
        if km is self.conversion:
            self.check_unambiguous(ad, mods)
        unmatched: list[str] = []
        used: set[str] = set(ad.superseded)
        if ad.superseded:
            self.match.notes.append(
                f"{ad.path}: {len(ad.superseded)} saved layer spelling(s) not used, as in PEFT's loader: "
                + ", ".join(f"{k} (superseded by {v})" for k, v in sorted(ad.superseded.items()))
            )
        for name, ref in ad.replacements.items():
            self.replacement(ad, km, name, ref, unmatched, used)
        self.lora_modules(ad, km, unmatched, used)
        self.other_modules(ad, km, unmatched, used)
        for owner in ad.params:
            self.param_loras(ad, km, owner, unmatched, used)
        for mod, td in ad.tokens.items():
            base = self.base_name(km, mod)
            if base is None:
                unmatched.append(td.values.name)
                continue
            self.match.updates.setdefault(base, []).append(RowReplace(td.indices, td.values, ad.path))
            used.add(td.values.name)
            self.match.records.append(ModuleRecord(ad.path, mod, base, "tokens", 0, 0.0, 0.0, 1.0, km.describe(mod)))
        if unmatched:
            raise AdapterError(
                f"{ad.weights_file}: {len(unmatched)} of {len(ad.tensors)} adapter tensor(s) match no tensor of "
                f"the base {self.where}",
                details=sorted(unmatched),
                hint="the adapter was trained on a different model, or the base checkpoint uses other tensor names",
            )
        check_targets_present(ad, km, {m for m in self.base_modules if not fused_away(self.model_type, m)})
        self.check_parameters_present(ad, km)
        unused = set(ad.tensors) - used
        if unused:
            raise AdapterError(
                f"{ad.weights_file}: {len(unused)} adapter tensor(s) would not be used", details=sorted(unused)
            )

    def check_unambiguous(self, ad: Adapter, mods: list[str]) -> None:
        """Two checkpoint modules that the key conversion maps to one adapter module: refuse, naming them."""
        clashes = [f"{m} <- {' or '.join(self.conversion.ambiguous(m))}" for m in mods if self.conversion.ambiguous(m)]
        if clashes:
            raise AdapterError(
                f"{ad.weights_file}: {len(clashes)} adapter module(s) match several checkpoint modules under the "
                f"{self.conversion.model_type} key conversion",
                details=clashes,
                hint="the checkpoint mixes two key layouts; re-save it with transformers' save_pretrained",
            )

    def replacement(self, ad: Adapter, km: KeyMap, name: str, ref: TensorRef, unmatched: list, used: set) -> None:
        """A full tensor saved by PEFT (modules_to_save, biases, embedding copies) replaces a base tensor."""
        mt = self.match
        mod, param = module_of(name)
        target = base = self.base_name(km, mod, param)
        if base is None:
            if mt.tied and km.to_base(mod) == "lm_head" and param == "weight":
                target = OUT_KEY  # modules_to_save on a tied lm_head: written as its own tensor
            else:
                unmatched.append(ref.name)
                return
        elif mt.tied and base == mt.embed_key and name not in ad.base_layer_copies:
            mt.untie = True  # modules_to_save on one side of a tie gives it its own tensor
            if mod.endswith("lm_head"):
                target = OUT_KEY
        if target in mt.replaced and mt.replaced[target][0] is ad and name in ad.base_layer_copies:
            used.add(ref.name)  # PEFT saved the shared tensor of a tie twice (embed_tokens and lm_head)
            return
        if target in mt.replaced:
            raise AdapterError(
                f"{target!r} is replaced by both {mt.replaced[target][0].path} and {ad.path}",
                hint="two adapters cannot both replace a full module (modules_to_save); merge them separately",
            )
        if target == OUT_KEY and OUT_KEY not in self.names:
            mt.untie = True
        self.check_replacement_shape(ad, ref, target)
        mt.replaced[target] = (ad, ref)
        used.add(ref.name)
        mt.records.append(ModuleRecord(ad.path, mod, target, "replace", 0, 0.0, 0.0, 1.0, km.describe(mod)))

    def check_replacement_shape(self, ad: Adapter, ref: TensorRef, target: str) -> None:
        embed_key = self.match.embed_key
        base_shape = self.shapes.get(target, self.shapes.get(embed_key) if target == OUT_KEY else None)
        if base_shape is None:
            return
        if len(ref.shape) != len(base_shape):
            raise AdapterError(
                f"{ad.weights_file}: {ref.name} {list(ref.shape)} cannot replace {target!r} {list(base_shape)}",
                hint="the adapter was trained on a different model",
            )
        resized_vocab = len(ref.shape) == 2 and ref.shape[1:] == base_shape[1:] and is_vocab(target, embed_key)
        if ref.shape != base_shape and not resized_vocab:
            raise AdapterError(
                f"{ad.weights_file}: {ref.name} {list(ref.shape)} cannot replace {target!r} {list(base_shape)}",
                hint="only embedding/lm_head rows may differ (a resized vocabulary)",
            )

    def lora_modules(self, ad: Adapter, km: KeyMap, unmatched: list, used: set) -> None:
        mt = self.match
        # ensure_weight_tying: PEFT adds a tied lm_head LoRA that mirrors the embedding LoRA. Both land on
        # the one shared tensor, and PEFT's merge adds the delta twice; the unmerged model applies it once.
        mirrored_tie = (
            mt.tied
            and bool(ad.config.get("ensure_weight_tying"))
            and any(lm.kind == "embedding" and self.base_name(km, m) == mt.embed_key for m, lm in ad.modules.items())
        )
        on_tie = [lm.kind for m, lm in ad.modules.items() if mt.tied and self.base_name(km, m) == mt.embed_key]
        both_sides = not mirrored_tie and "embedding" in on_tie and "linear" in on_tie
        flips: dict[bool, list[str]] = {}
        for mod, lm in ad.modules.items():
            parts = [t.name for t in (lm.a, lm.b, lm.bias, lm.magnitude) if t]
            base = self.base_name(km, mod)
            if base is None:
                unmatched += parts
                continue
            used.update(parts)
            lm = self.layer_layout(lm, flips)
            if mirrored_tie and base == mt.embed_key and lm.kind == "linear":
                mt.notes.append(
                    f"ensure_weight_tying: {mod} mirrors the tied embedding's LoRA; its update is applied once "
                    "(PEFT's merge_and_unload applies it twice, which changes the model's outputs)"
                )
                continue
            shape = mt.replaced[base][1].shape if base in mt.replaced else self.shapes[base]
            if both_sides and base == mt.embed_key and lm.kind == "linear":
                base, mt.untie = OUT_KEY, True
                mt.notes.append(
                    f"{mod}: LoRA on both sides of tied embeddings: the output embedding gets its own tensor "
                    "(untied), as the unmerged PEFT model computes (PEFT's merge_and_unload adds both updates "
                    "to the one shared tensor, which changes the model's outputs)"
                )
            mt.updates.setdefault(base, []).extend(self.lora_updates(ad, lm, base, shape))
            kind = "dora" if lm.magnitude else lm.kind
            rule = km.describe(mod)
            mt.records.append(ModuleRecord(ad.path, mod, base, kind, lm.r, lm.alpha, lm.scaling, ad.weight, rule))
            if base == mt.embed_key and mt.tied and mod.endswith("lm_head"):
                mt.notes.append(
                    f"{mod}: tied to {mt.embed_key}; the LoRA update goes into that shared tensor, so it also "
                    "changes the input embedding (as in PEFT's merge_and_unload)"
                )

        self.fan_in_fan_out_warnings(ad, flips)

    def layer_layout(self, lm: LoraModule, flips: dict[bool, list[str]]) -> LoraModule:
        """PEFT honours ``fan_in_fan_out`` on GPT-2's ``Conv1D`` only: on an ``nn.Linear`` it warns and
        sets it to false, on a ``Conv1D`` it warns and sets it to true. Do the same (``flips``: the
        modules whose flag was overridden, by the value the config had)."""
        if lm.kind != "linear":
            return lm
        conv = is_conv1d(self.model_type, lm.module)
        if lm.fan_in_fan_out != conv:
            flips.setdefault(lm.fan_in_fan_out, []).append(lm.module)
            lm = dataclasses.replace(lm, fan_in_fan_out=conv)
        return lm

    def fan_in_fan_out_warnings(self, ad: Adapter, flips: dict[bool, list[str]]) -> None:
        for was, mods in sorted(flips.items()):
            layer, now = ("`torch.nn.Linear`", False) if was else ("`Conv1D`", True)
            self.match.warnings.append(
                f"{ad.path}: fan_in_fan_out is set to {was} but the target module is {layer}. Setting "
                f"fan_in_fan_out to {now} (as PEFT does; {len(mods)} module(s), e.g. {mods[0]})"
            )

    def other_modules(self, ad: Adapter, km: KeyMap, unmatched: list, used: set) -> None:
        """Modules of the other adapter types (IA3 ...): each makes its updates of its base tensors."""
        flips: dict[bool, list[str]] = {}
        for mod, om in ad.others.items():
            base = self.base_name(km, mod)
            if base is None:
                unmatched += om.parts()
                continue
            used.update(om.parts())
            bias = module_of(base)[0] + ".bias"
            bias_of = (bias, self.shapes[bias]) if bias in self.names else None
            conv = is_conv1d(self.model_type, mod)
            if bool(ad.config.get("fan_in_fan_out")) != conv:
                flips.setdefault(bool(ad.config.get("fan_in_fan_out")), []).append(mod)
            for tensor, upd in om.updates(base, self.shapes[base], conv, bias_of, ad.weights_file):
                self.match.updates.setdefault(tensor, []).append(upd)
            r, alpha, scaling = getattr(om, "r", 0), getattr(om, "alpha", 0.0), getattr(om, "scaling", 0.0)
            rec = ModuleRecord(ad.path, mod, base, om.kind, r, alpha, scaling, ad.weight, km.describe(mod))
            self.match.records.append(rec)
        self.fan_in_fan_out_warnings(ad, flips)

    def check_parameters_present(self, ad: Adapter, km: KeyMap) -> None:
        spell = self.conversion.to_peft if self.conversion else km.to_peft  # the conversion covers every module
        spelled = {spell(b) for b in self.base_modules} - {None}
        tensors = {f"{spell(m)}.{p}" for m, p in map(module_of, self.names) if spell(m) is not None}
        missing = experts.untrained(ad, spelled, tensors)
        if missing:
            raise AdapterError(
                f"{ad.weights_file}: adapter_config.json's target_parameters name {len(missing)} parameter(s) "
                "that this adapter and base do not pair up on",
                details=missing,
                hint="the adapter file is incomplete, or it was trained on a different model",
            )

    def param_loras(self, ad: Adapter, km: KeyMap, owner: str, unmatched: list, used: set) -> None:
        """target_parameters LoRA on ``owner``'s parameters (fused MoE experts), wherever they are stored."""
        parts = [t.name for w in ad.params[owner] for t in (w.a, w.b)]
        base_owner = km.to_base(owner)
        if self.conversion and not experts.stored(ad, owner, base_owner, self.shapes, self.model_type):
            km = self.conversion  # experts stored per expert under the architecture's old module names
            base_owner = km.to_base_prefix(owner)
        if base_owner is None:
            unmatched += parts
            return
        for w, place in experts.assign(ad, owner, base_owner, self.shapes, self.model_type):
            for tensor, upd in experts.updates_for(ad, w, place, owner):
                self.match.updates.setdefault(tensor, []).append(upd)
            r, alpha, scaling = ad.rank_alpha(f"{owner}.{place.param}")
            where = place.fused or f"{len(place.pieces)} per-expert tensors {place.pieces[0][1]} ..."
            rule = km.describe(owner) + ("" if place.fused else f"; {place.param} split per expert")
            rec = ModuleRecord(ad.path, f"{owner}.{place.param}", where, "experts", r, alpha, scaling, ad.weight, rule)
            self.match.records.append(rec)
        used.update(parts)

    def lora_updates(self, ad: Adapter, lm: LoraModule, base: str, shape: tuple[int, ...]) -> list[Update]:
        """Check shapes and build the updates one LoRA module contributes to ``base``."""
        check_lora_shapes(ad, lm, base, shape)
        if lm.magnitude is not None:
            if ad.weight != 1.0:
                raise AdapterError(
                    f"{ad.path}: DoRA adapters cannot be merged with a weight ({ad.weight:g})",
                    hint="DoRA rescales the whole weight; pass the adapter without :WEIGHT",
                )
            embedding = lm.kind == "embedding"
            upd: list[Update] = [Dora(lm.a, lm.b, lm.magnitude, lm.scaling, lm.fan_in_fan_out, embedding, ad.path)]
        else:
            transposed = lm.kind == "embedding" or lm.fan_in_fan_out
            upd = [LowRank(lm.a, lm.b, lm.scaling, ad.weight, transposed, lm.kind == "embedding", ad.path)]
        if lm.bias is not None:
            bias_name = module_of(base)[0] + ".bias"
            if bias_name not in self.names:
                raise AdapterError(
                    f"{ad.weights_file}: {lm.bias.name} is a LoRA bias (lora_bias=true) but base module "
                    f"{module_of(base)[0]!r} has no bias",
                    hint="the adapter was trained on a different model",
                )
            self.pending_bias.setdefault(bias_name, []).append((ad, lm))
        return upd

    def bias_updates(self) -> None:
        for bias_name, items in self.pending_bias.items():
            for ad, lm in items:
                if lm.bias.shape != self.shapes[bias_name]:
                    raise AdapterError(
                        f"{ad.weights_file}: {lm.bias.name} {list(lm.bias.shape)} does not fit {bias_name!r} "
                        f"{list(self.shapes[bias_name])}"
                    )
                self.match.updates.setdefault(bias_name, []).append(BiasDelta(lm.bias, lm.scaling, ad.weight, ad.path))


def _shape_error(ad: Adapter, lm: LoraModule, base: str, base_shape, detail: str) -> AdapterError:
    return AdapterError(
        f"{ad.weights_file}: module {lm.module!r} does not fit base tensor {base!r} {list(base_shape)}: {detail}",
        hint="the adapter was trained on a different model (check base_model_name_or_path in adapter_config.json)",
    )


def check_lora_shapes(ad: Adapter, lm: LoraModule, base: str, shape: tuple[int, ...]) -> None:
    """``lora_A``/``lora_B`` (and a DoRA magnitude) must fit the base weight's layout."""
    a, b = lm.a.shape, lm.b.shape
    if len(shape) != 2:
        raise _shape_error(ad, lm, base, shape, "LoRA needs a 2-D weight")
    if lm.kind == "linear":
        out_f, in_f = (shape[1], shape[0]) if lm.fan_in_fan_out else shape
        if b[0] != out_f or a[1] != in_f:
            layout = "[in, out] (fan_in_fan_out)" if lm.fan_in_fan_out else "[out, in]"
            implied = [a[1], b[0]] if lm.fan_in_fan_out else [b[0], a[1]]
            detail = f"{lm.a.name} {list(a)} and {lm.b.name} {list(b)} imply {layout} = {implied}"
            raise _shape_error(ad, lm, base, shape, detail)
    elif a[1] != shape[0] or b[0] != shape[1]:
        detail = f"{lm.a.name} {list(a)} and {lm.b.name} {list(b)} imply [{a[1]}, {b[0]}]"
        raise _shape_error(ad, lm, base, shape, detail)
    if lm.magnitude is not None:
        rows = shape[1] if (lm.kind == "embedding" or lm.fan_in_fan_out) else shape[0]
        if lm.magnitude.shape != (rows,):
            raise _shape_error(ad, lm, base, shape, f"{lm.magnitude.name} {list(lm.magnitude.shape)} != [{rows}]")


def check_targets_present(ad: Adapter, km: KeyMap, base_modules: set[str]) -> None:
    """A module the config targets but the file lacks would keep PEFT's random init: an error
    (``base_modules``: those of the model PEFT wraps)."""
    targets = ad.config.get("target_modules")
    if not targets or targets == "all-linear":
        return
    layers = ad.config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    exclude = ad.config.get("exclude_modules")
    trained = {*ad.modules, *ad.others}
    if ad.targets_replaced:
        trained |= {module_of(n)[0] for n in ad.replacements}
    missing = []
    for bm in sorted(base_modules):
        pm = km.to_peft(bm)
        if pm is None or not targets_module(pm, targets) or (exclude and targets_module(pm, exclude)):
            continue
        if layers:
            m = re.search(r"\.(\d+)\.", pm)
            if m is None or int(m.group(1)) not in layers:
                continue
        if pm not in trained:
            missing.append(pm)
    if missing:
        raise AdapterError(
            f"{ad.weights_file}: adapter_config.json targets {len(missing)} module(s) that have no adapter tensors",
            details=missing,
            hint="PEFT would leave these at random initialisation; the adapter file is incomplete or the "
            "config belongs to another adapter",
        )
