"""streammerge: merge LoRA adapters into safetensors checkpoints out of core, exactly as PEFT does."""

from .errors import AdapterError, InputError, NonFiniteError, OutputError, QuantError, StreamMergeError
from .merge import merge
from .report import MergeReport
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
