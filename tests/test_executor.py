"""Fast paths against the simple path, bit for bit: row blocks under tiny budgets, the overlapped
writer, transposed (fan_in_fan_out / embedding) column blocks, and the out-of-memory fallbacks."""

from __future__ import annotations

import importlib
import json

import psutil
import pytest
import torch
from helpers import read_dir
from safetensors.torch import save_file

import streammerge
import streammerge.execute as execute_mod
import streammerge.pipeline as pipeline_mod
from streammerge.options import parse_memory


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory):
    """A base with tensors big enough to split into many blocks: a Linear [1000, 320], a Conv1D-style
    [320, 1300] (fan_in_fan_out) and an embedding [2000, 96], with LoRA on each."""
    root = tmp_path_factory.mktemp("wide")
    g = torch.Generator().manual_seed(0)
    base, ad = root / "base", root / "ad"
    base.mkdir()
    ad.mkdir()
    t = {
        "model.embed_tokens.weight": torch.randn(2000, 96, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(1000, 320, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.conv.weight": torch.randn(320, 1300, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(96, dtype=torch.bfloat16),
    }
    save_file(t, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    r = 8
    lora = {
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(r, 320, generator=g),
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(1000, r, generator=g),
        "base_model.model.model.layers.0.mlp.conv.lora_A.weight": torch.randn(r, 320, generator=g),
        "base_model.model.model.layers.0.mlp.conv.lora_B.weight": torch.randn(1300, r, generator=g),
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(r, 2000, generator=g),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(96, r, generator=g),
    }
    save_file(lora, ad / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "fan_in_fan_out": False, "target_modules": ["up_proj"]}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return base, ad, t, lora


def _no_conv(lora: dict) -> dict:
    """The wide fixture's adapter without its [in, out] conv module (which needs fan_in_fan_out)."""
    return {k: v for k, v in lora.items() if ".conv." not in k}


def _adapter_dir(root, tensors: dict, cfg, name: str = "ad2"):
    """An adapter directory under ``root``: ``tensors`` and ``cfg`` (a dict, or a directory whose
    adapter_config.json is reused)."""
    d = root / name
    d.mkdir()
    save_file(tensors, d / "adapter_model.safetensors")
    text = json.dumps(cfg) if isinstance(cfg, dict) else (cfg / "adapter_config.json").read_text()
    (d / "adapter_config.json").write_text(text)
    return d


def _dense_reference(t, lora):
    """PEFT's formulas on whole tensors."""
    s = 2.0
    p = "base_model.model.model."
    ref = dict(t)
    up, _conv = "layers.0.mlp.up_proj", "layers.0.mlp.conv"
    ref[f"model.{up}.weight"] = (
        t[f"model.{up}.weight"].float() + (lora[f"{p}{up}.lora_B.weight"] @ lora[f"{p}{up}.lora_A.weight"]) * s
    ).to(torch.bfloat16)
    # the conv module is [in, out] but this adapter's config says fan_in_fan_out=false for it, so it is
    # exercised through the embedding-like transposed path only via the embedding below
    emb = (lora[f"{p}embed_tokens.lora_embedding_B"] @ lora[f"{p}embed_tokens.lora_embedding_A"]).T * s
    ref["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] + emb.to(torch.bfloat16)
    return ref


def test_blocks_and_budgets_are_bit_identical(wide_pair, tmp_path):
    base, ad, t, lora = wide_pair
    lora_no_conv = _no_conv(lora)
    ad2 = _adapter_dir(tmp_path, lora_no_conv, ad)
    ref = _dense_reference(t, lora)
    outs = {}
    for budget in (1, "1MiB", "16MiB", "1GiB"):
        out = tmp_path / f"out_{budget}"
        rep = streammerge.merge(base, ad2, out, max_memory=budget)
        outs[budget] = read_dir(out)
        assert rep.work_buffer_bytes <= max(parse_memory(budget), 2**20) or budget == 1
    for budget, got in outs.items():
        for k, v in ref.items():
            assert torch.equal(got[k], v), (budget, k)


@pytest.mark.parametrize("tile", [64 * 4 * 320, 1 << 30])
def test_tiles_are_bit_identical_to_whole_blocks(wide_pair, tmp_path, monkeypatch, tile):
    """The L2-sized tiles (64 rows of the [1000, 320] weight here) against one tile per block, and both
    against the dense reference."""
    base, ad, t, lora = wide_pair
    ad2 = _adapter_dir(tmp_path, _no_conv(lora), ad)
    monkeypatch.setattr(execute_mod, "TILE_BYTES", tile)
    calls = []
    real = execute_mod.Executor._merge_tiles
    monkeypatch.setattr(execute_mod.Executor, "_merge_tiles", lambda self, *a: calls.append(1) or real(self, *a))
    streammerge.merge(base, ad2, tmp_path / "out", max_memory="1GiB")
    assert calls  # the tiled path ran
    got = read_dir(tmp_path / "out")
    for k, v in _dense_reference(t, lora).items():
        assert torch.equal(got[k], v), k


def test_fan_in_fan_out_column_blocks(wide_pair, tmp_path):
    """A GPT-2 ``Conv1D`` [in, out] too wide for one block (hand-written: a real GPT-2 this wide would not
    be tiny); PEFT honours fan_in_fan_out on Conv1D only, so the base is a gpt2 model."""
    _base, _ad, t, lora = wide_pair
    base = tmp_path / "gpt2"
    base.mkdir()
    weight = t["model.layers.0.mlp.conv.weight"]
    save_file({"h.0.mlp.c_fc.weight": weight}, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "tie_word_embeddings": False}))
    p = "base_model.model.model.layers.0.mlp.conv"
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "fan_in_fan_out": True, "target_modules": ["c_fc"]}
    tensors = {k.replace(p, "base_model.model.h.0.mlp.c_fc"): v for k, v in lora.items() if k.startswith(p)}
    ad3 = _adapter_dir(tmp_path, tensors, cfg, "ad3")
    want = (weight.float() + (lora[f"{p}.lora_B.weight"] @ lora[f"{p}.lora_A.weight"]).T * 2.0).to(torch.bfloat16)
    for budget in (1, "1GiB"):
        out = tmp_path / f"o{budget}"
        streammerge.merge(base, ad3, out, max_memory=budget)
        assert torch.equal(read_dir(out)["h.0.mlp.c_fc.weight"], want)


def test_accelerator_oom_halves_blocks_then_falls_back_to_cpu(wide_pair, tmp_path, monkeypatch):
    """Simulated: blocks on a non-CPU device fail with OutOfMemoryError until they are small, then
    always; the result must equal the plain CPU merge bit for bit."""
    base, ad, _t, lora = wide_pair
    ad2 = _adapter_dir(tmp_path, _no_conv(lora), ad)
    plain = tmp_path / "plain"
    streammerge.merge(base, ad2, plain)
    real = execute_mod.Executor._merge_block
    calls = {"oom": 0}

    def fake(self, job, rows_of, prepared, r0, r1, rows, out_dtype, dest=None):
        probe = rows_of(r0, min(r1, r0 + 1))
        if probe.device.type != "cpu":
            calls["oom"] += 1
            raise torch.OutOfMemoryError("simulated")
        return real(self, job, rows_of, prepared, r0, r1, rows, out_dtype, dest)

    monkeypatch.setattr(execute_mod.Executor, "_merge_block", fake)
    monkeypatch.setattr(importlib.import_module("streammerge.api"), "resolve_device", lambda name: torch.device("meta"))
    rep = streammerge.merge(base, ad2, tmp_path / "oom", device="cuda", max_memory="1GiB")
    assert calls["oom"] >= 2
    assert any("retrying in" in n for n in rep.notes) and any("merged on the CPU" in n for n in rep.notes)
    a, b = read_dir(plain), read_dir(tmp_path / "oom")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_timings_reported(wide_pair, tmp_path):
    base, ad, _, lora = wide_pair
    ad2 = _adapter_dir(tmp_path, _no_conv(lora), ad)
    rep = streammerge.merge(base, ad2, tmp_path / "o")
    assert {"read", "dequant", "merge", "write", "total"} <= set(rep.seconds)
    assert all(v >= 0 for v in rep.seconds.values())


def test_max_memory_parsing():
    assert parse_memory("256MiB") == 256 * 2**20
    assert parse_memory("2GB") == 2 * 10**9
    frac = parse_memory("0.5")
    assert 0 < frac < 2**50
    with pytest.raises(ValueError):
        parse_memory("lots")


def test_prefetcher_keeps_a_bounded_window_ahead_and_asks_once_per_tensor():
    from streammerge.source import TensorRef

    class Recorder:
        def __init__(self):
            self.asked = []

        def prefetch(self, src, limit=None):
            assert limit == 250  # never more than a window of one tensor
            self.asked.append(src)

    sources = [TensorRef(f"t{i}", "f", "BF16", (50,), 0, 100) for i in range(10)]
    sources.insert(5, None)  # a job with no stored source (nothing to read)
    rec = Recorder()
    ahead = pipeline_mod.Prefetcher(rec, sources, window=250)
    for i in range(len(sources)):
        ahead.advance(i)
        pos = [sources.index(r) for r in rec.asked]
        assert pos == [p for p in range(1, max(pos, default=0) + 1) if p != 5]  # in order, none skipped
        beyond = sum(100 for p in pos if p > i)
        left = sum(100 for s in sources[i + 1 :] if s is not None)
        assert min(250, left) <= beyond < 250 + 100  # at least the window (or all that is left), at most one more
    assert len(rec.asked) == 9 and len(set(map(id, rec.asked))) == 9  # each once; the first is merged cold


def test_reader_prefetch_is_harmless_and_changes_nothing(wide_pair):
    from streammerge.source import Reader, parse_header

    base = wide_pair[0]
    data = (base / "model.safetensors").read_bytes()
    h = parse_header(base / "model.safetensors")
    r = Reader()
    for ref in h.tensors.values():
        r.prefetch(ref)
        assert bytes(r.raw(ref)) == data[ref.offset : ref.offset + ref.nbytes]
    r.close()


def test_a_base_larger_than_half_the_ram_leaves_the_page_cache_as_it_is_merged(tmp_path, wide_pair, monkeypatch):
    import os
    from types import SimpleNamespace

    base, _, _, lora = wide_pair
    ad = tmp_path / "ad"
    ad.mkdir()
    save_file(_no_conv(lora), ad / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["up_proj", "embed_tokens"]}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    ref = streammerge.merge(base, ad, tmp_path / "ref", progress=False)
    dropped = []
    real = os.posix_fadvise

    def record(fd, off, n, advice):
        dropped.append((os.readlink(f"/proc/self/fd/{fd}"), n, advice))
        return real(fd, off, n, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=2 * 2**20, available=2**20))
    rep = streammerge.merge(base, ad, tmp_path / "out", progress=False)
    assert any("larger than half the RAM" in n for n in rep.notes) and not any("larger" in n for n in ref.notes)
    assert {p for p, _, a in dropped if a == os.POSIX_FADV_DONTNEED} == {str((base / "model.safetensors").resolve())}
    assert sum(n for _, n, _ in dropped) >= 0.99 * rep.total_size  # every merged tensor's pages
    assert (tmp_path / "out/model.safetensors").read_bytes() == (tmp_path / "ref/model.safetensors").read_bytes()


