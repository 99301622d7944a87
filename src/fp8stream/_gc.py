"""The cyclic garbage collector paused over a stretch that makes objects but no cyclic garbage worth collecting."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def gc_paused():
    """Collector off inside, back to its previous state after (also on an exception; nests).

    Why: a full collection walks every tracked Python object, and importing torch + transformers creates a few
    hundred thousand of them, setting off collections that find almost nothing to free (issue 19: 0.18 s of a
    bare `import torch, transformers` on the 2-core CI box); a load's 19k-tensor plan likewise (loader.load)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
