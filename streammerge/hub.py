"""Hugging Face Hub repo ids: ``ORG/NAME[@REVISION]`` resolved to a snapshot directory of the local
cache with ``huggingface_hub`` (honouring ``HF_HUB_CACHE`` / ``HF_HOME``, ``HF_HUB_OFFLINE`` and
``HF_TOKEN``), read in place through the snapshot's links: nothing is copied. Only what a merge needs is
fetched, and only when it is not cached and the network is allowed; a path that exists locally always
wins over a repo id of the same spelling. Also: the 16-bit sibling of a pre-quantized base, and
``--push-to-hub``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, OutputError

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
    when the network is allowed). ``kind``: ``base`` or ``adapter`` (which files are needed)."""
    spec = str(spec)
    parsed = parse(spec)
    if parsed is None:
        return Resolved(spec, Path(spec).expanduser())
    repo_id, revision = parsed
    patterns = {"base": BASE_PATTERNS, "adapter": ADAPTER_PATTERNS}.get(kind, [*BASE_PATTERNS, *ADAPTER_PATTERNS])
    path = _snapshot(repo_id, revision, patterns, spec)
    if kind == "adapter" and not (path / "adapter_model.safetensors").exists():
        path = _snapshot(repo_id, revision, [*patterns, "adapter_model.bin"], spec)  # an older adapter
    return Resolved(spec, path, repo_id, revision or "main", path.name)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], spec: str) -> Path:
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
    except (LocalEntryNotFoundError, IncompleteSnapshotError, FileNotFoundError):
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


def base_from_adapter(adapter: Resolved) -> str:
    """The base an adapter was trained on: ``base_model_name_or_path`` in its ``adapter_config.json``."""
    from .adapter import CONFIG_NAME, find_adapter_dir
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
