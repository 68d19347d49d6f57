"""What llama.cpp's ``convert_hf_to_gguf.py`` makes of a merged checkpoint, per architecture: which
tensors it keeps, their GGUF names (gguf-py's tensor name map), how their values change (the Q/K rope
permutation of llama-family models, Gemma's ``+1`` on norm weights, Gemma 3's vocabulary crop), the
GGUF type of each, the generated tensors, and the hyper-parameter keys. Pure functions of the merged
config and the plan's tensor list: the sink writes the header from them before a byte is merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InputError

SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
MULTIMODAL_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.")
MULTIMODAL_PARTS = ("visual.", "vision.", "audio.", "vision_", "audio_", "projector.", "patch_embed")


@dataclass(frozen=True)
class Arch:
    """How the converter treats one transformers architecture."""

    gguf: str  # gguf.MODEL_ARCH member
    vocab: str  # tokenizer path: llama, qwen2, gemma, gemma2, gemma3, phi3
    permute_qk: bool = False  # llama family: q/k rows from HF's rotate-half order to interleaved pairs
    norm_shift: bool = False  # Gemma: the stored norm weight is w, the model uses 1 + w
    skip_lm_head: bool = False  # Gemma 1/2: lm_head.weight is dropped
    crop_vocab: bool = False  # Gemma 3: token_embd keeps the tokenizer's rows only


ARCHS = {
    "LlamaForCausalLM": Arch("LLAMA", "llama", permute_qk=True),
    "MistralForCausalLM": Arch("LLAMA", "llama", permute_qk=True),
    "Qwen2ForCausalLM": Arch("QWEN2", "qwen2"),
    "Qwen3ForCausalLM": Arch("QWEN3", "qwen2"),
    "GemmaForCausalLM": Arch("GEMMA", "gemma", norm_shift=True, skip_lm_head=True),
    "Gemma2ForCausalLM": Arch("GEMMA2", "gemma2", norm_shift=True, skip_lm_head=True),
    "Gemma3ForCausalLM": Arch("GEMMA3", "gemma3", norm_shift=True, crop_vocab=True),
    "Phi3ForCausalLM": Arch("PHI3", "phi3"),
}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the file: its GGUF name, type and shape (numpy order), the merged tensor it comes
    from (or ``data`` for a generated one) and the changes on the way."""

    name: str
    qtype: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    nbytes: int
    source: str | None = None
    permute: int = 0  # rows per head for the rope permutation (0: none)
    shift: float = 0.0
    keep_rows: int | None = None  # only the first rows (vocabulary crop)
    data: bytes | None = field(default=None, repr=False)


@dataclass
class Model:
    """The merged model as the converter sees it."""

    hf_arch: str
    arch: Arch
    hparams: dict
    rope: dict
    block_count: int


def model_for(config: dict, where: str) -> Model:
    """The architecture of a merged config, or a refusal naming it and the supported ones."""
    hf = (config.get("architectures") or [None])[0]
    if hf not in ARCHS:
        raise InputError(
            f"{where}: GGUF output is not supported for {hf or 'a config without architectures'}",
            hint=f"supported: {', '.join(ARCHS)}; use --save-method merged_16bit and llama.cpp's converter",
        )
    hp = {**config, **config["text_config"]} if "text_config" in config else dict(config)
    n = find(hp, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
    return Model(hf, ARCHS[hf], hp, rope_parameters(hp), n)


def find(hp: dict, keys: list[str], optional: bool = False):
    """The first of ``keys`` the config holds (its value, even None), as the converter looks them up."""
    for k in keys:
        if k in hp:
            return hp[k]
    if optional:
        return None
    raise InputError(f"config.json: none of {keys} is set; the GGUF hyper-parameters need it")


def rope_parameters(hp: dict) -> dict:
    """The rope settings with the top-level ones mirrored in, as the converter normalises them."""
    rp = dict(hp.get("rope_parameters", hp.get("rope_scaling")) or {})
    if "full_attention" in rp or "sliding_attention" in rp:
        return rp
    theta = find(
        hp, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"], True
    )
    local = find(
        hp, ["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"], True
    )
    partial = find(hp, ["partial_rotary_factor", "rope_pct", "rope_percent"], True)
    orig = find(hp, ["original_max_position_embeddings"], True)
    if local is not None:
        rp["sliding_attention"] = {"rope_theta": local}
    if "rope_theta" not in rp and theta is not None:
        rp["rope_theta"] = theta
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    if "partial_rotary_factor" not in rp and partial is not None:
        rp["partial_rotary_factor"] = partial
    if "original_max_position_embeddings" not in rp and orig is not None:
        rp["original_max_position_embeddings"] = orig
    return rp  # fmt: skip


def file_type(gguf_type: str, first_dtype: str | None):
    """The converter's ``--outtype``: ``auto`` follows the first 2-D tensor's dtype (bf16, else f16)."""
    import gguf

    t = gguf.LlamaFileType
    if gguf_type == "auto":
        return t.MOSTLY_BF16 if first_dtype == "BF16" else t.MOSTLY_F16
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16, "q8_0": t.MOSTLY_Q8_0}[gguf_type]


