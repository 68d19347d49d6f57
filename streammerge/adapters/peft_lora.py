"""Reading PEFT LoRA adapters: config, tensor locations, and per-module rank/alpha/scaling."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdapterError
from ..source import DTYPES, Reader, TensorRef, parse_header, read_json, st_dtype
from .lora_config import CONFIG_NAME, check_config

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.safetensors.zst")
PEFT_PREFIX = "base_model.model."

LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
    r"|token_adapter\.trainable_tokens_delta)(?:\.(?P<name>(?!(?:weight|bias)$)[^.]+))?(?:\.(?P<param>weight|bias))?$"
)


@dataclass(frozen=True)
class LoraModule:
    """The LoRA tensors and hyper-parameters PEFT would give one wrapped module."""

    module: str  # module path as PEFT names it, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" | "embedding"
    a: TensorRef
    b: TensorRef
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    bias: TensorRef | None = None  # lora_B.bias (lora_bias=True)
    magnitude: TensorRef | None = None  # DoRA


@dataclass(frozen=True)
class ParamLora:
    """LoRA on a parameter (PEFT's ``target_parameters``, ParamWrapper), e.g. fused MoE experts: ``a``
    [experts * r, in], ``b`` [out, experts * r]. Several wrappers nest on one module, and the saved keys
    do not name the parameter: ``depth`` counts the ``base_layer.`` between the module and ``lora_A``
    (the innermost wrapper is the deepest). Which parameter each one is, and so its rank and alpha, is
    decided against the base's shapes."""

    owner: str  # the module holding the parameters, e.g. "model.layers.0.mlp.experts"
    depth: int
    a: TensorRef
    b: TensorRef


@dataclass(frozen=True)
class TokenDelta:
    """Trainable tokens: rows ``indices`` of ``module``'s weight are replaced by ``values``."""

    module: str
    indices: tuple[int, ...]
    values: TensorRef


@dataclass
class Adapter:
    """One PEFT LoRA adapter on disk, indexed (no tensor data read except for small checks)."""

    path: str
    weights_file: str
    weight: float
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, TensorRef] = field(default_factory=dict)  # base-named tensor -> full tensor
    base_layer_copies: set[str] = field(default_factory=set)  # replacements saved as ``<m>.base_layer.*``
    tokens: dict[str, TokenDelta] = field(default_factory=dict)
    params: dict[str, list[ParamLora]] = field(default_factory=dict)  # owner module -> its wrappers
    #: saved spellings PEFT's loader makes redundant (``original_module``, unnamed ``modules_to_save``)
    #: -> the tensor used instead
    superseded: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, TensorRef] = field(default_factory=dict)  # every tensor in the file, by key
    #: modules of another adapter type (IA3 ...), each with ``parts()`` and ``updates(...)``
    others: dict[str, object] = field(default_factory=dict)
    #: the targeted modules are trained by replacement (LN tuning): a replacement counts as their tensors
    targets_replaced: bool = False

    @property
    def label(self) -> str:
        return self.path if self.weight == 1.0 else f"{self.path}:{self.weight:g}"

    def rank_alpha(self, name: str) -> tuple[int, float, float]:
        """``r``, ``lora_alpha`` and the scaling PEFT gives the wrapper of ``name`` (rank/alpha patterns)."""
        cfg = self.config
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"]))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", cfg.get("alpha")))
        return r, alpha, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


