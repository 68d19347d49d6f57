"""zstd: compressed inputs read by streaming decompression; compressed outputs restored byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import zstandard

import streammerge
from streammerge.errors import InputError
from streammerge.verify import verify


def _model_files(d, strip_zst=False):
    out = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith(("model", "config")):
            out[p.name[:-4] if strip_zst and p.name.endswith(".zst") else p.name] = p.read_bytes()
    return out


def _compress_dir(src, dst, content_size=True, suffix_files=(".safetensors",)):
    """Compress every *.safetensors (streaming, like `zstd`), rename the index entries accordingly."""
    shutil.copytree(src, dst)
    for p in list(dst.iterdir()):
        if p.name.endswith(suffix_files):
            cctx = zstandard.ZstdCompressor(level=3, write_content_size=content_size)
            with open(p, "rb") as fin, open(str(p) + ".zst", "wb") as fout:
                if content_size:
                    fout.write(cctx.compress(fin.read()))
                else:
                    cctx.copy_stream(fin, fout)  # no size in the frame header
            p.unlink()
    idx = dst / "model.safetensors.index.json"
    if idx.exists():
        obj = json.loads(idx.read_text())
        obj["weight_map"] = {k: v + ".zst" for k, v in obj["weight_map"].items()}
        idx.write_text(json.dumps(obj))
    return dst


def test_compressed_output_round_trips_byte_identically(llama_pair, tmp_path):
    base, ad = llama_pair
    plain = tmp_path / "plain"
    streammerge.merge(base, ad, plain, shard_size="60KB")
    packed = tmp_path / "packed"
    rep = streammerge.merge(base, ad, packed, shard_size="60KB", compress="zstd:5")
    names = sorted(p.name for p in packed.glob("model-*"))
    assert names and all(n.endswith(".safetensors.zst") for n in names)
    wm = json.loads((packed / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(wm.values()) == set(names)
    assert rep.options["compress"] == 5
    assert verify(packed, base, [ad]).ok
    restored = tmp_path / "restored"
    r = subprocess.run(
        [sys.executable, "-m", "streammerge", "decompress", str(packed), str(restored)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert _model_files(restored) == _model_files(plain)


@pytest.mark.parametrize("content_size", [True, False])
def test_compressed_inputs_are_read_by_streaming(llama_pair, tmp_path, content_size):
    base, ad = llama_pair
    ref = tmp_path / "ref"
    streammerge.merge(base, ad, ref)
    zbase = _compress_dir(base, tmp_path / "zbase", content_size)
    zad = _compress_dir(ad, tmp_path / "zad", content_size)
    assert not list(zbase.glob("*.safetensors")) and list(zbase.glob("*.safetensors.zst"))
    out = tmp_path / "out"
    streammerge.merge(zbase, zad, out, max_memory=1)
    assert _model_files(out) == _model_files(ref)


def test_corrupt_compressed_base_is_an_error(llama_pair, tmp_path):
    base, ad = llama_pair
    zbase = _compress_dir(base, tmp_path / "zbase")
    shard = sorted(zbase.glob("*.zst"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 :] = b"\0" * (len(data) - len(data) // 2)
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=shard.name):
        streammerge.merge(zbase, ad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tar_zst(src, dst, reverse=False):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(src.iterdir(), reverse=reverse):
            tf.add(p, arcname=f"{src.name}/{p.name}")
    dst.write_bytes(zstandard.ZstdCompressor(level=3).compress(buf.getvalue()))
    return dst


@pytest.mark.parametrize("reverse", [False, True])
def test_tar_zst_checkpoint_archive_is_read_streaming(llama_pair, tmp_path, reverse):
    """A .tar.zst of a checkpoint directory (members in any order) as BASE, never unpacked to disk."""
    base, ad = llama_pair
    ref = tmp_path / "ref"
    streammerge.merge(base, ad, ref, shard_size="60KB")
    archive = _tar_zst(base, tmp_path / "base.tar.zst", reverse)
    out = tmp_path / "out"
    rep = streammerge.merge(archive, ad, out, shard_size="60KB")
    assert _model_files(out) == _model_files(ref)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert rep.base == str(archive)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]


def test_broken_archive_is_an_error(llama_pair, tmp_path):
    base, ad = llama_pair
    archive = _tar_zst(base, tmp_path / "base.tar.zst")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(InputError, match=r"base\.tar\.zst"):
        streammerge.merge(archive, ad, tmp_path / "out")
