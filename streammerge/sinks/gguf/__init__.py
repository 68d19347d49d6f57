"""The GGUF output (``--save-method gguf``), one package: ``model`` (llama.cpp's architecture metadata and
tensor names, as its converter writes them), ``vocab`` (the tokenizer keys), ``writer`` (the file laid out
from the plan, header first, tensors streamed as merged; k-quants by llama.cpp) and ``ollama`` (the
Modelfile)."""

from __future__ import annotations

from .writer import GgufLayout, finish_gguf, plan_gguf, q8_0, quantize

__all__ = ["GgufLayout", "finish_gguf", "plan_gguf", "q8_0", "quantize"]