def find_adapter_dir(path: Path) -> Path:
    """The directory holding ``adapter_config.json``: PATH itself or its single named subfolder."""
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found", hint="pass a PEFT adapter directory")
    if (path / CONFIG_NAME).is_file():
        return path
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file())
    if len(subs) == 1:
        return subs[0]
    if len(subs) > 1:
        raise AdapterError(
            f"{path}: holds several named adapters ({', '.join(p.name for p in subs)})",
            hint=f"pass one of them, e.g. {subs[0]}",
        )
    raise AdapterError(f"{path}: no {CONFIG_NAME}", hint="pass the directory PEFT's save_pretrained wrote")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: first key that matches a dot-bounded suffix wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_weights(adir: Path, reader: Reader) -> tuple[str, dict[str, TensorRef]]:
    """The adapter's weights file and its tensors (safetensors headers, or a safely loaded ``.bin``)."""
    st = adir / WEIGHT_NAMES[0]
    if not st.is_file() and (adir / WEIGHT_NAMES[2]).is_file():
        st = adir / WEIGHT_NAMES[2]
    if st.is_file():
        header = parse_header(st, error_cls=AdapterError)
        return str(st), dict(header.tensors)
    pt = adir / WEIGHT_NAMES[1]
    if pt.is_file():
        import torch

        try:
            sd = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for bad pickles
            raise AdapterError(
                f"{pt}: cannot be read safely as a tensor dict ({type(e).__name__}: {e})",
                hint="re-save the adapter with safetensors (PEFT's default)",
            ) from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
            raise AdapterError(f"{pt}: must hold a dict of tensors")
        refs = {}
        for k, v in sd.items():
            if st_dtype(v.dtype) is None:
                raise AdapterError(f"{pt}: tensor {k!r} has unsupported dtype {v.dtype}")
            v = v.contiguous()
            sd[k] = v
            name = st_dtype(v.dtype)
            refs[k] = TensorRef(k, str(pt), name, tuple(v.shape), -1, v.numel() * DTYPES[name][0])
        reader.register_pickled(str(pt), sd)
        return str(pt), refs
    raise AdapterError(
        f"{adir}: no {WEIGHT_NAMES[0]} or {WEIGHT_NAMES[1]}",
        hint="the adapter directory must hold the weights PEFT's save_pretrained wrote",
    )


def load_typed_weights(adir: Path, reader: Reader, ptype: str) -> tuple[str, dict[str, TensorRef]]:
    """The weights of an adapter of another ``peft_type``: there, and not LoRA tensors (whose config it
    would then not be)."""
    wfile, refs = load_weights(adir, reader)
    if not refs:
        raise AdapterError(f"{wfile}: holds no tensors")
    lora_keys = sorted(k for k in refs if LORA_KEY.match(normalize(k)))
    if lora_keys:
        raise AdapterError(
            f"{adir / CONFIG_NAME}: peft_type is {ptype} but {wfile} holds LoRA tensors ({lora_keys[0]} ...)",
            hint="the config belongs to another adapter; use the adapter_config.json saved with these weights",
        )
    return wfile, refs


def normalize(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _token_indices(cfg: dict, module: str, where: Path) -> tuple[int, ...]:
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, list):
        indices = spec
    elif isinstance(spec, dict):
        indices = _pattern_value({re.escape(k): v for k, v in spec.items()}, module, None)
        if indices is None:
            raise AdapterError(
                f"{where}: trainable tokens stored for {module!r} but trainable_token_indices names no such module",
                hint=f"trainable_token_indices keys: {', '.join(spec)}",
            )
    else:
        raise AdapterError(
            f"{where}: trainable tokens stored for {module!r} but trainable_token_indices is missing",
        )
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise AdapterError(f"{where}: trainable_token_indices must be non-negative integers, found {indices!r}")
    return tuple(indices)


_SAVED_LAYER = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<tok>token_adapter\.base_layer)|(?P<kind>base_layer|original_module)"
    r"|modules_to_save(?:\.(?P<adapter>[^.]+)(?=\..))?)\.(?P<param>.+)$"
)


def saved_layer(name: str) -> tuple[str, str]:
    """How PEFT saved a full tensor, and the base tensor it stands for: ``copy`` (the trained copy of a
    modules_to_save layer, a plain ``<m>.<p>`` or ``<m>.modules_to_save.<adapter>.<p>``), ``base_layer``
    (the adapter's copy of a wrapped base layer, ``<m>.base_layer.<p>`` or
    ``<m>.token_adapter.base_layer.<p>``), ``original`` (``<m>.original_module.<p>``: the base layer as it was
    before training) or ``unnamed_copy`` (``<m>.modules_to_save.<p>``, which PEFT's loader ignores)."""
    m = _SAVED_LAYER.match(name)
    if m is None:
        return "copy", name
    target = f"{m['module']}.{m['param']}"
    if m["tok"] or m["kind"] == "base_layer":
        return "base_layer", target
    if m["kind"] == "original_module":
        return "original", target
    return ("copy" if m["adapter"] else "unnamed_copy"), target