def test_scaling_fold_guard_against_torch():
    """``(B * s) @ A`` against ``(B @ A) * s`` in torch's own fp32 matmul: wherever the guard allows the
    fold the two are bit-identical (random factors over a wide range of magnitudes), and it refuses
    the cases where they differ (subnormal products) or cannot be exact (s not a power of two)."""
    from streammerge.lora import scaling_folds_exactly

    g = torch.Generator().manual_seed(7)
    allowed = 0
    for trial in range(300):
        r = int(torch.randint(1, 33, (1,), generator=g))
        exp_b, exp_a = (int(x) for x in torch.randint(-60, 20, (2,), generator=g))
        b = torch.randn(67, r, generator=g) * 2.0**exp_b
        a = torch.randn(r, 45, generator=g) * 2.0**exp_a
        s = 2.0 ** int(torch.randint(-12, 12, (1,), generator=g))
        if scaling_folds_exactly(a, b, s):
            allowed += 1
            assert torch.equal((b * s) @ a, (b @ a) * s), (trial, exp_b, exp_a, s)
    assert allowed > 100
    tiny, three = torch.tensor([[2.0**-149]]), torch.tensor([[3.0]])
    assert not torch.equal((tiny * 0.5) @ three, (tiny @ three) * 0.5)  # where folding is wrong...
    assert not scaling_folds_exactly(three, tiny, 0.5)  # ...it is refused
    a, b = torch.randn(8, 30, generator=g) * 0.01, torch.randn(40, 8, generator=g) * 0.01
    assert scaling_folds_exactly(a, b, 2.0) and scaling_folds_exactly(a, b, 0.25)
    assert not scaling_folds_exactly(a, b, 1.0) and not scaling_folds_exactly(a, b, 16 / 8**0.5)
    assert not scaling_folds_exactly(a, torch.zeros(40, 8), 2.0)


