"""fp8stream: stream a full-precision Hugging Face checkpoint into a runnable FP8 model.

    model = fp8stream.load("path/to/checkpoint", device="cuda", scheme="fp8_per_channel")
    print(model.fp8stream_report)
"""

from .errors import CheckpointError, Fp8StreamError, OutOfMemoryError, UnsupportedModelError
from .export import export
from .loader import load
from .quantize import SCHEMES
from .report import LoadReport

__all__ = ["load", "export", "LoadReport", "SCHEMES", "Fp8StreamError", "CheckpointError", "UnsupportedModelError", "OutOfMemoryError"]
__version__ = "0.1.0"