def resolve_saved_layer(ad: Adapter, name: str, kinds: dict[str, list[TensorRef]]) -> None:
    """What PEFT's loader does with the spellings of one saved layer: the trained copy of a modules_to_save
    layer wins (and makes its ``original_module`` and unnamed ``modules_to_save`` spellings redundant); a
    wrapped layer's ``base_layer`` copy overwrites the base tensor. Those spellings without the trained
    copy are refused, as PEFT's loader does (it needs the plain key of every modules_to_save layer)."""
    where = ad.weights_file
    for refs in kinds.values():
        if len(refs) > 1:
            raise AdapterError(f"{where}: two tensors replace {name!r}: {refs[0].name!r} and {refs[1].name!r}")
    if "copy" in kinds and "base_layer" in kinds:
        a, b = kinds["copy"][0].name, kinds["base_layer"][0].name
        raise AdapterError(f"{where}: two tensors replace {name!r}: {a!r} and {b!r}")
    chosen = next((kinds[k][0] for k in ("copy", "base_layer") if k in kinds), None)
    if chosen is None:
        lone = next(kinds[k][0] for k in ("unnamed_copy", "original") if k in kinds)
        raise AdapterError(
            f"{where}: {lone.name!r} has no trained copy beside it "
            f"(PEFT saves the trained layer as {PEFT_PREFIX}{name!r} too, and its loader needs that key)",
            hint="the adapter file is incomplete; save it again with PEFT's save_pretrained",
        )
    ad.replacements[name] = chosen
    if chosen is not kinds.get("copy", [None])[0]:
        ad.base_layer_copies.add(name)
    for kind in ("original", "unnamed_copy"):
        ref = kinds.get(kind, [None])[0]
        if ref is not None and ref is not chosen:
            if ref.shape != chosen.shape:
                raise AdapterError(
                    f"{where}: {ref.name!r} {list(ref.shape)} and {chosen.name!r} {list(chosen.shape)} "
                    "disagree in shape",
                    hint="the adapter file mixes layers of different models",
                )
            ad.superseded[ref.name] = chosen.name


def _param_owner(module: str, cfg: dict) -> tuple[str | None, int]:
    """For a ParamWrapper's keys (``<owner>[.base_layer]*.lora_A``) whose owner holds a parameter named in
    ``target_parameters``: the owner and the nesting depth; else (None, 0)."""
    owner, depth = module, 0
    while owner.endswith(".base_layer"):
        owner, depth = owner[: -len(".base_layer")], depth + 1
    for name in cfg.get("target_parameters") or ():
        part = name.rpartition(".")[0]
        if part and (owner == part or owner.endswith("." + part)):
            return owner, depth
        # a bare parameter name (PEFT writes ``["down_proj", "gate_up_proj"]`` when target_modules named the
        # experts' projections): any module can hold it, so a LoRA module the config does not target as a
        # layer (or a nested wrapper) is a parameter wrapper
        if not part and (depth > 0 or not targets_module(owner, cfg.get("target_modules"))):
            return owner, depth
    return None, 0


