"""The merge plan: every output tensor, its updates and its shard, decided before any weight is read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .adapter import Adapter, LoraModule
from .errors import AdapterError, QuantError
from .index import (
    KeyMap,
    choose_keymap,
    find_input_embedding,
    find_quantized,
    is_tied,
    module_of,
    stray_quant_keys,
)
from .quant import parse_quant_state
from .source import CONFIG_DTYPE_NAME, DTYPES, FLOAT_DTYPES, Checkpoint, TensorRef, numel


@dataclass(frozen=True)
class LowRank:
    """``W += weight * transpose?(B @ A) * scaling``; ``round_delta`` rounds the delta to W's dtype first
    (PEFT's Embedding merge)."""

    a: TensorRef
    b: TensorRef
    scaling: float
    weight: float
    transposed: bool
    round_delta: bool
    origin: str


@dataclass(frozen=True)
class BiasDelta:
    """``bias += weight * lora_B.bias * scaling``."""

    vec: TensorRef
    scaling: float
    weight: float
    origin: str


@dataclass(frozen=True)
class Dora:
    """DoRA: ``W = (m / ||W0 + dW||) * (W0 + dW)``, norms per output row (``embedding``: per column)."""

    a: TensorRef
    b: TensorRef
    magnitude: TensorRef
    scaling: float
    fan_in_fan_out: bool
    embedding: bool
    origin: str


@dataclass(frozen=True)
class RowReplace:
    """Trainable tokens: rows ``indices`` take ``values`` (cast to the output dtype)."""

    indices: tuple[int, ...]
    values: TensorRef
    origin: str


Update = LowRank | BiasDelta | Dora | RowReplace


@dataclass(frozen=True)
class Quant4Source:
    """A bitsandbytes 4-bit weight: packed codes plus statistics, each possibly in another shard."""

    name: str
    dtype: str  # the dtype bitsandbytes dequantizes to (quant_state "dtype")
    shape: tuple[int, ...]
    packed: TensorRef
    absmax: TensorRef
    quant_map: TensorRef
    state: TensorRef
    quant_type: str
    blocksize: int
    nested_absmax: TensorRef | None = None
    nested_quant_map: TensorRef | None = None
    nested_blocksize: int = 256
    nested_offset: float = 0.0


@dataclass(frozen=True)
class Int8Source:
    """A bitsandbytes LLM.int8 weight: int8 rows and their fp32 scales."""

    name: str
    dtype: str  # the model dtype the dequantized weight is cast to
    shape: tuple[int, ...]
    cb: TensorRef
    scb: TensorRef
    weight_format: TensorRef | None = None


Source = TensorRef | Quant4Source | Int8Source


@dataclass(frozen=True)
class QuantOut:
    """Re-quantize this output to bitsandbytes 4-bit (``merged_4bit``)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its bytes come from and what is applied to them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Source
    updates: tuple[Update, ...] = ()
    note: str = ""
    quant: QuantOut | None = None

    @property
    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The tensors this job writes, in order: one, or a 4-bit weight and its companions."""
        if self.quant is None:
            return [(self.name, self.dtype, self.shape)]
        return quant4_layout(self.name, self.shape, self.quant)

    @property
    def nbytes(self) -> int:
        return sum(numel(s) * DTYPES[d][0] for _, d, s in self.outputs)

    @property
    def is_copy(self) -> bool:
        return (
            isinstance(self.source, TensorRef)
            and not self.updates
            and self.quant is None
            and self.dtype == self.source.dtype
            and self.shape == self.source.shape
        )


def quant4_layout(name: str, shape: tuple[int, ...], q: QuantOut) -> list[tuple[str, str, tuple[int, ...]]]:
    """Names, dtypes and shapes transformers writes for one 4-bit weight (uint8 storage)."""
    from .quant import QUANT_STATE_BYTES

    n = numel(shape)
    blocks = -(-n // q.blocksize)
    out = [(name, "U8", ((n + 1) // 2, 1)), (f"{name}.absmax", "U8" if q.double_quant else "F32", (blocks,))]
    out.append((f"{name}.quant_map", "F32", (16,)))
    if q.double_quant:
        out += [(f"{name}.nested_absmax", "F32", (-(-blocks // 256),)), (f"{name}.nested_quant_map", "F32", (256,))]
    out.append((f"{name}.quant_state.bitsandbytes__{q.quant_type}", "U8", (QUANT_STATE_BYTES,)))
    return out


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    jobs: tuple[TensorJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


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


@dataclass(frozen=True)
class MergeOptions:
    dtype: str = "auto"  # auto or a safetensors float dtype name
    shard_size: int = 5_000_000_000
    device: str = "auto"
    save_method: str = "merged_16bit"
    quant: QuantOut | None = None  # merged_4bit settings for a 16-bit base (None: the input's own)
    compress: int | None = None  # zstd level: write *.safetensors.zst shards (archival)
    checksum: str = "crc32"  # per-shard checksum in the journal and report: crc32 or sha256
    allow_nonfinite: bool = False
    block_bytes: int = 64 * 1024 * 1024
    direct_io: bool = True  # write plain shards with O_DIRECT where the filesystem allows it


@dataclass(frozen=True)
class MergePlan:
    shards: tuple[ShardPlan, ...]
    config: dict
    modules: tuple[ModuleRecord, ...]
    notes: tuple[str, ...] = ()
    merged_onto: str = "16-bit weights"

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def jobs(self) -> list[TensorJob]:
        return [j for s in self.shards for j in s.jobs]


def logical_tensors(
    ckpt: Checkpoint, read_bytes: Callable[[TensorRef], bytes]
) -> tuple[dict[str, Source], dict[str, QuantOut]]:
    """The checkpoint as the model sees it: bitsandbytes weights grouped with their companion tensors
    (by keys, not module names) and given their dequantized shape and dtype. Also returns the input's
    4-bit settings per weight (for ``merged_4bit``)."""
    four, int8 = find_quantized(ckpt.tensors)
    stray = stray_quant_keys(ckpt.tensors, four, int8)
    if stray:
        raise QuantError(
            f"{ckpt.path}: {len(stray)} quantization tensor(s) belong to no quantized weight",
            details=stray,
            hint="the checkpoint is incomplete (a shard missing?) or was saved by an unsupported tool",
        )
    t = ckpt.tensors
    consumed: set[str] = set()
    sources: dict[str, Source] = {}
    settings: dict[str, QuantOut] = {}
    for w, parts in four.items():
        missing = [p for p in ("weight", "absmax", "quant_map") if p not in parts or parts[p] not in t]
        if missing:
            raise QuantError(f"{ckpt.path}: 4-bit weight {w!r} lacks {', '.join(missing)}")
        state = parse_quant_state(read_bytes(t[parts["quant_state"]]), f"{ckpt.path}: {parts['quant_state']}")
        nested = "nested_absmax" in parts
        if nested != ("nested_quant_map" in parts) or nested != ("nested_offset" in state):
            raise QuantError(f"{ckpt.path}: {w!r} has an incomplete double-quantization state")
        shape = tuple(state["shape"])
        n, bs = numel(shape), state["blocksize"]
        blocks = -(-n // bs)
        packed, absmax = t[parts["weight"]], t[parts["absmax"]]
        want_absmax = ("U8" if nested else "F32", blocks)
        if packed.nbytes != (n + 1) // 2 or (absmax.dtype, absmax.numel) != want_absmax:
            raise QuantError(
                f"{ckpt.path}: 4-bit weight {w!r} of shape {list(shape)}: packed {packed.nbytes} bytes "
                f"(expected {(n + 1) // 2}), absmax {absmax.dtype}[{absmax.numel}] (expected "
                f"{want_absmax[0]}[{blocks}])",
                hint="the quant_state does not match the stored tensors; the checkpoint is corrupt",
            )
        sources[w] = Quant4Source(
            w,
            FLOAT_NAMES[state["dtype"]],
            shape,
            packed,
            absmax,
            t[parts["quant_map"]],
            t[parts["quant_state"]],
            state["quant_type"],
            bs,
            t.get(parts.get("nested_absmax", "")),
            t.get(parts.get("nested_quant_map", "")),
            int(state.get("nested_blocksize", 256)),
            float(state.get("nested_offset", 0.0)),
        )
        settings[w] = QuantOut(state["quant_type"], bs, nested)
        consumed.update(parts.values())
    model_dtype = config_dtype(ckpt.config) or "F16"
    for w, parts in int8.items():
        cb, scb = t.get(parts["weight"]), t[parts["SCB"]]
        if cb is None or cb.dtype != "I8" or len(cb.shape) != 2 or scb.shape != (cb.shape[0],) or scb.dtype != "F32":
            found = f"{cb.dtype} {list(cb.shape)}" if cb else "nothing"
            raise QuantError(
                f"{ckpt.path}: 8-bit weight {w!r}: expected int8 [out, in] with F32 SCB [out], found "
                f"{found} and SCB {scb.dtype} {list(scb.shape)}"
            )
        sources[w] = Int8Source(w, model_dtype, cb.shape, cb, scb, t.get(parts.get("weight_format", "")))
        consumed.update(parts.values())
    out: dict[str, Source] = {}
    for name, ref in t.items():
        if name in sources:
            out[name] = sources[name]
        elif name not in consumed:
            out[name] = ref
    return out, settings


FLOAT_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def config_dtype(config: dict) -> str | None:
    """The model dtype config.json declares (``dtype`` or ``torch_dtype``, also under ``text_config``)."""
    for cfg in (config, config.get("text_config") or {}):
        name = cfg.get("dtype", cfg.get("torch_dtype")) if isinstance(cfg, dict) else None
        if isinstance(name, str) and name in FLOAT_NAMES:
            return FLOAT_NAMES[name]
    return None


def compute_dtype(config: dict) -> str | None:
    """``bnb_4bit_compute_dtype`` of a quantized checkpoint, if any."""
    name = (config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype")
    return FLOAT_NAMES.get(name) if isinstance(name, str) else None


def quantizable(name: str, shape: tuple[int, ...], embed_key: str | None) -> bool:
    """For a 16-bit base written as ``merged_4bit``: the Linear weights inside the layer stack (not
    embeddings, the output head, norms or MoE routers): the modules transformers would quantize."""
    mod, param = module_of(name)
    last = mod.rsplit(".", 1)[-1]
    return (
        param == "weight"
        and len(shape) == 2
        and name != embed_key
        and any(part.isdigit() for part in mod.split("."))
        and last not in ("gate", "router", "lm_head")
        and "norm" not in last
        and "embed" not in last
    )


def layout_shards(jobs: list[TensorJob], shard_size: int) -> list[list[TensorJob]]:
    """Greedy in order: start a new shard when the next tensor would pass ``shard_size``."""
    shards: list[list[TensorJob]] = [[]]
    size = 0
    for j in jobs:
        if shards[-1] and size + j.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(j)
        size += j.nbytes
    return [s for s in shards if s] or [[]]


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _shape_error(ad: Adapter, lm: LoraModule, base: str, base_shape, detail: str) -> AdapterError:
    return AdapterError(
        f"{ad.weights_file}: module {lm.module!r} does not fit base tensor {base!r} {list(base_shape)}: {detail}",
        hint="the adapter was trained on a different model (check base_model_name_or_path in adapter_config.json)",
    )


def _lora_updates(
    ad: Adapter, lm: LoraModule, base: str, shape: tuple[int, ...], names: set[str], bias_updates: dict
) -> list[Update]:
    """Check shapes and build the updates one LoRA module contributes to ``base``."""
    a, b = lm.a.shape, lm.b.shape
    if len(shape) != 2:
        raise _shape_error(ad, lm, base, shape, "LoRA needs a 2-D weight")
    if lm.kind == "linear":
        out_f, in_f = (shape[1], shape[0]) if lm.fan_in_fan_out else shape
        if b[0] != out_f or a[1] != in_f:
            layout = "[in, out] (fan_in_fan_out)" if lm.fan_in_fan_out else "[out, in]"
            raise _shape_error(
                ad,
                lm,
                base,
                shape,
                f"{lm.a.name} {list(a)} and {lm.b.name} {list(b)} imply {layout} = "
                f"{[a[1], b[0]] if lm.fan_in_fan_out else [b[0], a[1]]}",
            )
    else:
        if a[1] != shape[0] or b[0] != shape[1]:
            raise _shape_error(
                ad, lm, base, shape, f"{lm.a.name} {list(a)} and {lm.b.name} {list(b)} imply [{a[1]}, {b[0]}]"
            )
    if lm.magnitude is not None:
        rows = shape[1] if (lm.kind == "embedding" or lm.fan_in_fan_out) else shape[0]
        if lm.magnitude.shape != (rows,):
            raise _shape_error(ad, lm, base, shape, f"{lm.magnitude.name} {list(lm.magnitude.shape)} != [{rows}]")
        if ad.weight != 1.0:
            raise AdapterError(
                f"{ad.path}: DoRA adapters cannot be merged with a weight ({ad.weight:g})",
                hint="DoRA rescales the whole weight; pass the adapter without :WEIGHT",
            )
        upd: list[Update] = [
            Dora(lm.a, lm.b, lm.magnitude, lm.scaling, lm.fan_in_fan_out, lm.kind == "embedding", ad.path)
        ]
    else:
        upd = [
            LowRank(
                lm.a,
                lm.b,
                lm.scaling,
                ad.weight,
                lm.kind == "embedding" or lm.fan_in_fan_out,
                lm.kind == "embedding",
                ad.path,
            )
        ]
    if lm.bias is not None:
        bias_name = module_of(base)[0] + ".bias"
        if bias_name not in names:
            raise AdapterError(
                f"{ad.weights_file}: {lm.bias.name} is a LoRA bias (lora_bias=true) but base module "
                f"{module_of(base)[0]!r} has no bias",
                hint="the adapter was trained on a different model",
            )
        bias_updates.setdefault(bias_name, []).append((ad, lm))
    return upd


def build_plan(
    ckpt: Checkpoint, adapters: list[Adapter], opts: MergeOptions, read_bytes: Callable[[TensorRef], bytes]
) -> MergePlan:
    """Match every adapter tensor to the base, check shapes, and lay out the output shards."""
    logical, qsettings = logical_tensors(ckpt, read_bytes)
    names = set(logical)
    shapes = {n: t.shape for n, t in logical.items()}
    base_modules = {module_of(n)[0] for n in names}
    embed_key = find_input_embedding(shapes)
    tied = embed_key is not None and is_tied(ckpt.config, names)
    out_key = "lm_head.weight"
    special = {"lm_head"} if tied else set()
    updates: dict[str, list[Update]] = {}
    replaced: dict[str, tuple[Adapter, TensorRef]] = {}
    bias_updates: dict[str, list] = {}
    records: list[ModuleRecord] = []
    notes: list[str] = []
    untie = False

    for ad in adapters:
        mods = list(ad.modules) + list(ad.tokens) + [module_of(n)[0] for n in ad.replacements]
        km = choose_keymap(mods, base_modules, special)
        unmatched: list[str] = []
        keys: set[str] = set()

        def base_name(module: str, param: str = "weight", km: KeyMap = km) -> str | None:
            b = km.to_base(module)
            if b is None:
                return None
            name = f"{b}.{param}"
            if name in names:
                return name
            if tied and b == "lm_head" and param == "weight":
                return embed_key
            return None

        for name, ref in ad.replacements.items():
            mod, param = module_of(name)
            base = base_name(mod, param)
            target = base
            if base is None:
                b = km.to_base(mod)
                if tied and b == "lm_head" and param == "weight":
                    target = out_key  # modules_to_save on a tied lm_head: written as its own tensor
                else:
                    unmatched.append(ref.name)
                    continue
            elif tied and base == embed_key and name not in ad.base_layer_copies:
                untie = True  # modules_to_save on one side of a tie gives it its own tensor
                if mod.endswith("lm_head"):
                    target = out_key
            if target in replaced and replaced[target][0] is ad and name in ad.base_layer_copies:
                keys.add(ref.name)  # PEFT saved the shared tensor of a tie twice (embed_tokens and lm_head)
                continue
            if target in replaced:
                raise AdapterError(
                    f"{target!r} is replaced by both {replaced[target][0].path} and {ad.path}",
                    hint="two adapters cannot both replace a full module (modules_to_save); merge them separately",
                )
            if target == out_key and out_key not in names:
                untie = True
            base_shape = shapes.get(target, shapes.get(embed_key) if target == out_key else None)
            if base_shape is not None and len(ref.shape) != len(base_shape):
                raise AdapterError(
                    f"{ad.weights_file}: {ref.name} {list(ref.shape)} cannot replace {target!r} {list(base_shape)}",
                    hint="the adapter was trained on a different model",
                )
            resized_vocab = (
                base_shape is not None
                and len(ref.shape) == 2
                and ref.shape[1:] == base_shape[1:]
                and _is_vocab(target, embed_key)
            )
            if base_shape is not None and ref.shape != base_shape and not resized_vocab:
                raise AdapterError(
                    f"{ad.weights_file}: {ref.name} {list(ref.shape)} cannot replace {target!r} {list(base_shape)}",
                    hint="only embedding/lm_head rows may differ (a resized vocabulary)",
                )
            replaced[target] = (ad, ref)
            keys.add(ref.name)
            records.append(ModuleRecord(ad.path, mod, target, "replace", 0, 0.0, 0.0, 1.0))
        # ensure_weight_tying: PEFT adds a tied lm_head LoRA that mirrors the embedding LoRA. Both land on
        # the one shared tensor, and PEFT's merge adds the delta twice; the unmerged model applies it once.
        mirrored_tie = (
            tied
            and bool(ad.config.get("ensure_weight_tying"))
            and any(lm.kind == "embedding" and base_name(m) == embed_key for m, lm in ad.modules.items())
        )
        for mod, lm in ad.modules.items():
            base = base_name(mod)
            if base is None:
                unmatched += [lm.a.name, lm.b.name] + [t.name for t in (lm.bias, lm.magnitude) if t]
                continue
            if mirrored_tie and base == embed_key and lm.kind == "linear":
                keys.update(t.name for t in (lm.a, lm.b, lm.bias, lm.magnitude) if t)
                notes.append(
                    f"ensure_weight_tying: {mod} mirrors the tied embedding's LoRA; its update is applied once "
                    "(PEFT's merge_and_unload applies it twice, which changes the model's outputs)"
                )
                continue
            if base in replaced and replaced[base][1].shape != shapes[base]:
                shape = replaced[base][1].shape
            else:
                shape = shapes[base]
            updates.setdefault(base, []).extend(_lora_updates(ad, lm, base, shape, names, bias_updates))
            keys.update(t.name for t in (lm.a, lm.b, lm.bias, lm.magnitude) if t)
            records.append(
                ModuleRecord(
                    ad.path, mod, base, "dora" if lm.magnitude else lm.kind, lm.r, lm.alpha, lm.scaling, ad.weight
                )
            )
            if base == embed_key and tied and mod.endswith("lm_head"):
                notes.append(
                    f"{mod}: tied to {embed_key}; the LoRA update goes into that shared tensor, so it also changes "
                    "the input embedding (as in PEFT's merge_and_unload)"
                )
        for mod, td in ad.tokens.items():
            base = base_name(mod)
            if base is None:
                unmatched.append(td.values.name)
                continue
            updates.setdefault(base, []).append(RowReplace(td.indices, td.values, ad.path))
            keys.add(td.values.name)
            records.append(ModuleRecord(ad.path, mod, base, "tokens", 0, 0.0, 0.0, 1.0))
        if unmatched:
            raise AdapterError(
                f"{ad.weights_file}: {len(unmatched)} of {len(ad.tensors)} adapter tensor(s) match no tensor of "
                f"the base {ckpt.path}",
                details=sorted(unmatched),
                hint="the adapter was trained on a different model, or the base checkpoint uses other tensor names",
            )
        _check_targets_present(ad, km, base_modules)
        unused = set(ad.tensors) - keys
        if unused:
            raise AdapterError(
                f"{ad.weights_file}: {len(unused)} adapter tensor(s) would not be used", details=sorted(unused)
            )
    for bias_name, items in bias_updates.items():
        for ad, lm in items:
            if lm.bias.shape != shapes[bias_name]:
                raise AdapterError(
                    f"{ad.weights_file}: {lm.bias.name} {list(lm.bias.shape)} does not fit {bias_name!r} "
                    f"{list(shapes[bias_name])}"
                )
            updates.setdefault(bias_name, []).append(BiasDelta(lm.bias, lm.scaling, ad.weight, ad.path))

    for name, ups in updates.items():
        if any(isinstance(u, Dora) for u in ups) and sum(isinstance(u, (Dora, LowRank)) for u in ups) > 1:
            raise AdapterError(
                f"{name!r}: a DoRA update cannot be combined with other LoRA updates on the same tensor",
                hint="merge the DoRA adapter on its own, then merge the others onto its output",
            )

    target_dtype = None if opts.dtype == "auto" else opts.dtype
    # 4-bit weights dequantize to the compute dtype (as transformers' dequantize() with it); int8
    # weights to the model dtype
    dequant_dtype = target_dtype or compute_dtype(ckpt.config)
    four_bit_out = opts.save_method == "merged_4bit"
    jobs: list[TensorJob] = []

    def out_dtype(src: Source) -> str:
        if isinstance(src, Quant4Source):
            return dequant_dtype or src.dtype
        if isinstance(src, Int8Source):
            return target_dtype or src.dtype
        if target_dtype and src.dtype in FLOAT_DTYPES:
            return target_dtype
        return src.dtype

    def quant_for(name: str, src: Source, shape: tuple[int, ...]) -> QuantOut | None:
        if not four_bit_out:
            return None
        if isinstance(src, Quant4Source):
            return opts.quant or qsettings[name]
        if quantizable(name, shape, embed_key):
            return opts.quant or QuantOut()
        return None

    def job_for(name: str, base_ref: Source | None) -> TensorJob:
        src = base_ref
        note = ""
        if name in replaced:
            ad, src = replaced[name]
            note = f"replaced by {ad.path}"
            dtype = out_dtype(base_ref) if base_ref is not None else out_dtype(logical[embed_key])
        else:
            dtype = out_dtype(src)
        ups = tuple(updates.get(name, ()))
        if ups and dtype not in FLOAT_DTYPES:
            raise AdapterError(f"base tensor {name!r} has dtype {dtype}; LoRA can only update float tensors")
        _check_rows(name, src.shape, ups)
        quant = quant_for(name, base_ref if base_ref is not None else src, src.shape) if dtype in FLOAT_DTYPES else None
        return TensorJob(name, dtype, src.shape, src, ups, note, quant)

    for name, ref in logical.items():
        jobs.append(job_for(name, ref))
    if untie and out_key not in names:
        if out_key in replaced:
            jobs.append(job_for(out_key, None))
        else:
            base_job = next(j for j in jobs if j.name == embed_key)
            src = logical[embed_key]
            ups = tuple(u for u in updates.get(embed_key, ()))
            jobs.append(TensorJob(out_key, base_job.dtype, src.shape, src, ups, f"untied copy of {embed_key}"))
        notes.append("tie_word_embeddings set to false: input and output embeddings now differ")

    n4 = sum(isinstance(s, Quant4Source) for s in logical.values())
    n8 = sum(isinstance(s, Int8Source) for s in logical.values())
    config = dict(ckpt.config)
    if n4 or n8:
        kind = f"{n4} bitsandbytes 4-bit" if n4 else f"{n8} bitsandbytes 8-bit"
        notes.append(
            f"base holds {kind} weights: merged onto their dequantized values (what a QLoRA adapter was trained "
            "against); to merge onto full-precision weights instead, pass the original 16-bit checkpoint as BASE"
        )
    config.pop("quantization_config", None)
    out_float = target_dtype or (dequant_dtype if n4 else None) or (config_dtype(ckpt.config) if n8 else None)
    if out_float:
        _set_config_dtype(config, out_float)
    if four_bit_out:
        qjobs = [j for j in jobs if j.quant is not None]
        if not qjobs:
            raise QuantError(f"{ckpt.path}: --save-method merged_4bit found no Linear weight to quantize")
        q = qjobs[0].quant
        skipped = sorted(
            {module_of(j.name)[0] for j in jobs if j.quant is None and len(j.shape) == 2 and j.name != embed_key}
        )
        config["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": q.quant_type,
            "bnb_4bit_use_double_quant": q.double_quant,
            "bnb_4bit_compute_dtype": CONFIG_DTYPE_NAME[qjobs[0].dtype],
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": skipped or None,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }
        if len({(j.quant.quant_type, j.quant.blocksize, j.quant.double_quant) for j in qjobs}) > 1:
            raise QuantError(f"{ckpt.path}: weights use different 4-bit settings; pass --quant-type/--blocksize")
        notes.append(
            f"merged_4bit: {len(qjobs)} weights re-quantized to {q.quant_type} (blocksize {q.blocksize}, double "
            f"quant {q.double_quant}); re-quantizing after a merge loses precision: prefer merged_16bit for quality"
        )
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"] = dict(config["text_config"], tie_word_embeddings=False)
    vocab = _new_vocab(jobs, embed_key, logical)
    if vocab is not None:
        tgt = (
            config["text_config"]
            if "vocab_size" not in config and isinstance(config.get("text_config"), dict)
            else config
        )
        if tgt.get("vocab_size") != vocab:
            notes.append(f"vocab_size {tgt.get('vocab_size')} -> {vocab} (resized embeddings from the adapter)")
            tgt["vocab_size"] = vocab
    groups = layout_shards(jobs, opts.shard_size)
    suffix = ".zst" if opts.compress is not None else ""
    shards = tuple(
        ShardPlan(fname + suffix, tuple(g)) for fname, g in zip(shard_names(len(groups)), groups, strict=True)
    )
    onto = "16-bit weights"
    if n4:
        onto = f"dequantized bitsandbytes 4-bit weights ({n4} tensors)"
    elif n8:
        onto = f"dequantized bitsandbytes 8-bit weights ({n8} tensors)"
    return MergePlan(shards, config, tuple(records), tuple(notes), onto)


def _is_vocab(target: str, embed_key: str | None) -> bool:
    mod = module_of(target)[0]
    return target == embed_key or mod.endswith(OUTPUT_NAMES)


OUTPUT_NAMES = ("lm_head", "embed_out")


def _new_vocab(jobs: list[TensorJob], embed_key: str | None, logical: dict[str, Source]) -> int | None:
    for j in jobs:
        if j.name == embed_key and j.shape != logical[embed_key].shape:
            return j.shape[0]
    return None


def _check_rows(name: str, shape: tuple[int, ...], ups: tuple[Update, ...]) -> None:
    for u in ups:
        if isinstance(u, RowReplace):
            bad = [i for i in u.indices if i >= shape[0]]
            if bad or u.values.shape != (len(u.indices), *shape[1:]):
                raise AdapterError(
                    f"{u.origin}: trainable tokens for {name!r} {list(shape)}: values {list(u.values.shape)} "
                    f"for {len(u.indices)} indices" + (f", indices out of range: {bad[:10]}" if bad else ""),
                    hint="trainable_token_indices in adapter_config.json does not match the stored tensor",
                )


def _set_config_dtype(config: dict, dtype: str) -> None:
    name = CONFIG_DTYPE_NAME[dtype]
    present = [k for k in ("dtype", "torch_dtype") if k in config]
    for k in present or ["torch_dtype"]:
        config[k] = name
    if isinstance(config.get("text_config"), dict):
        for k in ("dtype", "torch_dtype"):
            if k in config["text_config"]:
                config["text_config"] = dict(config["text_config"], **{k: name})


def _check_targets_present(ad: Adapter, km: KeyMap, base_modules: set[str]) -> None:
    """A module the config targets but the file lacks would keep PEFT's random init: an error."""
    import re

    targets = ad.config.get("target_modules")
    if not targets or targets == "all-linear":
        return
    have = set(ad.modules)
    layers = ad.config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    exclude = ad.config.get("exclude_modules")
    missing = []
    lora_like = set(have)
    for bm in sorted(base_modules):
        pm = km.to_peft(bm)
        if pm is None:
            continue
        if isinstance(targets, str):
            hit = re.fullmatch(targets, pm) is not None
        else:
            hit = any(pm == t or pm.endswith("." + t) for t in targets)
        if not hit:
            continue
        if exclude:
            if isinstance(exclude, str):
                if re.fullmatch(exclude, pm):
                    continue
            elif any(pm == t or pm.endswith("." + t) for t in exclude):
                continue
        if layers:
            m = re.search(r"\.(\d+)\.", pm)
            if m is None or int(m.group(1)) not in layers:
                continue
        if pm not in lora_like:
            missing.append(pm)
    if missing:
        raise AdapterError(
            f"{ad.weights_file}: adapter_config.json targets {len(missing)} module(s) that have no LoRA tensors",
            details=missing,
            hint="PEFT would leave these at random initialisation; the adapter file is incomplete or the "
            "config belongs to another adapter",
        )
