"""Hugging Face Hub repo ids: ``ORG/NAME[@REVISION]`` resolved to a snapshot directory of the local
cache with ``huggingface_hub`` (honouring ``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE`` and
``HF_TOKEN``), read in place through the snapshot's links: nothing is copied. Only what a merge needs is
fetched, and only when it is not cached and the network is allowed; a path that exists locally always
wins over a repo id of the same spelling. A link of the snapshot whose blob was deleted from the cache
(a dangling link), or a dangling symlink in a local directory, is found before anything is read: one
error names every file the merge reads that dangles (with the network allowed, a snapshot's are
downloaded again first); the others are a note. Also: the 16-bit sibling of a pre-quantized base, and
``--push-to-hub``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from .errors import AdapterError, InputError, OutputError

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
TOKENIZER = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model"]
BASE_FILES = ["config.json", "generation_config.json", "chat_template.*", *TOKENIZER, "preprocessor_config.json"]
#: files a merge reads from a base repo, and from an adapter repo (safetensors before pickles)
BASE_PATTERNS = [*BASE_FILES, "*.safetensors", "model.safetensors.index.json"]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", *TOKENIZER, "chat_template.*"]
#: suffixes of pre-quantized repos whose 16-bit sibling drops them (Unsloth's and common naming)
QUANT_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-4bit", "-bnb-8bit", "-FP8")


@dataclass(frozen=True)
class Resolved:
    """Where a BASE or ADAPTER argument lives: a local path, or a repo's cached snapshot."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    #: dangling links the merge does not read (README.md, a pickle beside the safetensors, ...)
    notes: tuple[str, ...] = ()

    def describe(self) -> dict:
        if self.repo_id is None:
            return {"path": str(self.path)}
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "path": str(self.path)}


def parse(spec: str) -> tuple[str, str | None] | None:
    """``ORG/NAME[@REVISION]`` -> (repo id, revision), or None for what can only be a path."""
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return None
    if Path(spec.split("/", 1)[0]).is_dir():  # a local directory with a missing child: a path, mistyped
        return None
    m = REPO_ID.match(spec)
    return (m["repo"], m["rev"]) if m else None