def targets_module(module: str, spec) -> bool:
    """PEFT's ``target_modules`` test: a regex string matches the whole name; a list entry matches the
    name or a dot-bounded suffix of it."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == t or module.endswith("." + t) for t in spec)


def _param_lora(wfile: str, owner: str, depth: int, module: str, slot: dict[str, TensorRef]) -> ParamLora:
    if set(slot) != {"lora_A", "lora_B"}:
        raise AdapterError(
            f"{wfile}: parameter LoRA {module!r} must have exactly lora_A and lora_B, found {', '.join(slot)}",
            hint="PEFT's target_parameters LoRA has no bias, DoRA or embedding variant",
        )
    a, b = slot["lora_A"], slot["lora_B"]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(
            f"{wfile}: parameter LoRA {module!r}: {a.name} {list(a.shape)} and {b.name} {list(b.shape)} must be "
            "[experts * r, in] and [out, experts * r]"
        )
    for t in (a, b):
        if t.dtype not in ("F16", "BF16", "F32", "F64"):
            raise AdapterError(f"{wfile}: {t.name} has dtype {t.dtype}; LoRA tensors must be floating point")
    return ParamLora(owner, depth, a, b)


def _is_tied_mirror(cfg: dict, module: str) -> bool:
    """PEFT gives a tied output embedding the input embedding's trainable tokens and saves that delta
    again under ``lm_head``; its loader ignores the copy. (A dict naming the output layer itself means
    tokens trained on it.)"""
    if module.rsplit(".", 1)[-1] not in ("lm_head", "embed_out"):
        return False
    spec = cfg.get("trainable_token_indices")
    return not (isinstance(spec, dict) and _pattern_value({re.escape(k): v for k, v in spec.items()}, module, None))


def load_adapter(path: Path | str, reader: Reader, weight: float = 1.0) -> Adapter:
    """Index an adapter directory; validate its config and group its keys per module."""
    adir = find_adapter_dir(Path(path))
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise AdapterError(
            f"{adir}: adapter weight {weight!r} is not a finite number", hint="pass PATH:WEIGHT with e.g. 0.5"
        )
    cfg = read_json(adir / CONFIG_NAME, CONFIG_NAME, AdapterError)
    check_config(cfg, adir / CONFIG_NAME)
    wfile, refs = load_weights(adir, reader)
    if not refs:
        raise AdapterError(f"{wfile}: holds no tensors")
    ad = Adapter(str(adir), wfile, weight, cfg, tensors=refs)
    parts = _group_keys(ad)
    mirrors: list[TensorRef] = []
    for module, slot in parts.items():
        if "token_adapter.trainable_tokens_delta" in slot:
            ref = slot.pop("token_adapter.trainable_tokens_delta")
            if _is_tied_mirror(cfg, module):
                mirrors.append(ref)
            else:
                ad.tokens[module] = TokenDelta(module, _token_indices(cfg, module, adir), ref)
            if not slot:
                continue
        owner, depth = _param_owner(module, cfg)
        if owner is not None:
            ad.params.setdefault(owner, []).append(_param_lora(wfile, owner, depth, module, slot))
        else:
            ad.modules[module] = _lora_module(ad, module, slot)
    _check_dora(ad, wfile)
    _check_tokens_not_saved_whole(ad, adir)
    for ref in mirrors:
        twin = next((t.values for t in ad.tokens.values() if t.values.shape == ref.shape), None)
        if twin is None:
            raise AdapterError(f"{wfile}: {ref.name!r} mirrors no trainable-tokens delta of the input embedding")
        ad.superseded[ref.name] = twin.name
    return ad


def _group_keys(ad: Adapter) -> dict[str, dict[str, TensorRef]]:
    """The LoRA tensors of each module (``lora_A``, ``lora_B``, ...); full saved layers are resolved into
    ``ad.replacements`` as PEFT's loader resolves their spellings."""
    parts: dict[str, dict[str, TensorRef]] = {}
    spellings: dict[str, dict[str, list[TensorRef]]] = {}
    for key, ref in ad.tensors.items():
        m = LORA_KEY.match(normalize(key))
        if m is None:
            kind, name = saved_layer(normalize(key))
            spellings.setdefault(name, {}).setdefault(kind, []).append(ref)
            continue
        part = m["part"] + (".bias" if m["param"] == "bias" else "")
        slot = parts.setdefault(m["module"], {})
        if part in slot:
            raise AdapterError(
                f"{ad.weights_file}: module {m['module']!r} has two {part} tensors ({slot[part].name!r}, {key!r})",
                hint="the file holds several adapters; save each adapter on its own",
            )
        slot[part] = ref
    for name, kinds in spellings.items():
        resolve_saved_layer(ad, name, kinds)
    return parts


