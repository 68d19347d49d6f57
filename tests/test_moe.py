"""MoE experts with PEFT's ``target_parameters`` LoRA (issue 12, case 2): Qwen3-MoE as transformers 5
saves it (per-expert 2-D tensors) and in its fused in-memory layout, and gpt-oss (fused [E, in, out]);
adapters written by PEFT, merged against PEFT's ``merge_and_unload``, output in the base's layout."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_matches_state_dict, logits, read_dir
from safetensors.torch import save_file

import streammerge
from streammerge.errors import AdapterError

IDS = torch.tensor([[1, 5, 17, 42, 99, 7]])
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _model(arch: str, dtype):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(
            hidden_size=64,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=160,
            max_position_embeddings=128,
        )
        model = tf.MixtralForCausalLM(cfg)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=160,
            max_position_embeddings=128,
        )
        model = tf.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = tf.GptOssConfig(
            vocab_size=160,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
            max_position_embeddings=128,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=False,
        )
        model = tf.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.to(dtype)


def _fixture(tmp_path, arch: str, dtype, **lora):
    """transformers-saved base; PEFT adapter with LoRA on attention and on the fused expert parameters."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    _model(arch, dtype).save_pretrained(base)
    kw = dict(r=4, lora_alpha=12, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj"])
    kw["target_parameters"] = EXPERTS
    kw.update(lora)
    torch.manual_seed(1)
    pm = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base, dtype=dtype), LoraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "ad")
    return base, tmp_path / "ad"


def _peft(base, ad, dtype):
    import transformers as tf
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(ad)).eval()
    unmerged = logits(pm, IDS)
    return pm.merge_and_unload().eval(), unmerged


@pytest.mark.parametrize(
    ("arch", "dtype", "stored"),
    [
        ("qwen3_moe", torch.float32, "model.layers.0.mlp.experts.0.gate_proj.weight"),
        ("qwen3_moe", torch.bfloat16, "model.layers.0.mlp.experts.0.gate_proj.weight"),
        ("mixtral", torch.bfloat16, "model.layers.0.block_sparse_moe.experts.0.w1.weight"),
    ],
)
def test_target_parameters_onto_per_expert_checkpoint(tmp_path, arch, dtype, stored):
    import transformers as tf

    base, ad = _fixture(tmp_path, arch, dtype)
    assert stored in read_dir(base)  # transformers-4 layout on disk
    out = tmp_path / "out"
    report = streammerge.merge(base, ad, out)
    ref, unmerged = _peft(base, ad, dtype)
    ref.save_pretrained(tmp_path / "ref")
    ours, theirs = read_dir(out), read_dir(tmp_path / "ref")
    assert set(ours) == set(theirs)
    assert_matches_state_dict(out, theirs)
    merged, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = logits(merged.eval(), IDS)
    assert torch.equal(got, logits(ref, IDS))
    assert (got - unmerged).abs().max() <= (1e-4 if dtype == torch.float32 else 0.1)
    experts = [m for m in report.modules if m["kind"] == "experts"]
    assert {m["module"].rsplit(".", 1)[1] for m in experts} == {"gate_up_proj", "down_proj"} and len(experts) == 4
    changed = [k for k in ours if ".experts." in k and not torch.equal(ours[k], read_dir(base)[k])]
    assert len(changed) == 2 * 4 * 3  # every expert's gate, up and down of both layers


