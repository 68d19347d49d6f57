"""Quantized bases (bitsandbytes 4-bit and 8-bit) and the save methods merged_4bit and lora."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_matches_state_dict, build_adapter, build_model, logits, read_dir, sample_ids, save_base

import streammerge
from streammerge.formats import bnb4, bnb8
from streammerge.sinks import bnb4 as bnb4_sink

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")
tf = pytest.importorskip("transformers")

SHAPES = [(64, 96), (96, 64), (33, 50), (128, 256), (7, 4096)]


def bnb_reference(packed, state, dtype=None):
    """bitsandbytes' own pure-torch 4-bit dequantization (its "default" backend), without torch.compile.
    bnb's native CPU kernel is not used as a reference: it is wrong for some shapes on some CPUs."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = bnbf.get_4bit_type(state.quant_type, device="cpu")
    return compute(
        packed.reshape(-1).view(torch.uint8),
        absmax.float(),
        code,
        state.blocksize,
        list(state.shape),
        dtype or state.dtype,
    )


@pytest.fixture
def reference_kernel(monkeypatch):
    """Make transformers' dequantize() use bitsandbytes' reference kernel (see ``bnb_reference``)."""
    real = bnbf.dequantize_4bit

    def patched(A, quant_state=None, *args, **kwargs):
        if quant_state is None:
            return real(A, quant_state, *args, **kwargs)
        return bnb_reference(A, quant_state)

    monkeypatch.setattr(bnbf, "dequantize_4bit", patched)


def _ours(packed, state, shape, dtype):
    parts = state.as_dict(packed=True)
    absmax = parts["absmax"]
    if state.nested:
        absmax = bnb4.dequantize_absmax(
            absmax, parts["nested_absmax"], parts["nested_quant_map"], state.offset.item(), state.state2.blocksize
        )
    n = shape[0] * shape[1]
    flat = packed.reshape(-1).view(torch.uint8)
    vals = bnb4.dequantize_4bit_range(flat, absmax.float(), parts["quant_map"], state.blocksize, 0, n)
    return vals.reshape(shape).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_dequantize_matches_bitsandbytes_reference(shape, quant_type, double, blocksize):
    """Bit for bit equal to bitsandbytes' reference (pure torch) kernel, for every output dtype."""
    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1] + blocksize + double)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double, quant_type=quant_type)
        ours = _ours(packed, state, shape, dtype)
        assert torch.equal(ours, bnb_reference(packed, state))
        # bnb's native CPU kernel agrees wherever it is right; record where it is not
        native = bnbf.dequantize_4bit(packed, state)
        if not torch.equal(native, ours):
            NATIVE_WRONG.append((shape, quant_type, blocksize))
            assert (native.float() - w.float()).abs().max() > (ours.float() - w.float()).abs().max()


NATIVE_WRONG: list = []


def test_row_blocks_dequantize_identically():
    w = torch.randn(37, 96) * 0.1
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    full = _ours(packed, state, (37, 96), torch.float32)
    parts = state.as_dict(packed=True)
    absmax = bnb4.dequantize_absmax(
        parts["absmax"], parts["nested_absmax"], parts["nested_quant_map"], state.offset.item(), 256
    )
    flat = packed.reshape(-1)
    pieces = [
        bnb4.dequantize_4bit_range(flat, absmax, parts["quant_map"], 64, r * 96, min(37, r + 5) * 96)
        for r in range(0, 37, 5)
    ]
    assert torch.equal(torch.cat(pieces).reshape(37, 96), full)


def test_int8_matches_bitsandbytes():
    w = torch.randn(40, 96, dtype=torch.float16)
    cb, scb, _ = bnbf.int8_vectorwise_quant(w)
    assert torch.equal(bnb8.dequantize_int8_rows(cb, scb), bnbf.int8_vectorwise_dequant(cb, scb))


