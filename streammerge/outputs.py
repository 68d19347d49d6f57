"""The output registry: one :class:`Output` per ``--save-method``. Each says what it writes (its
container), the per-tensor encoding and config edits of its sink (imported when first used, so this
module stays importable from the lowest layers), which options it takes, what its config declares and
how ``verify`` checks it. ``SAVE_METHODS`` and the command line's choices come from here; adding an
output is one sink module plus one entry below (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .errors import UsageError

#: containers: safetensors shards (+ index, config, side files), one GGUF file (+ Modelfile), an adapter folder
SHARDS, GGUF, ADAPTER = "shards", "gguf", "adapter"


@dataclass(frozen=True)
class Output:
    name: str  # the --save-method value
    container: str  # SHARDS, GGUF or ADAPTER
    help: str
    sink: str | None = None  # streammerge.sinks module with encoding_for(...) and edit_config(...)
    quant_method: str | None = None  # config.json's quantization_config.quant_method the output declares
    quant_label: str = ""  # how the stored format is named in messages
    quant_flag: str | None = None  # a quantization_config field that must be true (bitsandbytes: load_in_4bit)
    takes: tuple[str, ...] = ()  # option groups beyond the common ones: "quant", "gguf_type"
    warning: str | None = None  # said in every report of this output

    @property
    def merges(self) -> bool:
        """False for an output that writes the adapter itself (no merged weights)."""
        return self.container != ADAPTER

    @property
    def compressible(self) -> bool:
        return self.container == SHARDS

    def _sink(self):
        return importlib.import_module(f"streammerge.sinks.{self.sink}") if self.sink else None

    @property
    def encoding_for(self):
        """``(name, source, shape, embed_key, opts) -> encoding | None`` for a re-encoding output, else None."""
        sink = self._sink()
        return sink.encoding_for if sink else None

    @property
    def edit_config(self):
        """``(config, base_config, jobs, embed_key, where, notes) -> None`` for a re-encoding output, else None."""
        sink = self._sink()
        return sink.edit_config if sink else None


OUTPUTS: dict[str, Output] = {
    o.name: o
    for o in (
        Output("merged_16bit", SHARDS, "dense merged model"),
        Output(
            "merged_4bit",
            SHARDS,
            "merged then re-quantized with bitsandbytes (loses precision)",
            sink="bnb4",
            quant_method="bitsandbytes",
            quant_label="bitsandbytes 4-bit",
            quant_flag="load_in_4bit",
            takes=("quant",),
            warning="merged_4bit re-quantizes the merged weights: the result is less precise than merged_16bit "
            "(each weight moves to the nearest 4-bit code after the merge)",
        ),
        Output(
            "merged_fp8",
            SHARDS,
            "an FP8 base stays so (merged weights re-quantized, the rest copied)",
            sink="fp8",
            quant_method="fp8",
            quant_label="FP8 block-scaled",
        ),
        Output(
            "mxfp4",
            SHARDS,
            "an MXFP4 base stays so (merged experts re-quantized, the rest copied)",
            sink="mxfp4",
            quant_method="mxfp4",
            quant_label="MXFP4",
        ),
        Output("gguf", GGUF, "one llama.cpp / Ollama file (see --gguf-type) and a Modelfile", takes=("gguf_type",)),
        Output("lora", ADAPTER, "no merge: a validated and normalized adapter directory"),
    )
}
SAVE_METHODS = tuple(OUTPUTS)


def output(name: str) -> Output:
    """The registry entry of save method ``name`` (a usage error when there is none)."""
    try:
        return OUTPUTS[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown save method {name!r}", hint=f"use one of {', '.join(SAVE_METHODS)}") from None


def save_method_help() -> str:
    return "; ".join(f"{o.name}: {o.help}" for o in OUTPUTS.values())