def _kept(m: Model, name: str) -> str | None:
    """The name the converter reads a merged tensor under, or None when it drops the tensor."""
    if name.startswith(MULTIMODAL_PREFIXES) or any(p in name for p in MULTIMODAL_PARTS):
        return None
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    name = name.replace("language_model.", "")
    if m.arch.permute_qk:
        name = name.replace("text_model.", "")
    if m.arch.skip_lm_head and name == "lm_head.weight":
        return None
    return None if name.endswith(SKIP_SUFFIXES) else name


def _qtype(gname: str, n_dims: int, ftype, cols: int):
    import gguf

    q = gguf.GGMLQuantizationType
    if n_dims <= 1 or gname.endswith("_norm.weight") or gname[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return q.F32
    t = {"ALL_F32": q.F32, "MOSTLY_F16": q.F16, "MOSTLY_BF16": q.BF16, "MOSTLY_Q8_0": q.Q8_0}[ftype.name]
    block = gguf.GGML_QUANT_SIZES[t][0]
    return q.F16 if cols % block else t  # the converter's fallback when rows do not split into blocks


def nbytes(qtype, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def plan_tensors(m: Model, outputs: list[tuple[str, str, tuple[int, ...]]], ftype, vocab_rows: int | None):
    """The file's tensors in the converter's order: generated ones, then the merged ones in the order of
    the merged checkpoint. ``outputs``: (name, dtype, shape) of each merged tensor."""
    import gguf

    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, m.arch.gguf), m.block_count)
    tensors = extra_tensors(m)
    n_head = find(m.hparams, ["n_heads", "num_attention_heads"])
    n_kv = find(m.hparams, ["n_kv_heads", "num_key_value_heads"], optional=True) or n_head
    for name, _, shape in outputs:
        hf = _kept(m, name)
        if hf is None:
            continue
        gname = tmap.get_name(key=hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise InputError(f"{name}: llama.cpp has no {m.arch.gguf.lower()} tensor for it; cannot write GGUF")
        rows = shape[0] if shape else 1
        permute = 0
        if m.arch.permute_qk and hf.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            permute = rows // (n_head if "q_proj" in hf else n_kv)
        keep = None
        if m.arch.crop_vocab and "embed_tokens.weight" in hf and vocab_rows is not None:
            keep = min(vocab_rows, rows)
            shape = (keep, *shape[1:])
        shift = 1.0 if m.arch.norm_shift and hf.endswith("norm.weight") else 0.0
        q = _qtype(gname, len(shape), ftype, shape[-1] if shape else 1)
        t = GgufTensor(gname, int(q), tuple(shape), nbytes(q, shape), name, permute, shift, keep)
        tensors.append(t)
    return tensors


def extra_tensors(m: Model) -> list[GgufTensor]:
    """Generated tensors: Llama 3's rope frequency factors; Phi-3's long/short rope factors."""
    import numpy as np

    rp = m.rope.get("full_attention", m.rope)
    out = []

    def add(name: str, values) -> None:
        a = np.asarray(values, dtype=np.float32)
        out.append(GgufTensor(name, 0, a.shape, a.nbytes, data=a.tobytes()))

    if m.arch.gguf == "LLAMA" and rp and str(rp.get("rope_type", "")).lower() == "llama3":
        add("rope_freqs.weight", llama3_rope_factors(m.hparams, rp))
    if m.arch.gguf == "PHI3" and m.rope.get("long_factor"):
        add("rope_factors_long.weight", m.rope["long_factor"])
        add("rope_factors_short.weight", m.rope["short_factor"])
    return out


def llama3_rope_factors(hp: dict, rp: dict) -> list[float]:
    import torch

    base = rp.get("rope_theta", 10000.0)
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return [float(x) for x in out]


def vocab_rows(m: Model, d: Path) -> int | None:
    """Gemma 3: how many token_embd rows the converter keeps (the tokenizer's real vocabulary)."""
    if not m.arch.crop_vocab:
        return None
    from .vocab import _json, _pieces

    if (d / "tokenizer.model").is_file():
        return len(_pieces(d, find(m.hparams, ["vocab_size_per_layer_input", "vocab_size"], True))[0])
    tj = _json(d / "tokenizer.json")
    return len(tj.get("model", {}).get("vocab", {})) + len(tj.get("added_tokens", []))


def early_params(w, m: Model) -> None:
    """Keys the converter adds while generating tensors, before the others (Phi-3 LongRoPE)."""
    if m.arch.gguf != "PHI3" or not m.rope.get("long_factor"):
        return
    hp = m.hparams
    scale = find(hp, ["n_positions", "max_position_embeddings"]) / m.rope["original_max_position_embeddings"]
    orig = m.rope["original_max_position_embeddings"]
    kind = str(m.rope.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    elif kind == "yarn":
        w.add_rope_scaling_attn_factors(0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0)
    else:
        raise InputError(f"config.json: Phi-3 rope scaling {kind!r} is not one llama.cpp supports")


def write_params(w, m: Model, ftype) -> None:
    """The architecture's hyper-parameter keys, in the converter's order."""
    {"GEMMA": _gemma, "GEMMA2": _gemma2, "GEMMA3": _gemma3, "PHI3": _phi3}.get(m.arch.gguf, _text)(w, m, ftype)
    if m.arch.gguf == "LLAMA":
        w.add_vocab_size(m.hparams["vocab_size"])
        hp = m.hparams
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])


