"""``streammerge inspect PATH``: describe a checkpoint or an adapter directory."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import EXIT_OK, common_args, fmt_bytes, print_json


def add_parser(sub) -> None:
    i = sub.add_parser(
        "inspect",
        help="describe a checkpoint or adapter directory",
        description="Describe a checkpoint or an adapter. With --base, also show how each adapter module "
        "maps onto the base's tensors, and by which rule (nothing is written).",
    )
    i.add_argument("path", metavar="PATH")
    i.add_argument("--base", metavar="BASE", help="for an adapter: the base checkpoint to map it onto")
    common_args(i)


def _checkpoint(p: Path) -> dict:
    from ..source import open_checkpoint

    ck = open_checkpoint(p)
    dtypes: dict[str, int] = {}
    for t in ck.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    cfg = ck.config
    return {
        "kind": "checkpoint",
        "path": str(p),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "dtype": cfg.get("dtype", cfg.get("torch_dtype")),
        "tie_word_embeddings": cfg.get("tie_word_embeddings"),
        "vocab_size": cfg.get("vocab_size"),
        "quantization_config": cfg.get("quantization_config"),
        "shards": [Path(f).name for f in ck.shard_files],
        "tensors": len(ck.tensors),
        "total_bytes": ck.total_bytes,
        "bytes_by_dtype": dtypes,
        "tensor_list": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ck.tensors.values()],
    }


def _adapter(p: Path) -> dict:
    from ..adapters import find_adapter_dir, load_adapter
    from ..source import Reader

    reader = Reader()
    try:
        ad = load_adapter(find_adapter_dir(p), reader)
    finally:
        reader.close()
    c = ad.config
    return {
        "kind": "adapter",
        "peft_type": c.get("peft_type", "LORA"),
        "path": ad.path,
        "weights_file": ad.weights_file,
        "base_model_name_or_path": c.get("base_model_name_or_path"),
        "r": c.get("r"),
        "lora_alpha": c.get("lora_alpha"),
        "use_rslora": c.get("use_rslora", False),
        "use_dora": c.get("use_dora", False),
        "target_modules": c.get("target_modules"),
        "modules_to_save": c.get("modules_to_save"),
        "target_parameters": c.get("target_parameters"),
        "lora_modules": len(ad.modules),
        "parameter_loras": sum(len(w) for w in ad.params.values()),
        "replacements": sorted(ad.replacements),
        "trainable_tokens": sorted(ad.tokens),
        "tensors": len(ad.tensors),
        "total_bytes": sum(t.nbytes for t in ad.tensors.values()),
        "modules": [
            {"module": m.module, "kind": m.kind, "r": m.r, "alpha": m.alpha, "scaling": m.scaling}
            for m in ad.modules.values()
        ]
        + [_other(m) for m in ad.others.values()],
    }


def _other(m) -> dict:
    """A module of another adapter type: its kind and its scalar parameters (no tensors)."""
    scalars = {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str)) and k != "origin"}
    return {"module": m.module, "kind": m.kind, **scalars}


def _mapping(adapter: str, base: str) -> list[dict]:
    """What a merge of ``adapter`` into ``base`` would do per module (planned from headers only)."""
    from ..options import MergeOptions
    from ..plan import plan_merge
    from ..source import Reader

    reader = Reader()
    try:
        _, _, plan = plan_merge(base, [(adapter, 1.0)], MergeOptions(), reader)
    finally:
        reader.close()
    return [{"module": m.module, "tensor": m.tensor, "kind": m.kind, "rule": m.rule} for m in plan.modules]


def describe(path: str, base: str | None = None) -> dict:
    from .. import hub
    from ..adapters import CONFIG_NAME

    src = hub.resolve(path, "any")
    p = src.path
    if (p / "config.json").is_file() and not (p / CONFIG_NAME).is_file():
        info = _checkpoint(p)
    else:
        info = _adapter(p)
        if base:
            info["mapping"] = _mapping(str(p), str(hub.resolve(base, "base").path))
    if src.repo_id:
        info["source"] = src.describe()
    return info


def _print(info: dict, out) -> None:
    for k, v in info.items():
        if k not in ("tensor_list", "modules", "mapping"):
            out.write(f"{k}: {fmt_bytes(v) if k.endswith('bytes') and isinstance(v, int) else v}\n")
    if info["kind"] == "checkpoint":
        for t in info["tensor_list"]:
            out.write(f"  {t['name']}  {t['dtype']}  {t['shape']}\n")
    else:
        for m in info["modules"]:
            out.write(f"  {m['kind']:<9} {m['module']}  r={m['r']} alpha={m['alpha']:g} scaling={m['scaling']:.6g}\n")
    if "mapping" in info:
        out.write("mapping onto the base:\n")
        for m in info["mapping"]:
            out.write(f"  {m['kind']:<9} {m['module']}  -> {m['tensor']}  [{m['rule']}]\n")


def run(args, log) -> int:
    info = describe(args.path, args.base)
    if args.json:
        print_json(info)
    else:
        _print(info, sys.stdout)
    return EXIT_OK
