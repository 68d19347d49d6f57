"""streammerge: merge LoRA adapters into safetensors checkpoints out of core, exactly as PEFT does."""

__version__ = "0.1.0"

from .errors import AdapterError, InputError, NonFiniteError, OutputError, QuantError, StreamMergeError  # noqa: E402
from .run import MergeReport, merge  # noqa: E402

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
