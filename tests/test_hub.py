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
from streammerge.errors import AdapterError, InputError


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
    return {"root": root, "base": base, "ad": ad, "model": model, **commits}


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
    assert main([*args, str(tmp_path / "b"), "--dry-run", "--push-to-hub", "me/x", "-q"]) == 2  # a usage error
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


# --- dangling links (issue 23, item 5): a snapshot link whose blob was deleted from the cache -----------------


def snapshot_of(root: Path, repo_id: str) -> tuple[Path, str]:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = (repo / "refs" / "main").read_text()
    return repo / "snapshots" / commit, commit


def dangle(root: Path, repo_id: str, rel: str) -> tuple[Path, Path, str]:
    """Delete the blob behind ``rel`` in the cached snapshot of ``repo_id`` (a cache pruned by hand): its link
    dangles. Returns the link, the missing blob and the commit."""
    snap, commit = snapshot_of(root, repo_id)
    link = snap / rel
    blob = link.resolve()
    blob.unlink()
    assert link.is_symlink() and not link.exists()
    return link, blob, commit


def add_dangling(root: Path, repo_id: str, rel: str) -> tuple[Path, Path]:
    """A link ``rel`` in the snapshot to a blob that is not in the cache."""
    snap, _ = snapshot_of(root, repo_id)
    blob_name = hashlib.sha256(rel.encode()).hexdigest()
    (snap / rel).symlink_to(Path("..", "..", "blobs", blob_name))
    return snap / rel, snap.parent.parent / "blobs" / blob_name


