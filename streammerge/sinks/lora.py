"""The lora output (``--save-method lora``): no merge; the adapter, validated against the base, rewritten
as safetensors under the key names PEFT's ``save_pretrained`` writes, with its config and tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

from ..adapters import PEFT_PREFIX, Adapter
from ..errors import OutputError
from ..report import REPORT_NAME
from ..source import tensor_bytes
from .outdir import commit_work_dir, copy_file, discard_work_dir, prepare_work_dir, tokenizer_files, write_json
from .safetensors import ShardWriter

_LORA_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|ia3_l|token_adapter\.trainable_tokens_delta)"
    r"\.(?!weight$|bias$)[^.]+(?=\.|$)"
)


def normalized_adapter_key(key: str) -> str:
    """The key PEFT's ``save_pretrained`` would write: ``base_model.model.`` prefix, no adapter name."""
    key = _LORA_PART.sub(r".\1", key)
    key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
    return key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key


def write_lora(ad: Adapter, out: Path, reader, report, direct: bool = True) -> None:
    """Write the normalized adapter directory to ``out`` (atomically, like a merge)."""
    work = prepare_work_dir(out)
    try:
        refs = sorted(ad.tensors.values(), key=lambda r: normalized_adapter_key(r.name))
        specs = [(normalized_adapter_key(r.name), r.dtype, r.shape) for r in refs]
        if len({s[0] for s in specs}) != len(specs):
            raise OutputError(f"{ad.weights_file}: keys collide once the adapter name is removed")
        algo = report.options.get("checksum", "xxh3")
        writer = ShardWriter(work / "adapter_model.safetensors", specs, {"format": "pt"}, checksum=algo, direct=direct)
        try:
            for (name, _, _), ref in zip(specs, refs, strict=True):
                data = reader.raw(ref) if ref.offset >= 0 else tensor_bytes(reader.tensor(ref))
                writer.write(name, data)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        write_json(work / "adapter_config.json", ad.config)
        for name, p in tokenizer_files(ad.path).items():
            copy_file(p, work / name)
        total = sum(r.nbytes for r in refs)
        report.shards = [
            {"file": "adapter_model.safetensors", "bytes": total, "tensors": len(refs), "checksum": writer.checksum}
        ]
        report.total_size = total
        write_json(work / REPORT_NAME, report.to_dict())
        commit_work_dir(work, out)
    except BaseException:
        discard_work_dir(work)
        raise
