"""streammerge: merge LoRA adapters into safetensors checkpoints out of core, exactly as PEFT does."""

__version__ = "0.1.0"

from .errors import AdapterError, InputError, NonFiniteError, OutputError, QuantError, StreamMergeError
from .run import MergeReport, merge

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
