"""Output formats, one module each: ``safetensors`` (merged shards, header first, O_DIRECT staging),
``bnb4`` / ``fp8`` / ``mxfp4`` (per-tensor encodings the safetensors sink writes, and their config
edits), ``gguf`` and ``ollama`` (one llama.cpp file and its Modelfile), ``lora`` (the normalized adapter,
no merge). ``outdir`` holds what they share: the hidden work directory published atomically, the resume
journal, the lock, checksums and side files. Which save method uses which is the registry's
(``streammerge.outputs``).

A per-tensor *encoding* (``TensorJob.encoding``) turns merged values into the stored tensors of an
output format: ``outputs(name, shape)`` -> ``[(name, dtype, shape)]`` known before any byte is read,
``encode(name, merged, ws, r0, rows)`` -> ``(name, tensor)`` pairs in that order for the merged row
block starting at ``r0`` of ``rows``, ``whole_tensor`` (it needs all rows at once; else ``row_align``,
the row multiple its blocks must start on), ``work_bytes`` (temporaries per element) and
``copy_parts(source)`` (the stored tensors to copy unchanged when no update touches the tensor, or None).
A sink module with an encoding exposes ``encoding_for(name, source, shape, embed_key, opts)`` and
``edit_config(config, base_config, jobs, embed_key, where, notes)``.
"""
