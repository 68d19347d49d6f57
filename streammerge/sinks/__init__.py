"""Output formats, one module each: ``safetensors`` (merged shards, header first, O_DIRECT staging),
``bnb4`` (merged_4bit: a per-tensor encoding the safetensors sink writes, and its config), ``lora``
(the normalized adapter, no merge). ``outdir`` holds what they share: the hidden work directory
published atomically, the resume journal, the lock, checksums and side files.

A per-tensor *encoding* (``TensorJob.encoding``) turns merged values into the stored tensors of an
output format: ``outputs(name, shape)`` -> ``[(name, dtype, shape)]`` known before any byte is read,
``encode(name, merged, ws, r0, rows)`` -> ``(name, tensor)`` pairs in that order for the merged row
block starting at ``r0`` of ``rows``, ``whole_tensor`` (it needs all rows at once; else ``row_align``,
the row multiple its blocks must start on), ``work_bytes`` (temporaries per element) and
``copy_parts(source)`` (the stored tensors to copy unchanged when no update touches the tensor, or None).
"""

from __future__ import annotations

from . import bnb4, fp8, mxfp4

#: save method -> (per-tensor encoding chooser, config editor); merged_16bit needs neither.
ENCODINGS = {
    "merged_4bit": (bnb4.encoding_for, bnb4.edit_config),
    "merged_fp8": (fp8.encoding_for, fp8.edit_config),
    "mxfp4": (mxfp4.encoding_for, mxfp4.edit_config),
}