def test_qwen3_moe_fused_checkpoint_merged_one_expert_block_at_a_time(tmp_path):
    """A checkpoint in the fused (transformers-5) layout: written fused, merged in expert blocks that fit
    a tiny budget, equal to PEFT's merge."""
    import transformers as tf

    base, ad = _fixture(tmp_path, "qwen3_moe", torch.bfloat16)
    fused = tmp_path / "fused"
    fused.mkdir()
    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, fused / "model.safetensors", {"format": "pt"})
    (fused / "config.json").write_text((base / "config.json").read_text())
    out = tmp_path / "out"
    rep = streammerge.merge(fused, ad, out, max_memory="64KiB", direct_io=False)
    ours = read_dir(out)
    assert ours["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 64)
    assert_matches_state_dict(out, _peft(base, ad, torch.bfloat16)[0].state_dict())
    one_expert = 64 * 64 * 4 * 7  # bytes of work memory for one gate_up expert
    assert rep.work_buffer_bytes < 4 * one_expert


def test_gpt_oss_fused_transposed_experts_and_router(tmp_path):
    """gpt-oss stores experts [E, in, out] (interleaved gate/up columns kept as stored); its router is a
    plain 2-D parameter (PEFT: a Linear-style update, cast to the weight dtype, then added)."""
    base, ad = _fixture(tmp_path, "gpt_oss", torch.bfloat16, target_parameters=[*EXPERTS, "mlp.router.weight"])
    out = tmp_path / "out"
    streammerge.merge(base, ad, out)
    ref, unmerged = _peft(base, ad, torch.bfloat16)
    ref.save_pretrained(tmp_path / "ref")
    assert set(read_dir(out)) == set(read_dir(tmp_path / "ref"))
    assert_matches_state_dict(out, read_dir(tmp_path / "ref"))
    import transformers as tf

    merged = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    assert (logits(merged, IDS) - unmerged).abs().max() <= 0.1


def test_expert_lora_that_fits_no_parameter_is_an_error(tmp_path):
    """An adapter for another expert count names the shapes it has and the ones the base offers."""
    from safetensors.torch import load_file

    base, ad = _fixture(tmp_path, "qwen3_moe", torch.float32)
    sd = load_file(ad / "adapter_model.safetensors")
    for k in [k for k in sd if "experts" in k and "lora_A" in k]:
        sd[k] = sd[k][:12]  # 3 experts' worth of rows
    for k in [k for k in sd if "experts" in k and "lora_B" in k]:
        sd[k] = sd[k][:, :12].contiguous()
    save_file(sd, ad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="fits the base's experts in no way") as e:
        streammerge.merge(base, ad, tmp_path / "out")
    assert "gate_up_proj: ['model.layers.0.mlp.experts.0.gate_proj.weight ... [64 x 64] x 4']" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_expert_lora_missing_for_one_layer_is_an_error(tmp_path):
    """PEFT would leave layer 1's expert LoRA at its random initialisation: refuse, naming it."""
    from safetensors.torch import load_file

    base, ad = _fixture(tmp_path, "qwen3_moe", torch.float32)
    sd = load_file(ad / "adapter_model.safetensors")
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.experts" not in k}, ad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="target_parameters") as e:
        streammerge.merge(base, ad, tmp_path / "out")
    assert "model.layers.1.mlp.experts.gate_up_proj: no LoRA tensors in the file" in str(e.value)


def test_square_experts_of_an_unknown_architecture_are_refused():
    """[E, out, in] or [E, in, out]? For square experts only the architecture can tell: never guessed."""
    from streammerge.experts import locate

    shapes = {"m.experts.gate_up_proj": (4, 64, 64)}
    assert len(locate("m.experts", "gate_up_proj", shapes, "qwen3_moe")) == 1
    assert locate("m.experts", "gate_up_proj", shapes, "gpt_oss")[0].transposed
    with pytest.raises(AdapterError, match="nothing here tells which"):
        locate("m.experts", "gate_up_proj", shapes, "new_moe")


_TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=160,
    max_position_embeddings=128,
)  # fmt: skip


def _everyday_config(arch: str):
    import transformers as tf

    experts = dict(num_experts_per_tok=2)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**_TINY, **experts, intermediate_size=128, moe_intermediate_size=32, num_experts=4)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **_TINY, **experts, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
            shared_expert_intermediate_size=48,
        )  # fmt: skip
    if arch == "olmoe":
        return tf.OlmoeConfig(**_TINY, **experts, intermediate_size=32, num_experts=4)
    if arch in ("mixtral", "phimoe"):
        cls = tf.MixtralConfig if arch == "mixtral" else tf.PhimoeConfig
        return cls(**_TINY, **experts, intermediate_size=32, num_local_experts=4)
    return tf.DeepseekV3Config(
        **_TINY, **experts, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1,
    )  # fmt: skip


GATE_UP_DOWN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("arch", "targets"),
    [
        ("qwen3_moe", GATE_UP_DOWN),
        ("qwen3_moe", "all-linear"),
        ("qwen2_moe", GATE_UP_DOWN),
        ("olmoe", GATE_UP_DOWN),
        ("deepseek_v3", MLA),
        ("deepseek_v3", "all-linear"),
        ("mixtral", ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]),
        ("mixtral", "all-linear"),
        ("phimoe", ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]),
        ("phimoe", "all-linear"),
    ],
)
def test_everyday_moe_recipe_merges_as_peft_does(tmp_path, arch, targets):
    """``LoraConfig(target_modules=[...projections...] or "all-linear")`` on a transformers-5 MoE model, saved
    by PEFT itself: PEFT moves the experts' projections into ``target_parameters`` as bare names (and the
    router as ``gate.weight``), or matches them only on the shared expert; merged as PEFT merges it."""
    import transformers as tf
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_everyday_config(arch))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "ad")
    streammerge.merge(tmp_path / "base", tmp_path / "ad", tmp_path / "out")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ref = PeftModel.from_pretrained(loaded, tmp_path / "ad").merge_and_unload()
    ref.save_pretrained(tmp_path / "ref")  # back in the checkpoint's key layout
    got, want = read_dir(tmp_path / "out"), read_dir(tmp_path / "ref")
    assert set(got) == set(want)
    assert [k for k in got if not torch.equal(got[k], want[k])] == []
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(merged, IDS), logits(ref, IDS))


def test_fused_expert_table_matches_transformers():
    """Every architecture streammerge treats as fusing its experts does so in transformers' conversion
    mapping, and the common MoE families are all listed."""
    from transformers import conversion_mapping as cm

    from streammerge.conversions import FUSED_EXPERTS

    mapping = cm._build_checkpoint_conversion_mapping()

    def fuses(model_type: str) -> bool:
        rules = mapping.get(model_type) or mapping.get(cm._MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), [])
        return any("experts.*." in p for r in rules for p in (getattr(r, "source_patterns", None) or []))

    assert sorted(t for t in FUSED_EXPERTS if not fuses(t)) == []
    common = {"qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "phimoe", "deepseek_v3", "glm4_moe", "minimax"}
    assert common <= FUSED_EXPERTS