def write_tree_listing(root: Path, repo_id: str) -> None:
    """The tree listing huggingface_hub (2.x) caches per commit at download: with it, its own offline
    ``snapshot_download`` refuses a snapshot missing a listed file (IncompleteSnapshotError)."""
    snap, commit = snapshot_of(root, repo_id)
    files = {p.name: {"size": 1, "blob_id": hashlib.sha1(p.name.encode()).hexdigest()} for p in snap.iterdir()}
    (snap.parent.parent / "trees").mkdir(exist_ok=True)
    (snap.parent.parent / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": files}))


def add_sharded_base(cache: dict, tmp_path: Path) -> str:
    base = save_base(cache["model"], tmp_path / "src" / "sharded", shard="60KB")
    assert (base / "model.safetensors.index.json").is_file()
    add_to_cache(cache["root"], "acme/tiny-llama-sharded", base)
    return "acme/tiny-llama-sharded"


@pytest.mark.parametrize("listing", [False, True], ids=["no_tree_listing", "tree_listing"])
@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("base_single", InputError),
        ("base_shard", InputError),
        ("base_index", InputError),
        ("base_config", InputError),
        ("adapter_weights", AdapterError),
        ("adapter_config", AdapterError),
    ],
)
def test_a_dangling_link_names_repo_commit_link_blob_and_the_fix(cache, tmp_path, capsys, case, error, listing):
    """A snapshot file whose blob was deleted (offline): the error names the repo, its commit, the link, the
    missing blob and the command that re-downloads it, and the run exits 1 writing nothing (it said
    'no model.safetensors', then 'found model.safetensors; convert .bin checkpoints')."""
    base, adapter = "acme/tiny-llama", "acme/tiny-lora"
    if case in ("base_shard", "base_index"):
        base = add_sharded_base(cache, tmp_path)
    repo, rel = {
        "base_single": (base, "model.safetensors"),
        "base_shard": (base, "model-00002-of-00004.safetensors"),
        "base_index": (base, "model.safetensors.index.json"),
        "base_config": (base, "config.json"),
        "adapter_weights": (adapter, "adapter_model.safetensors"),
        "adapter_config": (adapter, "adapter_config.json"),
    }[case]
    if listing:
        write_tree_listing(cache["root"], repo)
    link, blob, commit = dangle(cache["root"], repo, rel)
    out = tmp_path / "out"
    assert main(["merge", base, adapter, str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists()
    assert f"{repo} (revision main, commit {commit})" in err
    assert str(link) in err and str(blob) in err and "dangling" in err
    assert f"hf download {repo} {rel} --revision {commit}" in err
    assert "convert .bin" not in err and "not in the Hugging Face cache" not in err
    with pytest.raises(error) as e:
        streammerge.merge(base, adapter, out, dry_run=True)
    assert e.value.details and rel in e.value.details[0]
    if case.startswith("adapter"):  # also when the base is taken from the adapter's config
        with pytest.raises(AdapterError, match="dangling"):
            streammerge.merge(None, adapter, out, dry_run=True)


def test_every_dangling_link_the_merge_reads_is_named_at_once(cache, tmp_path):
    base = add_sharded_base(cache, tmp_path)
    broken = [dangle(cache["root"], base, f)[0] for f in ("config.json", "model-00001-of-00004.safetensors")]
    broken.append(dangle(cache["root"], base, "model-00004-of-00004.safetensors")[0])
    tok, _ = add_dangling(cache["root"], base, "tokenizer.json")  # copied beside the weights: needed too
    with pytest.raises(InputError, match="4 files of the cached snapshot are dangling links") as e:
        streammerge.merge(base, "acme/tiny-lora", tmp_path / "out", dry_run=True)
    assert [d.split(":")[0] for d in e.value.details] == sorted(p.name for p in [*broken, tok])
    files = " ".join(sorted(p.name for p in [*broken, tok]))
    assert f"hf download {base} {files} --revision" in e.value.hint


def test_dangling_links_the_merge_does_not_read_are_only_a_note(cache, tmp_path, caplog):
    """A dangling README.md, a pickle beside the safetensors, a consolidated file beside the shards: the
    merge reads none of them, so it runs (the README is not copied), with a note naming them."""
    base = add_sharded_base(cache, tmp_path)
    ref = tmp_path / "ref"
    streammerge.merge(tmp_path / "src" / "sharded", cache["ad"], ref)
    names = ("README.md", "pytorch_model.bin", "consolidated.safetensors")
    unread = [add_dangling(cache["root"], base, n)[0] for n in names]
    unread.append(add_dangling(cache["root"], "acme/tiny-lora", "adapter_model.bin")[0])
    out = tmp_path / "out"
    caplog.set_level("WARNING", logger="streammerge")
    streammerge.merge(base, "acme/tiny-lora", out)
    assert model_files(out) == model_files(ref) and not (out / "README.md").exists()
    text = caplog.text
    for link in unread:
        assert str(link) in text
    assert "this merge does not need it" in text and "the output goes without it" in text


def test_a_dangling_link_in_a_local_directory_names_the_link_and_its_target(cache, tmp_path, capsys):
    import shutil

    base, ad = tmp_path / "base", tmp_path / "ad"
    shutil.copytree(cache["base"], base)
    shutil.copytree(cache["ad"], ad)
    gone = tmp_path / "moved-away" / "model.safetensors"
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(gone)
    assert main(["merge", str(base), str(ad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{base / 'model.safetensors'} -> {gone}" in err and "dangling" in err and "convert .bin" not in err
    (base / "model.safetensors").unlink()
    shutil.copy(cache["base"] / "model.safetensors", base)
    (ad / "adapter_model.safetensors").unlink()
    (ad / "adapter_model.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    with pytest.raises(AdapterError, match="dangling") as e:
        streammerge.merge(base, ad, tmp_path / "out", dry_run=True)
    assert str(tmp_path / "nowhere.safetensors") in str(e.value)
    link = tmp_path / "base-link"
    link.symlink_to(tmp_path / "deleted-base")
    with pytest.raises(InputError, match="dangling") as e:
        streammerge.merge(link, cache["ad"], tmp_path / "out", dry_run=True)
    assert str(tmp_path / "deleted-base") in str(e.value)


@pytest.mark.parametrize("fetch", ["ok", "fails"])
def test_with_the_network_allowed_a_dangling_blob_is_fetched_again(cache, tmp_path, monkeypatch, fetch):
    """Not offline: the files behind dangling links are downloaded again (huggingface_hub's own
    hf_hub_download, which replaces the link; a stand-in here), at the snapshot's commit."""
    import huggingface_hub
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    link, blob, commit = dangle(cache["root"], "acme/tiny-llama", "model.safetensors")
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("revision")))
        if fetch == "fails":
            raise OSError("connection reset")
        blob.write_bytes((cache["base"] / filename).read_bytes())
        return str(link)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    out = tmp_path / "out"
    if fetch == "ok":
        streammerge.merge("acme/tiny-llama", "acme/tiny-lora", out, dry_run=True)
    else:
        with pytest.raises(InputError, match="connection reset") as e:
            streammerge.merge("acme/tiny-llama", "acme/tiny-lora", out, dry_run=True)
        assert str(blob) in str(e.value)
    assert calls == [("acme/tiny-llama", "model.safetensors", commit)]


def test_a_snapshot_passed_as_a_path_and_inspect_name_the_repo_too(cache, tmp_path, capsys):
    link, blob, commit = dangle(cache["root"], "acme/tiny-lora", "adapter_model.safetensors")
    with pytest.raises(AdapterError) as e:
        streammerge.merge(cache["base"], link.parent, tmp_path / "out", dry_run=True)
    assert f"acme/tiny-lora (commit {commit}): adapter_model.safetensors of the cached snapshot" in str(e.value)
    assert f"hf download acme/tiny-lora adapter_model.safetensors --revision {commit}" in str(e.value)
    assert main(["inspect", "acme/tiny-lora"]) == 1
    err = capsys.readouterr().err
    assert str(link) in err and str(blob) in err and "no adapter_model.safetensors" not in err


def test_an_incomplete_snapshot_is_not_called_absent_from_the_cache(cache, tmp_path):
    """huggingface_hub's tree listing names a file the snapshot lacks (never downloaded, no link): offline
    that is an incomplete snapshot (it said 'not in the Hugging Face cache')."""
    write_tree_listing(cache["root"], "acme/tiny-llama")
    snap, commit = snapshot_of(cache["root"], "acme/tiny-llama")
    (snap / "tokenizer.json").unlink(missing_ok=True)
    listing = snap.parent.parent / "trees" / f"{commit}.json"
    data = json.loads(listing.read_text())
    data["files"]["tokenizer.json"] = {"size": 1, "blob_id": "0" * 40}
    listing.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"the cached snapshot .* is incomplete, and HF_HUB_OFFLINE is set") as e:
        streammerge.merge("acme/tiny-llama", cache["ad"], tmp_path / "out", dry_run=True)
    assert "tokenizer.json" in str(e.value) and f"--revision {commit}" in e.value.hint