def _text(w, m: Model, ftype) -> None:
    """The keys every text model gets (the converter's ``TextModel.set_gguf_parameters``)."""
    hp, opt = m.hparams, True
    w.add_block_count(m.block_count)
    for keys, add in (
        (["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"],
         w.add_context_length),
        (["hidden_size", "n_embd", "dim"], w.add_embedding_length),
        (["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim"],
         w.add_feed_forward_length),
        (["num_attention_heads", "n_head", "n_heads"], w.add_head_count),
        (["num_key_value_heads", "n_kv_heads"], w.add_head_count_kv),
    ):  # fmt: skip
        if (v := find(hp, keys, opt)) is not None:
            add(v)
    if hp.get("is_causal") is False:
        w.add_causal_attention(False)
    rp = m.rope.get("full_attention", m.rope)
    _rope_scaling(w, rp)
    if (theta := rp.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local := m.rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    if (eps := find(hp, ["rms_norm_eps", "norm_eps"], opt)) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := find(hp, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"], opt)) is not None:
        w.add_layer_norm_eps(eps)
    if find(hp, ["num_local_experts", "num_experts", "n_routed_experts"], opt) is not None:
        raise InputError("config.json: mixture-of-experts models are not written to GGUF yet")
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(ftype)


def _rope_scaling(w, rp: dict) -> None:
    import gguf

    kind, factor = rp.get("rope_type"), rp.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            v = rp.get(key, rp.get("attn_factor")) if key == "attention_factor" else rp.get(key)
            if v is not None:
                add(v)
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)


def _gemma_common(w, m: Model, ftype) -> None:
    hp = m.hparams
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(m.block_count)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads", hp["num_attention_heads"]))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_file_type(ftype)


def _gemma(w, m: Model, ftype) -> None:
    _gemma_common(w, m, ftype)


def _gemma2(w, m: Model, ftype) -> None:
    _gemma_common(w, m, ftype)
    w.add_attn_logit_softcapping(m.hparams["attn_logit_softcapping"])
    w.add_final_logit_softcapping(m.hparams["final_logit_softcapping"])
    w.add_sliding_window(m.hparams["sliding_window"])


def _gemma3(w, m: Model, ftype) -> None:
    hp = m.hparams
    _text(w, m, ftype)
    w.add_context_length(hp.get("max_position_embeddings", 131072))
    w.add_head_count(hp.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    w.add_key_length(hp.get("head_dim", 256))
    w.add_value_length(hp.get("head_dim", 256))
    w.add_rope_freq_base(m.rope.get("full_attention", m.rope).get("rope_theta", 1_000_000.0))
    if hp.get("attn_logit_softcapping") is not None:
        raise InputError("config.json: Gemma 3 with attn_logit_softcapping is not a model llama.cpp reads")
    if cap := hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cap)
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])
    w.add_head_count_kv(hp.get("num_key_value_heads", 4))


def _phi3(w, m: Model, ftype) -> None:
    hp, rp = m.hparams, m.rope
    n_embd, n_head = find(hp, ["hidden_size", "n_embd"]), find(hp, ["num_attention_heads", "n_head"])
    if "original_max_position_embeddings" not in rp:
        raise InputError("config.json: Phi-3 needs original_max_position_embeddings for its GGUF rope keys")
    w.add_context_length(find(hp, ["n_positions", "max_position_embeddings"]))
    w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(find(hp, ["intermediate_size"]))
    w.add_block_count(m.block_count)
    w.add_head_count(n_head)
    w.add_head_count_kv(find(hp, ["num_key_value_heads", "n_head_kv"]))
    w.add_layer_norm_rms_eps(find(hp, ["rms_norm_eps"]))
    w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
    w.add_rope_freq_base(rp.get("full_attention", rp)["rope_theta"])
    w.add_file_type(ftype)
    w.add_sliding_window(hp.get("sliding_window") or 0)
