"""Hub repo ids (issue 14): a base and an adapter in a Hugging Face cache laid out as huggingface_hub
lays it out (blobs, refs, snapshots of links; checked with its own ``snapshot_download(...,
local_files_only=True)``), merged offline by repo id, read in place."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from helpers import build_adapter, build_model, save_base

import streammerge
from streammerge.cli import main
from streammerge.errors import InputError


def add_to_cache(cache: Path, repo_id: str, src: Path) -> str:
    """Put the files of ``src`` into ``cache`` as huggingface_hub's cache holds a downloaded repo:
    content-addressed blobs, ``refs/main`` naming the commit, and a snapshot of relative links."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode() + b"".join(p.read_bytes() for p in sorted(src.iterdir()))).hexdigest()
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for p in sorted(src.iterdir()):
        blob = hashlib.sha256(p.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(Path("..", "..", "blobs", blob))
    return commit


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def model_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "streammerge_report.json"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache holding ``acme/tiny-llama`` and an adapter ``acme/tiny-lora`` trained on it; offline."""
    import huggingface_hub.constants as hc

    model = build_model("llama", torch.bfloat16)
    base = save_base(model, tmp_path / "src" / "base", shard="300KB")
    ad = build_adapter(model, tmp_path / "src" / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = (
        (ad / "adapter_config.json")
        .read_text()
        .replace('"base_model_name_or_path": null', '"base_model_name_or_path": "acme/tiny-llama"')
    )
    (ad / "adapter_config.json").write_text(cfg)
    root = tmp_path / "hf" / "hub"
    commits = {"base_commit": add_to_cache(root, "acme/tiny-llama", base)}
    commits["ad_commit"] = add_to_cache(root, "acme/tiny-lora", ad)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"root": root, "base": base, "ad": ad, **commits}


def test_cache_layout_is_huggingface_hubs(cache):
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download("acme/tiny-llama", local_files_only=True))
    assert snap.name == cache["base_commit"] and (snap / "config.json").is_symlink()
    assert {p.name for p in snap.iterdir()} == {p.name for p in cache["base"].iterdir()}


@pytest.mark.parametrize("how", ["repo_id", "at_commit", "adapter_repo", "base_from_adapter"])
def test_merge_by_repo_id_equals_merging_the_directories(cache, tmp_path, how):
    ref = tmp_path / "ref"
    streammerge.merge(cache["base"], cache["ad"], ref)
    before, outside = tree(cache["root"]), tree(tmp_path)
    out = tmp_path / "out"
    if how == "repo_id":
        report = streammerge.merge("acme/tiny-llama", cache["ad"], out)
    elif how == "at_commit":
        report = streammerge.merge(f"acme/tiny-llama@{cache['base_commit']}", cache["ad"], out)
    elif how == "adapter_repo":
        report = streammerge.merge("acme/tiny-llama", "acme/tiny-lora", out)
        assert report.adapters[0]["source"]["repo_id"] == "acme/tiny-lora"
    else:
        assert main(["merge", "acme/tiny-lora", str(out), "-q"]) == 0
        report = streammerge.merge(None, "acme/tiny-lora", tmp_path / "out2", dry_run=True)
        assert any("base_model_name_or_path: acme/tiny-llama" in n for n in report.notes)
    assert model_files(out) == model_files(ref)
    assert report.base_source["repo_id"] == "acme/tiny-llama" and report.base_source["commit"] == cache["base_commit"]
    assert tree(cache["root"]) == before  # the cache is read in place: nothing added or modified
    new = {p for p in tree(tmp_path) if p not in outside}
    assert all(p.startswith(str(tmp_path / "out")) or ".streammerge.lock" in p for p in new), new


def test_dry_run_names_base_and_commit(cache, capsys):
    assert main(["merge", "acme/tiny-llama", "acme/tiny-lora", "/tmp/never-written", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"base:     acme/tiny-llama@{cache['base_commit']}" in text
    assert not Path("/tmp/never-written").exists()


def test_missing_repo_offline_is_a_clean_error(cache, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["merge", "acme/missing-model", str(cache["ad"]), str(out)]) == 1
    err = capsys.readouterr().err
    assert "acme/missing-model: not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        streammerge.merge("acme/tiny-llama@0123456789abcdef0123456789abcdef01234567", cache["ad"], out)


def test_a_local_path_wins_over_a_repo_id_of_the_same_spelling(cache, tmp_path, monkeypatch):
    (tmp_path / "acme").mkdir()
    local = tmp_path / "acme" / "tiny-llama"
    local.symlink_to(cache["base"])
    monkeypatch.chdir(tmp_path)
    report = streammerge.merge("acme/tiny-llama", cache["ad"], tmp_path / "out", dry_run=True)
    assert report.base_source == {"path": "acme/tiny-llama"}


def test_pre_quantized_base_points_to_its_cached_16bit_sibling(cache, tmp_path):
    import transformers as tf

    qc = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    q = tf.AutoModelForCausalLM.from_pretrained(cache["base"], quantization_config=qc, dtype=torch.bfloat16)
    q.save_pretrained(tmp_path / "q4")
    add_to_cache(cache["root"], "acme/tiny-llama-bnb-4bit", tmp_path / "q4")
    report = streammerge.merge("acme/tiny-llama-bnb-4bit", "acme/tiny-lora", tmp_path / "out", dry_run=True)
    note = next(n for n in report.notes if "full-precision sibling" in n)
    assert "`streammerge merge acme/tiny-llama acme/tiny-lora OUT`" in note


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: ClassVar[list] = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_large_folder(self, repo_id, folder_path, **kw):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload", repo_id, files, kw))


def test_push_to_hub_uploads_the_output_with_a_model_card(cache, tmp_path, monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    args = ["merge", "acme/tiny-llama", "acme/tiny-lora", str(out), "--push-to-hub", "me/merged", "--private"]
    assert main([*args, "--revision", "v1", "-q"]) == 0
    kinds = [c[0] for c in FakeApi.calls]
    assert kinds == ["create_repo", "create_branch", "upload"]
    assert FakeApi.calls[0][2]["private"] is True and FakeApi.calls[1][2]["branch"] == "v1"
    _, repo, files, kw = FakeApi.calls[2]
    assert repo == "me/merged" and kw["revision"] == "v1"
    assert {"README.md", "config.json", "streammerge_report.json"} <= set(files)
    assert any(f.startswith("model") and f.endswith(".safetensors") for f in files)
    card = (out / "README.md").read_text()
    assert "base_model: acme/tiny-llama" in card and "acme/tiny-lora" in card and streammerge.__version__ in card
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # nothing was sent anywhere


def test_verify_inspect_and_batch_take_repo_ids(cache, tmp_path, capsys):
    from streammerge.batch import batch, jobs_from_args

    out = tmp_path / "out"
    assert main(["merge", "acme/tiny-llama", "acme/tiny-lora", str(out), "-q"]) == 0
    assert main(["verify", str(out), "--base", "acme/tiny-llama", "--adapter", "acme/tiny-lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recomputed"] > 0
    assert main(["inspect", "acme/tiny-lora", "--base", "acme/tiny-llama", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"]["repo_id"] == "acme/tiny-lora" and len(info["mapping"]) == 4
    results = batch("acme/tiny-llama", jobs_from_args(tmp_path / "batch", ["acme/tiny-lora"], {}))
    assert [r.status for r in results] == ["ok"]
    assert model_files(Path(results[0].out)) == model_files(out)


def test_push_with_lora_after_verify_and_never_on_a_dry_run(cache, tmp_path, monkeypatch):
    import huggingface_hub

    import streammerge.verify as verify_mod

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = ["merge", "acme/tiny-llama", "acme/tiny-lora"]
    assert main([*args, str(tmp_path / "a"), "--save-method", "lora", "--push-to-hub", "me/ad", "-q"]) == 0
    assert [c[0] for c in FakeApi.calls] == ["create_repo", "upload"]
    assert main([*args, str(tmp_path / "b"), "--dry-run", "--push-to-hub", "me/x", "-q"]) == 1
    FakeApi.calls = []
    real = verify_mod.verify

    def failing(*a, **k):
        vr = real(*a, **k)
        vr.problems.append("simulated")
        return vr

    monkeypatch.setattr(verify_mod, "verify", failing)
    assert main([*args, str(tmp_path / "c"), "--verify", "--push-to-hub", "me/x", "-q"]) == 1
    assert FakeApi.calls == []  # a model that fails verification is never uploaded


def test_a_mistyped_local_path_is_not_taken_for_a_repo_id(cache, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="base checkpoint directory not found"):
        streammerge.merge("models/llama-typo", cache["ad"], tmp_path / "out")


@pytest.mark.parametrize(
    ("error", "match"),
    [
        ("GatedRepoError", "gated or private and this machine is not authorized"),
        ("RepositoryNotFoundError", "no such repo on the Hub"),
        ("RevisionNotFoundError", "the repo has no revision 'v9'"),
        ("OSError", "could not download it"),
    ],
)
def test_online_errors_name_the_repo_with_a_hint(cache, tmp_path, monkeypatch, error, match):
    """With the network allowed, what the Hub answers for a repo that is not cached (huggingface_hub's own
    exceptions, raised here by a stand-in: no network in tests) becomes exit 1 naming the repo."""
    import huggingface_hub
    import huggingface_hub.constants as hc
    from huggingface_hub import errors

    httpx2 = pytest.importorskip("httpx2")  # the HTTP client of huggingface_hub 2.x, whose errors carry a response

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download

    def hub(repo_id, **kw):
        if kw.get("local_files_only"):
            return real(repo_id, **kw)
        if error == "OSError":
            raise OSError("connection reset")
        response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/{repo_id}"))
        raise getattr(errors, error)("refused", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    with pytest.raises(InputError, match=match) as e:
        streammerge.merge("acme/other-model@v9", cache["ad"], tmp_path / "out")
    assert str(e.value).startswith("acme/other-model@v9: ") and e.value.hint
    assert not (tmp_path / "out").exists()
