"""fp8stream: stream a full-precision Hugging Face checkpoint into a runnable FP8 model.

    model = fp8stream.load("path/to/checkpoint", device="cuda", scheme="fp8_per_channel")
    print(model.fp8stream_report)
"""

from ._gc import gc_paused as _gc_paused

# The imports below are torch's and most of fp8stream's (transformers' modeling modules come with the first load,
# which pauses the collector itself): with the collector paused they cost no collections that would find nothing
# to free (_gc.py).
with _gc_paused():
    # Before any process group exists: torch.distributed.nn's functions take `group=group.WORLD` as a default
    # argument, evaluated when the module is imported. Imported after init_process_group (transformers'
    # modeling_utils pulls it in through torch.distributed.fsdp when the first model is built), ten of those
    # defaults hold the default group for the life of the process: destroy_process_group then cannot free it,
    # its gloo worker threads run on into interpreter shutdown, and one of them that drops the last
    # all_gather's tensors there needs the GIL and aborts the process ("terminate called without an active
    # exception", SIGABRT; 2 of 30 torchrun CLI loads before this import). 2 ms.
    import torch.distributed.nn  # noqa: F401  (see above)

    from .errors import CheckpointError, Fp8StreamError, OutOfMemoryError, UnsupportedModelError
    from .export import export
    from .loader import load
    from .quantize import SCHEMES
    from .reload import reload
    from .report import LoadReport

__all__ = ["load", "reload", "export", "LoadReport", "SCHEMES", "Fp8StreamError", "CheckpointError", "UnsupportedModelError", "OutOfMemoryError"]
__version__ = "0.1.0"
