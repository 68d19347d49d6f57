"""streammerge: merge LoRA adapters into safetensors checkpoints out of core, exactly as PEFT does.

``merge`` and ``MergeReport`` are loaded on first use, so that ``streammerge --version``, ``--help``
and the command line's start-up do not pay for importing torch before they need it.
"""

from .errors import AdapterError, InputError, NonFiniteError, OutputError, QuantError, StreamMergeError
from .version import __version__

__all__ = [
    "AdapterError",
    "InputError",
    "MergeReport",
    "NonFiniteError",
    "OutputError",
    "QuantError",
    "StreamMergeError",
    "__version__",
    "merge",
]


def __getattr__(name: str):
    if name == "merge":
        from .api import merge

        return merge
    if name == "MergeReport":
        from .report import MergeReport

        return MergeReport
    raise AttributeError(f"module 'streammerge' has no attribute {name!r}")