@pytest.fixture(scope="module")
def q_models(tmp_path_factory):
    """A bf16 Llama (down_proj is [64, 96]: in % 16 == 0, in % 64 != 0), its transformers-saved
    4-bit nf4 double-quant, fp4 and 8-bit versions, and an adapter on every projection."""
    root = tmp_path_factory.mktemp("q")
    model = build_model("llama", torch.bfloat16, intermediate_size=96)
    base16 = save_base(model, root / "b16")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ad = build_adapter(model, root / "ad", r=4, lora_alpha=8, target_modules=targets)
    out = {"b16": base16, "ad": ad}
    configs = [
        (
            "nf4",
            tf.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            torch.bfloat16,
        ),
        (
            "fp4",
            tf.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="fp4",
                bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.float16,
            ),
            torch.float16,
        ),
        ("int8", tf.BitsAndBytesConfig(load_in_8bit=True), torch.float16),
    ]
    for name, qc, dt in configs:
        q = tf.AutoModelForCausalLM.from_pretrained(base16, quantization_config=qc, dtype=dt)
        q.save_pretrained(root / name)
        out[name] = root / name
    return out


def _reference(qdir, ad, dtype):
    """transformers' load + dequantize() + PEFT's merge."""
    from peft import PeftModel

    m = tf.AutoModelForCausalLM.from_pretrained(qdir)
    m = m.dequantize(dtype=dtype)
    return PeftModel.from_pretrained(m, str(ad)).merge_and_unload()


@pytest.mark.parametrize(("name", "dtype"), [("nf4", torch.bfloat16), ("fp4", torch.float16), ("int8", torch.float16)])
def test_merged_16bit_from_quantized_matches_transformers_dequantize_plus_peft(
    q_models, tmp_path, name, dtype, reference_kernel
):
    out = tmp_path / "out"
    report = streammerge.merge(q_models[name], q_models["ad"], out)
    assert "dequantized" in report.merged_onto
    ref = _reference(q_models[name], q_models["ad"], dtype)
    assert_matches_state_dict(out, ref.state_dict())
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged = tf.AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == dtype
    ids = sample_ids(160)
    assert torch.equal(logits(merged, ids), logits(ref, ids))


def _quantize_sd(model, quant_type, blocksize, double, storage):
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("_proj.weight"):
            packed, state = bnbf.quantize_4bit(
                v.contiguous(),
                blocksize=blocksize,
                compress_statistics=double,
                quant_type=quant_type,
                quant_storage=storage,
            )
            out[k] = (packed, state)
        else:
            out[k] = v.contiguous()
    return out


