"""The merge plan: every output tensor, its updates, its encoding and its shard, decided before any
weight is read (from headers, configs and the adapter's keys)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import formats
from .adapters import Adapter, load_adapter
from .errors import AdapterError
from .formats import Source
from .match import OUT_KEY, Match, ModuleRecord, match_adapters
from .options import MergeOptions
from .outputs import output
from .source import CONFIG_DTYPE_NAME, DTYPES, FLOAT_DTYPES, Checkpoint, TensorRef, numel, open_checkpoint
from .updates import Dora, LowRank, RowReplace, Update

__all__ = ["Dora", "LowRank", "MergePlan", "ShardPlan", "TensorJob", "build_plan", "plan_merge"]


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its bytes come from, what is applied to them, and how it is stored
    (``encoding``: None for a plain tensor of ``dtype``, else an output format's encoding)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Source
    updates: tuple[Update, ...] = ()
    note: str = ""
    encoding: object | None = None

    @property
    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The tensors this job writes, in order: one, or an encoded weight and its companions."""
        if self.encoding is None:
            return [(self.name, self.dtype, self.shape)]
        return self.encoding.outputs(self.name, self.shape)

    @property
    def nbytes(self) -> int:
        return sum(numel(s) * DTYPES[d][0] for _, d, s in self.outputs)

    @property
    def is_copy(self) -> bool:
        return (
            formats.is_dense(self.source)
            and not self.updates
            and self.encoding is None
            and self.dtype == self.source.dtype
            and self.shape == self.source.shape
        )


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    jobs: tuple[TensorJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


@dataclass(frozen=True)
class MergePlan:
    shards: tuple[ShardPlan, ...]
    config: dict
    modules: tuple[ModuleRecord, ...]
    notes: tuple[str, ...] = ()
    merged_onto: str = "16-bit weights"
    warnings: tuple[str, ...] = ()

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def jobs(self) -> list[TensorJob]:
        return [j for s in self.shards for j in s.jobs]

    @property
    def digest(self) -> str:
        """sha256 of the output layout: every shard's tensors with their dtypes and shapes."""
        layout = [[s.filename, [[o[0], o[1], list(o[2])] for j in s.jobs for o in j.outputs]] for s in self.shards]
        return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def plan_merge(
    base: str | Path, adapters: list[tuple[str, float]], opts: MergeOptions, reader
) -> tuple[Checkpoint, list[Adapter], MergePlan]:
    """Open the base and the adapters (headers only) and plan their merge."""
    ckpt = open_checkpoint(base)
    ads = [load_adapter(p, reader, w) for p, w in adapters]
    return ckpt, ads, build_plan(ckpt, ads, opts, lambda ref: bytes(reader.raw(ref)))


def build_plan(
    ckpt: Checkpoint, adapters: list[Adapter], opts: MergeOptions, read_bytes: Callable[[TensorRef], bytes]
) -> MergePlan:
    """Match every adapter tensor to the base, check shapes, and lay out the output shards."""
    logical = formats.logical_tensors(ckpt, read_bytes)
    match = match_adapters({n: s.shape for n, s in logical.items()}, ckpt.config, adapters, ckpt.path)
    jobs = _jobs(logical, match, opts)
    notes = list(match.notes)
    if match.untie:
        notes.append("tie_word_embeddings set to false: input and output embeddings now differ")
    config, onto = _config(ckpt, logical, jobs, match, opts, notes)
    groups = layout_shards(jobs, opts.shard_size)
    suffix = ".zst" if opts.compress is not None else ""
    names = shard_names(len(groups))
    shards = tuple(ShardPlan(fname + suffix, tuple(g)) for fname, g in zip(names, groups, strict=True))
    return MergePlan(shards, config, tuple(match.records), tuple(notes), onto, tuple(match.warnings))


def _out_dtype(src: Source, target: str | None) -> str:
    """A quantized source dequantizes to its model dtype; a float one keeps its dtype; ``--dtype`` wins."""
    if not formats.is_dense(src):
        return target or src.out_dtype
    if target and src.dtype in FLOAT_DTYPES:
        return target
    return src.dtype


def _jobs(logical: dict[str, Source], match: Match, opts: MergeOptions) -> list[TensorJob]:
    target = None if opts.dtype == "auto" else opts.dtype
    choose = output(opts.save_method).encoding_for
    embed_key = match.embed_key

    def job_for(name: str, base_src: Source | None) -> TensorJob:
        src, note = base_src, ""
        if name in match.replaced:
            ad, src = match.replaced[name]
            note = f"replaced by {ad.path}"
        dtype = _out_dtype(base_src if base_src is not None else logical[embed_key], target)
        ups = tuple(match.updates.get(name, ()))
        if ups and dtype not in FLOAT_DTYPES:
            raise AdapterError(f"base tensor {name!r} has dtype {dtype}; LoRA can only update float tensors")
        check_rows(name, src.shape, ups)
        if not formats.is_dense(src) and not all(u.on_quantized for u in ups):
            kinds = sorted({type(u).__name__ for u in ups if not u.on_quantized})
            raise AdapterError(
                f"{name!r} is stored {src.label}: merging a {'/'.join(kinds)} update onto a quantized weight is not "
                "supported yet (no parity test against PEFT's dequantize + merge)",
                hint="merge onto the 16-bit base, or dequantize the base first",
            )
        enc = None
        if choose is not None and dtype in FLOAT_DTYPES:
            enc = choose(name, base_src if base_src is not None else src, src.shape, embed_key, opts)
        return TensorJob(name, dtype, src.shape, src, ups, note, enc)

    jobs = [job_for(name, src) for name, src in logical.items()]
    if match.untie and OUT_KEY not in logical:
        if OUT_KEY in match.replaced:
            jobs.append(job_for(OUT_KEY, None))
        elif OUT_KEY in match.updates:  # LoRA on the output side of a tie: the shared base, its own update
            src = match.replaced[embed_key][1] if embed_key in match.replaced else logical[embed_key]
            dtype = next(j for j in jobs if j.name == embed_key).dtype
            ups = tuple(match.updates[OUT_KEY])
            jobs.append(TensorJob(OUT_KEY, dtype, src.shape, src, ups, f"untied from {embed_key}"))
        else:
            base_job = next(j for j in jobs if j.name == embed_key)
            src = logical[embed_key]
            ups = tuple(match.updates.get(embed_key, ()))
            jobs.append(TensorJob(OUT_KEY, base_job.dtype, src.shape, src, ups, f"untied copy of {embed_key}"))
    return jobs


def _config(ckpt: Checkpoint, logical: dict, jobs: list[TensorJob], match: Match, opts, notes: list) -> tuple:
    """config.json of the output, and what the merge was made onto."""
    config = dict(ckpt.config)
    counts = formats.quantized_counts(logical)
    present = [f for f in formats.FORMATS if f.LABEL in counts]
    onto = "16-bit weights"
    if present:
        n, label = counts[present[0].LABEL], present[0].LABEL
        notes.append(
            f"base holds {n} {label} weights: merged onto their dequantized values (what a QLoRA adapter was "
            "trained against); to merge onto full-precision weights instead, pass the original 16-bit "
            "checkpoint as BASE"
        )
        onto = f"dequantized {label} weights ({n} tensors)"
    config.pop("quantization_config", None)
    target = None if opts.dtype == "auto" else opts.dtype
    out_float = target or next((d for f in present if (d := f.dense_config_dtype(ckpt.config))), None)
    if out_float:
        set_config_dtype(config, out_float)
    edit = output(opts.save_method).edit_config
    if edit is not None:
        edit(config, ckpt.config, jobs, match.embed_key, ckpt.path, notes)
    if match.untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"] = dict(config["text_config"], tie_word_embeddings=False)
    _set_vocab(config, jobs, match.embed_key, logical, notes)
    return config, onto


def _set_vocab(config: dict, jobs: list[TensorJob], embed_key: str | None, logical: dict, notes: list) -> None:
    """A replaced embedding with more (or fewer) rows changes ``vocab_size``."""
    vocab = next((j.shape[0] for j in jobs if j.name == embed_key and j.shape != logical[embed_key].shape), None)
    if vocab is None:
        return
    nested = "vocab_size" not in config and isinstance(config.get("text_config"), dict)
    tgt = config["text_config"] if nested else config
    if tgt.get("vocab_size") != vocab:
        notes.append(f"vocab_size {tgt.get('vocab_size')} -> {vocab} (resized embeddings from the adapter)")
        tgt["vocab_size"] = vocab


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


def check_rows(name: str, shape: tuple[int, ...], ups: tuple[Update, ...]) -> None:
    """Trainable-token indices must fall inside the tensor, with one row of values each."""
    for u in ups:
        if isinstance(u, RowReplace):
            bad = [i for i in u.indices if i >= shape[0]]
            if bad or u.values.shape != (len(u.indices), *shape[1:]):
                raise AdapterError(
                    f"{u.origin}: trainable tokens for {name!r} {list(shape)}: values {list(u.values.shape)} "
                    f"for {len(u.indices)} indices" + (f", indices out of range: {bad[:10]}" if bad else ""),
                    hint="trainable_token_indices in adapter_config.json does not match the stored tensor",
                )


def set_config_dtype(config: dict, dtype: str) -> None:
    name = CONFIG_DTYPE_NAME[dtype]
    present = [k for k in ("dtype", "torch_dtype") if k in config]
    for k in present or ["torch_dtype"]:
        config[k] = name
    if isinstance(config.get("text_config"), dict):
        for k in ("dtype", "torch_dtype"):
            if k in config["text_config"]:
                config["text_config"] = dict(config["text_config"], **{k: name})