@pytest.mark.parametrize("alpha", [4, 16, 64, 3])  # r=8: scaling 0.5, 2, 8 (folded) and 0.375 (not)
def test_folded_scaling_is_bit_identical_to_scaling_each_delta(wide_pair, tmp_path, monkeypatch, alpha):
    base, _ad, _t, lora = wide_pair
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": alpha, "target_modules": ["up_proj", "embed_tokens"]}
    ad2 = _adapter_dir(tmp_path, _no_conv(lora), cfg)
    streammerge.merge(base, ad2, tmp_path / "folded")
    monkeypatch.setattr(execute_mod.Executor, "fold_scaling", False)
    streammerge.merge(base, ad2, tmp_path / "plain")
    assert (tmp_path / "folded/model.safetensors").read_bytes() == (tmp_path / "plain/model.safetensors").read_bytes()


def test_overflow_in_one_late_tile_is_caught(wide_pair, tmp_path, monkeypatch):
    """The finiteness of each tile is gathered and checked once per block: one overflowing row in the
    15th of 16 tiles still fails the merge."""
    from streammerge.errors import NonFiniteError

    base, ad, _t, lora = wide_pair
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    edited = _no_conv(lora)
    edited[key] = edited[key].clone()
    edited[key][900] *= 1e38
    ad2 = _adapter_dir(tmp_path, edited, ad)
    monkeypatch.setattr(execute_mod, "TILE_BYTES", 64 * 4 * 320)
    with pytest.raises(NonFiniteError, match="up_proj"):
        streammerge.merge(base, ad2, tmp_path / "out", max_memory="1GiB")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", ["1MiB", "128MiB"])  # staging halves of 128 KiB (tiles straddle them) / 16 MiB