def _handmade_4bit(root, model, q, quant_type, blocksize, double, shards=3):
    """The transformers key layout written by hand, with pieces of each module spread over shards."""
    from safetensors.torch import save_file

    flat = {}
    for k, v in q.items():
        if isinstance(v, tuple):
            flat[k] = v[0]
            for suf, t in v[1].as_dict(packed=True).items():
                flat[f"{k}.{suf}"] = t
        else:
            flat[k] = v
    root.mkdir()
    groups: dict[int, list[str]] = {}
    for i, n in enumerate(flat):  # round-robin: a module's pieces land in different shards
        groups.setdefault(i % shards, []).append(n)
    wm = {}
    for s, ns in groups.items():
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: flat[n] for n in ns}, root / fname, metadata={"format": "pt"})
        wm.update(dict.fromkeys(ns, fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.mark.parametrize(
    ("quant_type", "blocksize", "double", "storage"),
    [
        ("nf4", 64, True, torch.uint8),
        ("fp4", 128, False, torch.uint8),
        ("nf4", 4096, True, torch.uint8),
        ("nf4", 64, False, torch.bfloat16),
    ],
)
def test_handmade_layouts_spread_over_shards(q_models, tmp_path, quant_type, blocksize, double, storage):
    from peft import PeftModel

    model = build_model("llama", torch.bfloat16, intermediate_size=96)
    q = _quantize_sd(model, quant_type, blocksize, double, storage)
    base = _handmade_4bit(tmp_path / "q", model, q, quant_type, blocksize, double)
    out = tmp_path / "out"
    streammerge.merge(base, q_models["ad"], out, max_memory=1)
    got = read_dir(out)
    # reference: each weight dequantized by bitsandbytes' reference kernel, then PEFT's LoRA merge
    deq = {k: bnb_reference(*v) if isinstance(v, tuple) else v for k, v in q.items()}
    ref_model = build_model("llama", torch.bfloat16, intermediate_size=96)
    ref_model.load_state_dict(deq)
    ref = PeftModel.from_pretrained(ref_model, str(q_models["ad"])).merge_and_unload().state_dict()
    for k, v in got.items():
        assert torch.equal(v, ref[k]), k


def test_merged_4bit_loads_in_transformers_and_tracks_peft(tmp_path):
    """merged_4bit vs PEFT's in-memory merge onto the 4-bit model (which re-quantizes too): both are
    re-quantizations of the same merged weights, so their logits differ by re-quantization noise; we
    require that difference to stay within the noise 4-bit quantization itself adds (logits of the
    dense merged model vs PEFT's re-quantized one), with 50% slack."""
    from peft import PeftModel

    model = build_model("llama", torch.bfloat16, intermediate_size=128)
    b16 = save_base(model, tmp_path / "b16")
    ad = build_adapter(model, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    qc = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    q4 = tf.AutoModelForCausalLM.from_pretrained(b16, quantization_config=qc, dtype=torch.bfloat16)
    q4.save_pretrained(tmp_path / "nf4")
    # shapes here are multiples of the blocksize: bitsandbytes' CPU forward fails on PEFT's in-memory
    # re-quantized [64, 96] weights
    q_models = {"nf4": tmp_path / "nf4", "ad": ad}
    out = tmp_path / "out4"
    report = streammerge.merge(q_models["nf4"], q_models["ad"], out, save_method="merged_4bit")
    assert any("less precise" in w for w in report.warnings)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["load_in_4bit"] and cfg["bnb_4bit_quant_type"] == "nf4" and cfg["bnb_4bit_use_double_quant"]
    ours = tf.AutoModelForCausalLM.from_pretrained(out)
    assert type(ours.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    peft4 = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(q_models["nf4"]), str(q_models["ad"]))
    peft4 = peft4.merge_and_unload()
    dense = streammerge.merge(q_models["nf4"], q_models["ad"], tmp_path / "out16")
    assert dense.total_size > report.total_size
    merged16 = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out16")
    ids = sample_ids(160)
    a, b, c = logits(ours, ids), logits(peft4, ids), logits(merged16, ids)
    noise = (b - c).abs().max().item()
    assert noise > 0
    assert (a - b).abs().max().item() <= 1.5 * noise
    assert (a - c).abs().max().item() <= 1.5 * noise


def test_merged_4bit_from_16bit_base_with_flags(q_models, tmp_path):
    out = tmp_path / "o"
    streammerge.merge(
        q_models["b16"],
        q_models["ad"],
        out,
        save_method="merged_4bit",
        quant_type="fp4",
        blocksize=128,
        double_quant=False,
    )
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["bnb_4bit_quant_type"] == "fp4" and cfg["bnb_4bit_use_double_quant"] is False
    m = tf.AutoModelForCausalLM.from_pretrained(out)
    assert type(m.model.layers[1].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(m.lm_head).__name__ == "Linear"
    st = read_dir(out)
    state = json.loads(bytes(st["model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__fp4"].numpy()))
    assert state["blocksize"] == 128 and state["shape"] == [64, 96]
    assert state["dtype"] == "bfloat16"  # the weight's dtype, though bitsandbytes was handed fp32 values


def test_whole_tensor_budget_warnings_are_one_per_cause(q_models, tmp_path):
    rep = streammerge.merge(
        q_models["b16"], q_models["ad"], tmp_path / "o", save_method="merged_4bit", max_memory="100KB"
    )
    over = [w for w in rep.warnings if "whole tensors at once" in w]
    n_quantized = sum(1 for k in read_dir(tmp_path / "o") if k.endswith(".quant_state.bitsandbytes__nf4"))
    assert len(over) == 1 and over[0].startswith("merged_4bit re-quantization")
    assert f": {n_quantized} tensor(s)" in over[0] and "MiB left of the budget" in over[0]


def test_save_method_lora_round_trips_bin_adapter(q_models, tmp_path):
    """A .bin adapter with adapter-named keys becomes a safetensors adapter PEFT loads, equal to the input."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file

    src = tmp_path / "bin_ad"
    src.mkdir()
    shutil.copy(q_models["ad"] / "adapter_config.json", src)
    sd = load_file(q_models["ad"] / "adapter_model.safetensors")
    renamed = {k.replace(".lora_A.weight", ".lora_A.default.weight"): v for k, v in sd.items()}
    torch.save(renamed, src / "adapter_model.bin")
    out = tmp_path / "norm"
    streammerge.merge(q_models["b16"], src, out, save_method="lora")
    assert (out / "adapter_model.safetensors").exists() and not (out / "adapter_model.bin").exists()
    got = load_file(out / "adapter_model.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(q_models["b16"]), str(out))
    ref = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(q_models["b16"]), str(q_models["ad"]))
    ids = sample_ids(160)
    assert torch.equal(logits(pm, ids), logits(ref, ids))


def test_quantized_checkpoint_missing_piece(q_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "b"
    shutil.copytree(q_models["nf4"], base)
    sd = load_file(base / "model.safetensors")
    del sd["model.layers.0.mlp.down_proj.weight.absmax"]
    save_file(sd, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(streammerge.QuantError, match=r"down_proj\.weight"):
        streammerge.merge(base, q_models["ad"], tmp_path / "out")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize(
    ("n", "blocksize", "storage"),
    [
        (64 * 96, 64, torch.uint8),
        (1000 * 33 + 7, 128, torch.uint8),
        (3 * 4096 + 64, 4096, torch.bfloat16),
        (304, 32, torch.float32),
    ],
)
def test_quantize_4bit_equals_bitsandbytes(quant_type, double, n, blocksize, storage):
    """Our CPU kernel (bucketize replaced by counting) gives bitsandbytes' bytes, ties and specials included."""
    assert bnb4_sink._bnb_cpu_kernel_is_bucketize()  # the installed bitsandbytes is the one reproduced
    g = torch.Generator().manual_seed(n + blocksize)
    w = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()
    w[:blocksize] = 0.0  # an all-zero block
    w[blocksize : blocksize + 5] = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-40, -0.0])
    code = bnbf.get_4bit_type(quant_type, device="cpu")
    mids = (code[torch.argsort(code)][:-1] + code[torch.argsort(code)][1:]) / 2
    w[2 * blocksize : 3 * blocksize] = 0.0
    w[2 * blocksize : 2 * blocksize + 15] = mids  # values exactly on the boundaries (ties)
    w[2 * blocksize + 15] = 1.0  # this block's absmax: the scaled values are the values themselves
    ours, ours_parts = bnb4_sink.quantize_4bit(
        w.view(1, -1) if n % 2 else w.view(2, -1), blocksize, quant_type, double, storage
    )
    ref, state = bnbf.quantize_4bit(
        w.view(1, -1) if n % 2 else w.view(2, -1),
        blocksize=blocksize,
        compress_statistics=double,
        quant_type=quant_type,
        quant_storage=storage,
    )
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))
    ref_parts = state.as_dict(packed=True)
    for k, v in ref_parts.items():
        if k.startswith("quant_state."):
            assert bytes(ours_parts[k].numpy()).rstrip(b" ") == bytes(v.numpy())
        else:
            assert torch.equal(ours_parts[k].view(torch.uint8), v.contiguous().view(torch.uint8)), k


def test_other_adapter_types_on_a_quantized_base_are_refused(q_models, tmp_path):
    """(IA)^3, LoHa, LoKr and AdaLoRA have no parity test against transformers' dequantization + PEFT yet:
    on a 4-bit base they are refused by name, with nothing written."""
    from peft import IA3Config, get_peft_model

    from streammerge.errors import AdapterError

    model = build_model("llama", torch.bfloat16, intermediate_size=96)
    pm = get_peft_model(model, IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    pm.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterError, match="Scale update onto a quantized weight is not supported"):
        streammerge.merge(q_models["nf4"], tmp_path / "ia3", tmp_path / "out")
    assert not (tmp_path / "out").exists()