def _lora_module(ad: Adapter, module: str, slot: dict[str, TensorRef]) -> LoraModule:
    """One wrapped layer's LoRA (linear or embedding), checked against the config's rank."""
    wfile, cfg = ad.weights_file, ad.config
    if "lora_A" in slot or "lora_B" in slot:
        kind, ka, kb = "linear", "lora_A", "lora_B"
    elif "lora_embedding_A" in slot or "lora_embedding_B" in slot:
        kind, ka, kb = "embedding", "lora_embedding_A", "lora_embedding_B"
    else:
        raise AdapterError(
            f"{wfile}: module {module!r} has {', '.join(slot)} but no lora_A/lora_B",
            hint="the adapter file is incomplete",
        )
    missing = [k for k in (ka, kb) if k not in slot]
    if missing:
        raise AdapterError(
            f"{wfile}: module {module!r} lacks {' and '.join(missing)}", hint="the adapter file is incomplete"
        )
    a, b = slot.pop(ka), slot.pop(kb)
    bias, magnitude = slot.pop("lora_B.bias", None), slot.pop("lora_magnitude_vector", None)
    if slot:
        raise AdapterError(
            f"{wfile}: module {module!r} has unexpected tensors: {', '.join(v.name for v in slot.values())}"
        )
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise AdapterError(
            f"{wfile}: {a.name} {list(a.shape)} and {b.name} {list(b.shape)} must both be 2-D",
            hint="convolutional LoRA layers are not supported",
        )
    r, alpha, scaling = ad.rank_alpha(module)
    if b.shape[1] != a.shape[0] or a.shape[0] != r:
        raise AdapterError(
            f"{wfile}: module {module!r}: {a.name} {list(a.shape)} and {b.name} {list(b.shape)} "
            f"do not have rank r={r} from {CONFIG_NAME}",
            hint="the config does not belong to these weights (check r and rank_pattern)",
        )
    for t in (a, b, bias, magnitude):
        if t is not None and t.dtype not in ("F16", "BF16", "F32", "F64"):
            raise AdapterError(f"{wfile}: {t.name} has dtype {t.dtype}; LoRA tensors must be floating point")
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False)) and kind == "linear"
    return LoraModule(module, kind, a, b, r, alpha, scaling, fan_in_fan_out, bias, magnitude)


def _check_dora(ad: Adapter, wfile: str) -> None:
    """``use_dora`` and the saved magnitudes must agree: PEFT's DoRA layers need every magnitude (a missing
    one would keep its initialisation), and without ``use_dora`` PEFT ignores saved magnitudes (a plain
    LoRA merge), which means the file and its config disagree."""
    dora = bool(ad.config.get("use_dora", False))
    if dora:
        missing = sorted(m for m, lm in ad.modules.items() if lm.magnitude is None)
        if missing:
            raise AdapterError(
                f"{wfile}: adapter_config.json sets use_dora=true but {len(missing)} module(s) have no "
                "lora_magnitude_vector",
                details=missing,
                hint="the adapter file is incomplete (PEFT would leave these magnitudes at their initialisation); "
                "save it again with PEFT's save_pretrained",
            )
    else:
        extra = sorted(m for m, lm in ad.modules.items() if lm.magnitude is not None)
        if extra:
            raise AdapterError(
                f"{wfile}: {len(extra)} module(s) have a DoRA lora_magnitude_vector but adapter_config.json "
                "sets use_dora=false (PEFT's loader would ignore the magnitudes)",
                details=extra,
                hint="set use_dora to true if this is a DoRA adapter, or remove the magnitudes",
            )


def _check_tokens_not_saved_whole(ad: Adapter, adir: Path) -> None:
    """Trainable tokens on a layer that ``modules_to_save`` also trains whole: PEFT builds a model whose
    forward raises ("TrainableTokensLayer wraps an unknown layer type") and whose merge keeps its wrappers,
    so there is no model to reproduce (found by the PEFT-oracle fuzz)."""
    saved = ad.config.get("modules_to_save") or []
    both = sorted(m for m in ad.tokens if any(m == s or m.endswith("." + s) for s in saved))
    if both:
        raise AdapterError(
            f"{adir / CONFIG_NAME}: 'modules_to_save' and 'trainable_token_indices' both train {', '.join(both)}: "
            "PEFT's model for this adapter cannot run (its forward raises) and its merge keeps the wrappers",
            hint="train the layer either whole (modules_to_save) or by token (trainable_token_indices), not both",
        )
