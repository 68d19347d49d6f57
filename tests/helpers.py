"""Builders for tiny random models and PEFT adapters, and comparison helpers (test-only)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=160)


def tiny_config(arch: str, **over):
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(**TINY, num_key_value_heads=2)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**TINY, num_key_value_heads=2)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**TINY, num_key_value_heads=2)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16)
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**TINY, num_key_value_heads=2, head_dim=16)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=16, sliding_window=32)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**TINY, num_key_value_heads=2, head_dim=16, sliding_window=32)
        cfg.architectures = ["Gemma3ForCausalLM"]
    elif arch == "phi3":
        cfg = tf.Phi3Config(**TINY, num_key_value_heads=4, pad_token_id=0)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=160, n_positions=64)
    elif arch == "bert":
        cfg = tf.BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=160,
            max_position_embeddings=64,
        )
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def build_model(arch: str, dtype=torch.float32, seed: int = 0, **over):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **over)
    cls = tf.BertModel if arch == "bert" else tf.AutoModelForCausalLM
    model = cls.from_config(cfg) if arch != "bert" else cls(cfg)
    # random, non-trivial values everywhere (norm weights and biases too)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype).eval()


def save_base(model, path: Path, shard: str | None = None) -> Path:
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return path


def build_adapter(model, path: Path, seed: int = 1, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    cfg = LoraConfig(**lora_kwargs)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "token_adapter" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(path)
    # unwrap so the caller's model is reusable
    pm.unload()
    return path


def load_base(path: Path, dtype=None):
    import transformers as tf

    cfg = json.loads((Path(path) / "config.json").read_text())
    cls = tf.BertModel if cfg.get("model_type") == "bert" else tf.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype) if dtype else cls.from_pretrained(path)


def peft_merged(base: Path, adapters: list[Path], dtype=None):
    """PEFT's reference: load base, load adapter(s), merge_and_unload()."""
    from peft import PeftModel

    model = load_base(base, dtype)
    pm = PeftModel.from_pretrained(model, str(adapters[0]))
    return pm.merge_and_unload().eval()


def peft_unmerged(base: Path, adapter: Path, dtype=None):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base, dtype), str(adapter)).eval()


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(str(Path(path) / "*.safetensors"))):
        with safe_open(f, "pt") as g:
            for k in g.keys():
                out[k] = g.get_tensor(k)
    return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in units in the last place between two float tensors of the same dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if not a.is_floating_point():
        return 0 if torch.equal(a, b) else 2**31
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    ia, ib = a.contiguous().view(ints).long(), b.contiguous().view(ints).long()
    # map sign-magnitude to a monotonic integer line
    bits = torch.finfo(a.dtype).bits
    ia = torch.where(ia < 0, -(ia & ((1 << (bits - 1)) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << (bits - 1)) - 1)), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def assert_matches_state_dict(out_dir: Path, ref_sd: dict[str, torch.Tensor], skip_missing=()) -> dict[str, int]:
    """Every tensor we wrote equals PEFT's merged tensor bit for bit; returns the ulp table."""
    ours = read_dir(out_dir)
    dist = {}
    for k, v in ours.items():
        assert k in ref_sd, f"we wrote {k} which the reference lacks"
        dist[k] = ulp_distance(v, ref_sd[k].detach().contiguous())
    missing = [k for k in ref_sd if k not in ours and k not in skip_missing]
    # CPU results are bit-identical; CUDA's matmul may differ in the last bit (scripts/gpu_check.py sets 1)
    allowed = int(os.environ.get("STREAMMERGE_MAX_ULP", "0"))
    worst = {k: d for k, d in dist.items() if d > allowed}
    assert not worst, f"ulp distances: {worst}"
    return {"missing": missing, **dist}


def sample_ids(vocab: int, n: int = 12, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, n), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


LOGIT_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def merge_and_compare(tmp_path: Path, base: Path, adapter: Path, dtype, *, unmerged_tol=None, **merge_kw):
    """Merge with streammerge and hold it to PEFT: every tensor equal to merge_and_unload()'s, the
    output loads in transformers with PEFT's merged logits, and the unmerged PEFT model's logits
    within a dtype-sized tolerance. Returns (report, out dir, loaded merged model)."""
    import streammerge

    out = tmp_path / "out"
    report = streammerge.merge(base, adapter, out, **merge_kw)
    ref = peft_merged(base, [adapter], dtype=dtype)
    assert_matches_state_dict(out, ref.state_dict(), skip_missing={"lm_head.weight"})
    merged = load_base(out)
    assert merged.dtype == dtype
    ids = sample_ids(merged.config.vocab_size)
    got = logits(merged, ids)
    assert torch.equal(got, logits(ref, ids)), "same weights must give the same logits"
    unmerged = logits(peft_unmerged(base, adapter, dtype=dtype), ids)
    tol = unmerged_tol if unmerged_tol is not None else LOGIT_TOL[dtype]
    assert (got - unmerged).abs().max().item() <= tol, (got - unmerged).abs().max().item()
    return report, out, merged


def build_tuner_adapter(model, path: Path, config, seed: int, scale: float) -> Path:
    """An adapter of any PEFT tuner type, saved by PEFT itself, its trainable tensors perturbed by
    ``scale`` times a normal draw (so it is no identity)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    pm.save_pretrained(path)
    pm.unload()
    return path
