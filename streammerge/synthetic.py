"""Synthetic Llama-shaped checkpoints and adapters, built with the runtime dependencies only.

Used by ``make demo``, the benchmark and the memory tests. Shards are written one at a time, so a
checkpoint larger than RAM can be built.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_synthetic_llama(
    root: Path,
    hidden: int,
    inter: int,
    layers: int,
    vocab: int,
    kv_heads: int,
    heads: int,
    shards: int = 4,
    r: int = 16,
    dtype=torch.bfloat16,
    seed: int = 0,
    fp8: bool = False,
) -> tuple[Path, Path]:
    """Write a Llama-shaped checkpoint to ``root/base`` and an r-rank LoRA adapter on all 7 projections
    of every layer to ``root/adapter`` (PEFT's file layout); returns both paths. ``fp8``: the projections
    stored FP8 e4m3 in blocks of 128 (transformers' FP8 quantizer arithmetic), as DeepSeek / Qwen FP8
    checkpoints are."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    proj = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    for i in range(layers):
        for k, s in proj.items():
            shapes[f"model.layers.{i}.{k}.weight"] = s
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    base, ad = root / "base", root / "adapter"
    base.mkdir(parents=True)
    ad.mkdir(parents=True)
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for si in range(shards):
        fname = f"model-{si + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(dtype) for n in names[si * per : (si + 1) * per]}
        if fp8:
            part = _to_fp8(part)
        save_file(part, base / fname, metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        del part
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
    }
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        cfg["quantization_config"]["weight_block_size"] = [128, 128]
    (base / "config.json").write_text(json.dumps(cfg))
    _write_lora(ad, proj, layers, r, g)
    return base, ad


def _write_lora(ad: Path, proj: dict, layers: int, r: int, g: torch.Generator) -> None:
    """An adapter in PEFT's file layout on every projection ``proj`` (module -> (out, in)) of each layer."""
    from safetensors.torch import save_file

    lora = {}
    for i in range(layers):
        for k, (o, n_in) in proj.items():
            m = f"base_model.model.model.layers.{i}.{k}"
            lora[f"{m}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.01
            lora[f"{m}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
    save_file(lora, ad / "adapter_model.safetensors")
    targets = [k.split(".")[-1] for k in proj]
    acfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": targets}
    acfg.update(lora_dropout=0.0, bias="none")
    (ad / "adapter_config.json").write_text(json.dumps(acfg))


def _to_fp8(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer projections of a shard as FP8 weights and their block scales (the merged_fp8 encoder)."""
    from .execute import Workspace
    from .sinks.fp8 import Fp8Encoding

    enc, ws, out = Fp8Encoding((128, 128)), Workspace(), {}
    for name, t in part.items():
        if t.dim() == 2 and ".layers." in name:
            out.update((k, v.clone()) for k, v in enc.encode(name, t, ws, 0, t.shape[0]))
        else:
            out[name] = t
    return out


def write_synthetic_moe(
    root: Path, hidden: int, inter: int, experts: int, layers: int, vocab: int = 1024, r: int = 8, seed: int = 0
) -> tuple[Path, Path]:
    """A Qwen3-MoE-shaped bf16 checkpoint with FUSED experts (``mlp.experts.gate_up_proj`` [E, 2I, H],
    ``down_proj`` [E, H, I], the transformers-5 layout) in one shard per layer, and a target_parameters
    adapter in PEFT's file layout (the layout the PEFT parity tests check: the inner wrapper
    ``experts.base_layer.lora_*`` is gate_up_proj, the outer ``experts.lora_*`` down_proj)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base, ad = root / "base", root / "adapter"
    base.mkdir(parents=True)
    ad.mkdir(parents=True)

    def rand(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total, lora = {}, 0, {}
    for i in range(layers):
        p = f"model.layers.{i}"
        part = {
            f"{p}.mlp.experts.gate_up_proj": rand(experts, 2 * inter, hidden),
            f"{p}.mlp.experts.down_proj": rand(experts, hidden, inter),
            f"{p}.mlp.gate.weight": rand(experts, hidden),
            f"{p}.input_layernorm.weight": rand(hidden),
        }
        if i == 0:
            part["model.embed_tokens.weight"] = rand(vocab, hidden)
        if i == layers - 1:
            part["model.norm.weight"] = rand(hidden)
            part["lm_head.weight"] = rand(vocab, hidden)
        fname = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        save_file(part, base / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * 2 for t in part.values())
        del part
        m = f"base_model.model.{p}.mlp.experts"
        for wrapper, n_in, n_out in ((".base_layer", hidden, 2 * inter), ("", inter, hidden)):
            lora[f"{m}{wrapper}.lora_A.weight"] = torch.randn(experts * r, n_in, generator=g) * 0.01
            lora[f"{m}{wrapper}.lora_B.weight"] = torch.randn(n_out, experts * r, generator=g) * 0.01
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden}
    cfg.update(moe_intermediate_size=inter, num_experts=experts, num_hidden_layers=layers, vocab_size=vocab)
    cfg.update(dtype="bfloat16", tie_word_embeddings=False)
    (base / "config.json").write_text(json.dumps(cfg))
    save_file(lora, ad / "adapter_model.safetensors")
    acfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0}
    acfg.update(target_modules=[], target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])
    (ad / "adapter_config.json").write_text(json.dumps(acfg))
    return base, ad
