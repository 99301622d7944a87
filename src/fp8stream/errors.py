"""The one error type users see. Its message is a single line naming the file / tensor at fault."""


class Fp8StreamError(Exception):
    """Bad input or an impossible request. `str(err)` is one line; the CLI prints it and exits 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CheckpointError(Fp8StreamError):
    """The checkpoint on disk is missing, corrupt, or does not fit the model its config.json describes."""


class UnsupportedModelError(Fp8StreamError):
    """The architecture cannot be streamed into FP8 correctly (rather than producing a wrong model)."""


class OutOfMemoryError(Fp8StreamError):
    """final + staging does not fit the device's free memory; raised before any weight is read."""