def resolve(spec: str | Path, kind: str = "base") -> Resolved:
    """A local path as it is; a repo id to its cached snapshot (fetching the missing files a merge needs
    when the network is allowed). ``kind``: ``base`` or ``adapter`` (which files are needed). Either way a
    dangling link to a file the merge reads is an error here (see :func:`check_links`)."""
    spec = str(spec)
    parsed = parse(spec)
    if parsed is None:
        path = Path(spec).expanduser()
        return Resolved(spec, path, notes=check_links(path, kind, spec=spec))
    repo_id, revision = parsed
    patterns = {"base": BASE_PATTERNS, "adapter": ADAPTER_PATTERNS}.get(kind, [*BASE_PATTERNS, *ADAPTER_PATTERNS])
    path = _snapshot(repo_id, revision, patterns, spec, kind)
    weights = path / "adapter_model.safetensors"
    if kind == "adapter" and not (weights.exists() or weights.is_symlink()):  # (a dangling link is fetched below)
        path = _snapshot(repo_id, revision, [*patterns, "adapter_model.bin"], spec, kind)  # an older adapter
    source = (repo_id, revision or "main", path.name)
    notes = check_links(path, kind, source, fetch=True)
    return Resolved(spec, path, repo_id, revision or "main", path.name, notes)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], spec: str, kind: str = "base") -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, IncompleteSnapshotError, FileNotFoundError) as e:
        snap = Path(getattr(e, "snapshot_path", None) or "")
        if constants.HF_HUB_OFFLINE and isinstance(e, IncompleteSnapshotError) and snap.is_dir():
            # huggingface_hub's cached tree listing says files are missing: dangling links among them are named
            _, bad, is_adapter = _scan(snap, kind, deep=True)
            if bad:
                source = (repo_id, revision or "main", snap.name)
                raise _dangling_error(snap, bad, source, AdapterError if is_adapter else InputError) from None
            raise InputError(
                f"{spec}: the cached snapshot {snap} is incomplete, and HF_HUB_OFFLINE is set ({e})",
                hint=f"download the missing files (hf download {repo_id} --revision {snap.name}), or unset "
                "HF_HUB_OFFLINE",
            ) from None
        if constants.HF_HUB_OFFLINE:
            raise InputError(
                f"{spec}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set",
                hint="download it first (hf download " + repo_id + "), point HF_HUB_CACHE / HF_HOME at the cache "
                "that holds it, or unset HF_HUB_OFFLINE",
            ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise InputError(
            f"{spec}: the repo is gated or private and this machine is not authorized",
            hint="accept its terms on huggingface.co, then set HF_TOKEN or run `hf auth login`",
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{spec}: no such repo on the Hub (or it is private)",
            hint="check the repo id; for a private repo set HF_TOKEN",
        ) from None
    except RevisionNotFoundError:
        hint = "check the branch, tag or commit"
        raise InputError(f"{spec}: the repo has no revision {revision!r}", hint=hint) from None
    except (OSError, ValueError) as e:  # connection errors, interrupted downloads (the cache stays consistent)
        raise InputError(
            f"{spec}: could not download it ({type(e).__name__}: {e})",
            hint="check the network and run again: files already downloaded are kept in the cache",
        ) from None


def check_links(
    path: Path, kind: str = "base", source: tuple[str, str, str] | None = None, fetch: bool = False, spec: str = ""
) -> tuple[str, ...]:
    """Dangling symlinks in a base or adapter directory, before anything is read (a Hub snapshot's links
    whose blobs were deleted from the cache; a local directory's links to moved files): one error names
    every one whose file the merge reads (the files streammerge would download for it, the weights
    narrowed to those it reads), all at once; the others (README.md, a pickle beside the safetensors, a
    consolidated file beside the shards) are notes, logged and returned. ``source``: (repo id, revision,
    commit) of a snapshot; ``fetch``: with the network allowed, download a snapshot's dangling files again
    first (huggingface_hub replaces the links)."""
    if path.is_symlink() and not path.exists():
        cls = AdapterError if kind == "adapter" else InputError
        raise cls(
            f"{spec or path}: a dangling symlink to {os.path.realpath(path)}, which does not exist",
            hint="point the link at the directory again, or pass the directory itself",
        )
    if not path.is_dir():
        return ()
    source = source or _snapshot_source(path)
    dangling, bad, is_adapter = _scan(path, kind, deep=source is not None)
    failure = ""
    if bad and fetch and source is not None:
        from huggingface_hub import constants

        for _ in range(0 if constants.HF_HUB_OFFLINE else 2):  # twice: a fetched index can name more shards
            failure = _fetch_again(source, [rel for rel, _, _ in bad])
            dangling, bad, is_adapter = _scan(path, kind, deep=True)
            if failure or not bad:
                break
    if bad:
        raise _dangling_error(path, bad, source, AdapterError if is_adapter else InputError, failure)
    where = f"{_where(source)} ({path})" if source else str(path)
    notes = []
    for rel, link, target in dangling:
        copied = kind == "base" and "/" not in rel and _copied(rel)
        notes.append(
            f"{where}: {rel} is a dangling link ({link} -> {target}, which does not exist); this merge does not "
            "need it" + (", and the output goes without it" if copied else "")
        )
    for note in notes:
        logging.getLogger("streammerge").warning(note)
    return tuple(notes)


def _scan(root: Path, kind: str, deep: bool) -> tuple[list, list, bool]:
    """Every dangling link under ``root``; those of them the merge reads; whether ``root`` is an adapter's."""
    dangling = _dangling(root, deep)
    if not dangling:
        return [], [], kind == "adapter"
    reads, is_adapter = _reads(root, kind)
    return dangling, [d for d in dangling if d[0] in reads], is_adapter


def _dangling(root: Path, deep: bool) -> list[tuple[str, Path, Path]]:
    """(path relative to ``root``, the link, what it points to) for every symlink under ``root`` whose target
    does not exist: the whole tree of a snapshot, a local directory and its subfolders (an adapter's),
    hidden folders left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames + filenames:
            p = here / name
            if p.is_symlink() and not os.path.exists(p):
                found.append((p.relative_to(root).as_posix(), p, Path(os.path.realpath(p))))
        dirnames[:] = [] if not deep and here != root else [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def _reads(root: Path, kind: str) -> tuple[set[str], bool]:
    """The files (paths relative to ``root``) a merge reads from a base or adapter directory, whether they
    are there or not, and whether it is an adapter's: as :func:`streammerge.source.open_checkpoint` and
    :func:`streammerge.adapters.load_adapter` pick them, and the tokenizer and config files copied beside
    the weights (the ones streammerge downloads: BASE_FILES, the adapter's tokenizer files)."""
    from .sinks.outdir import TOKENIZER_FILES

    def there(rel: str) -> bool:
        return os.path.lexists(root / rel)

    adir = _adapter_subdir(root) if kind in ("adapter", "any") else None
    if adir is None and kind == "adapter":
        adir = ""
    if adir is not None:
        names = ("adapter_model.safetensors", "adapter_model.safetensors.zst", "adapter_model.bin")
        weights = next((n for n in names if there(adir + n)), names[0])
        copied = TOKENIZER_FILES if kind == "adapter" else ()
        return {adir + n for n in ("adapter_config.json", weights, *copied)}, True
    reads = {"config.json"}
    index, single = "model.safetensors.index.json", "model.safetensors"
    if there(index):
        reads |= {index, *_index_shards(root / index)}
    else:
        reads.add(single + ".zst" if there(single + ".zst") and not there(single) else single)
    if kind == "base":
        reads |= {p.name for p in root.iterdir() if any(fnmatch(p.name, pat) for pat in BASE_FILES)}
    return reads, False


def _adapter_subdir(root: Path) -> str | None:
    """The adapter's folder, as :func:`streammerge.adapters.find_adapter_dir` picks it: "" for ``root`` when
    it holds adapter_config.json (a link, dangling or not), "NAME/" for its single subfolder holding one,
    else None."""
    if os.path.lexists(root / "adapter_config.json"):
        return ""
    subs = [p.name for p in root.iterdir() if p.is_dir() and os.path.lexists(p / "adapter_config.json")]
    return subs[0] + "/" if len(subs) == 1 else None


def _index_shards(index: Path) -> set[str]:
    """The shard files a readable shard index names (an unreadable one is reported when it is read)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        return {f for f in weight_map.values() if isinstance(f, str) and f == Path(f).name}
    except (OSError, ValueError, AttributeError):
        return set()


def _copied(name: str) -> bool:
    """Whether a base's file is copied beside the merged weights (:func:`streammerge.sinks.outdir.aux_files`)."""
    from .sinks.outdir import SKIP_FILES, WEIGHT_SUFFIXES

    return not name.startswith(".") and name not in SKIP_FILES and not name.endswith(WEIGHT_SUFFIXES)


def _snapshot_source(path: Path) -> tuple[str, str, str] | None:
    """(repo id, revision, commit) for a directory that is a snapshot of the Hub cache passed as a path
    (``.../models--ORG--NAME/snapshots/COMMIT``)."""
    real = path.resolve()
    repo = real.parent.parent.name
    if real.parent.name != "snapshots" or not repo.startswith("models--") or "--" not in repo[8:]:
        return None
    return repo[8:].replace("--", "/", 1), real.name, real.name


def _where(source: tuple[str, str, str]) -> str:
    repo_id, revision, commit = source
    return f"{repo_id} (revision {revision}, commit {commit})" if revision != commit else f"{repo_id} (commit {commit})"


def _fetch_again(source: tuple[str, str, str], files: list[str]) -> str:
    """Download a snapshot's files again, at its commit (huggingface_hub replaces the dangling links);
    "" or why it failed."""
    import huggingface_hub

    repo_id, _, commit = source
    try:
        for rel in files:
            huggingface_hub.hf_hub_download(repo_id, rel, revision=commit)
    except Exception as e:  # huggingface_hub raises HTTP, connection, auth and OS errors
        return f"{type(e).__name__}: {e}"
    return ""


def _dangling_error(root: Path, bad: list, source, cls: type, failure: str = ""):
    n = len(bad)
    details = [f"{rel}: {link} -> {target} (missing)" for rel, link, target in bad]
    them = "it" if n == 1 else "them"
    if source is None:
        if n == 1:
            rel, link, target = bad[0]
            message = f"{root}: {rel} is a dangling symlink ({link} -> {target}, which does not exist)"
            hint = "restore the file it points to, or replace the link with the file"
        else:
            message = f"{root}: {n} files are dangling symlinks (the files they point to do not exist)"
            hint = "restore the files they point to, or replace the links with the files"
        return cls(message, details=details, hint=hint)
    repo_id, _, commit = source
    what = (
        f"{bad[0][0]} of the cached snapshot is a dangling link (its blob was deleted from the cache)"
        if n == 1
        else f"{n} files of the cached snapshot are dangling links (their blobs were deleted from the cache)"
    )
    if failure:
        what += f"; downloading {them} again failed ({failure})"
    command = shlex.join(["hf", "download", repo_id, *(rel for rel, _, _ in bad), "--revision", commit])
    return cls(
        f"{_where(source)}: {what}",
        details=details,
        hint=f"download {them} again with the network allowed (HF_HUB_OFFLINE unset): `{command}`"
        + ("" if failure else f"; a run with the network allowed downloads {them} by itself"),
    )


def base_from_adapter(adapter: Resolved) -> str:
    """The base an adapter was trained on: ``base_model_name_or_path`` in its ``adapter_config.json``."""
    from .adapters import CONFIG_NAME, find_adapter_dir
    from .errors import AdapterError
    from .source import read_json

    cfg = read_json(find_adapter_dir(adapter.path) / CONFIG_NAME, CONFIG_NAME, AdapterError)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise AdapterError(
            f"{adapter.path}: adapter_config.json names no base_model_name_or_path",
            hint="pass the base explicitly: streammerge merge BASE ADAPTER OUT",
        )
    return base


def full_precision_sibling(base: Resolved, config: dict) -> str | None:
    """For a pre-quantized repo (``...-bnb-4bit``) whose 16-bit sibling is in the cache: that repo id.
    Nothing is downloaded to find out."""
    qc = config.get("quantization_config") or {}
    if base.repo_id is None or not qc:
        return None
    from huggingface_hub import try_to_load_from_cache

    for suffix in QUANT_SUFFIXES:
        if base.repo_id.lower().endswith(suffix.lower()):
            sibling = base.repo_id[: -len(suffix)]
            if isinstance(try_to_load_from_cache(sibling, "config.json"), str):
                return sibling
    return None


def model_card(report) -> str:
    """README.md for a pushed merge: what it was made from, and how."""
    base = report.base_source.get("repo_id") or report.base
    adapters = "\n".join(f"- `{_name(a)}` (weight {a['weight']:g})" for a in report.adapters)
    return (
        f"---\nbase_model: {base}\nlibrary_name: transformers\ntags:\n- merged\n- lora\n- streammerge\n---\n\n"
        f"# Merged model\n\nThe LoRA adapter(s) below merged into `{base}`"
        + (f" (commit `{report.base_source['commit']}`)" if report.base_source.get("commit") else "")
        + f" by streammerge {report.version} (`--save-method {report.options['save_method']}`, "
        f"`--dtype {report.options['dtype']}`), merged onto {report.merged_onto}.\n\n{adapters}\n"
    )


def _name(adapter: dict) -> str:
    src = adapter.get("source") or {}
    return f"{src['repo_id']}@{src['commit']}" if src.get("repo_id") else adapter["path"]


def push(out: Path, repo_id: str, private: bool, revision: str | None, report, api=None) -> str:
    """Upload OUT (with a model card) to ``repo_id``; returns the repo URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    (out / "README.md").write_text(model_card(report), encoding="utf-8")
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        upload = getattr(api, "upload_large_folder", None)
        if upload is not None:  # resumable, many files in parallel
            upload(repo_id=repo_id, folder_path=str(out), repo_type="model", revision=revision, private=private)
        else:
            message = f"streammerge {report.version}: merged {report.base_source.get('repo_id') or report.base}"
            api.upload_folder(repo_id=repo_id, folder_path=str(out), revision=revision, commit_message=message)
    except Exception as e:  # huggingface_hub raises HTTP, auth and OS errors
        raise OutputError(
            f"{repo_id}: upload failed ({type(e).__name__}: {e}); the merged model is complete in {out}",
            hint="set HF_TOKEN (write access) and run the upload again, e.g. `hf upload " + repo_id + f" {out}`",
        ) from None
    return str(url)