def test_merging_into_the_staging_buffer_is_byte_identical(wide_pair, tmp_path, monkeypatch, budget):
    """Tiles rounded straight into the O_DIRECT staging buffer (and, where a tile does not fit what is
    left of it, written from the work buffer) against blocks copied in by the writer thread, and
    against buffered writes: the same shard bytes and checksums."""
    import streammerge.sinks.safetensors as st

    base, _ad, _t, lora = wide_pair
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["up_proj", "embed_tokens"]}
    ad2 = _adapter_dir(tmp_path, _no_conv(lora), cfg)
    seen = {"in_place": 0, "copied": 0}
    reserve = st.ShardWriter.reserve

    def counting(self, name, nbytes, align=1):
        mv = reserve(self, name, nbytes, align)
        seen["in_place" if mv is not None else "copied"] += 1
        return mv

    monkeypatch.setattr(st.ShardWriter, "reserve", counting)
    fast = streammerge.merge(base, ad2, tmp_path / "fast", max_memory=budget, shard_size="1MB")
    if not fast.shards or not any(seen.values()):
        pytest.skip("this filesystem refuses O_DIRECT: no staging buffer to merge into")
    assert seen["in_place"] > 0 and (seen["copied"] > 0 or budget == "128MiB")
    monkeypatch.setattr(execute_mod.Executor, "direct_ok", lambda self, job: False)
    slow = streammerge.merge(base, ad2, tmp_path / "slow", max_memory=budget, shard_size="1MB")
    buffered = streammerge.merge(base, ad2, tmp_path / "buf", max_memory=budget, shard_size="1MB", direct_io=False)
    names = sorted(p.name for p in (tmp_path / "fast").glob("*.safetensors"))
    assert len(names) > 1
    for n in names:
        data = (tmp_path / "fast" / n).read_bytes()
        assert data == (tmp_path / "slow" / n).read_bytes() == (tmp_path / "buf" / n).read_bytes(), n
    sums = [[s["checksum"] for s in r.shards] for r in (fast, slow, buffered)]
    assert sums[0] == sums[1] == sums[2]


def test_fast_paths_on_a_peft_adapter_are_byte_identical(llama_pair, tmp_path, monkeypatch):
    """On a transformers base and a PEFT-saved adapter (scaling 2: folded), with small staging buffers
    (many of them per shard): merged in place with the folded scaling, against neither. (Tiles that
    straddle a buffer's end are exercised on the wide fixture above.)"""
    import streammerge.sinks.safetensors as st

    base, ad = llama_pair
    commits = []
    commit = st.ShardWriter.commit
    monkeypatch.setattr(st.ShardWriter, "commit", lambda self, n, k: commits.append(k) or commit(self, n, k))
    fast = streammerge.merge(base, ad, tmp_path / "fast", max_memory="1MiB", shard_size="40KB")
    monkeypatch.setattr(execute_mod.Executor, "direct_ok", lambda self, job: False)
    monkeypatch.setattr(execute_mod.Executor, "fold_scaling", False)
    slow = streammerge.merge(base, ad, tmp_path / "slow", max_memory="1MiB", shard_size="40KB")
    if not commits:
        pytest.skip("this filesystem refuses O_DIRECT: no staging buffer to merge into")
    names = sorted(p.name for p in (tmp_path / "fast").glob("model*.safetensors"))
    assert len(names) > 1
    for n in names:
        assert (tmp_path / "fast" / n).read_bytes() == (tmp_path / "slow" / n).read_bytes(), n
    assert [s["checksum"] for s in fast.shards] == [s["checksum"] for s in slow.shards]
