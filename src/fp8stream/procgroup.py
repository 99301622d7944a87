"""The CLI's torchrun process group: join it, turn one rank's failure into every rank's prompt exit, leave it.

A rank that fails writes its one-line error into the launcher's key-value store before it leaves. The other
ranks learn of it three ways, whichever comes first: their next collective fails (gloo: the peer's sockets
closed), torchrun's SIGTERM (raised here as `Stopped` in the main thread), or `PeerWatch`, a thread that polls
the store, for a main thread stuck in a collective that never returns (NCCL). Each then prints one line naming
its rank and the failing rank's error and exits non-zero, instead of hanging until the launcher kills it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from .errors import Fp8StreamError

FAILED_KEY = "fp8stream/failed"
POLL_S = 0.2
_report_lock = threading.Lock()  # one line per process: the main thread's or the watcher's, never both


class Stopped(Fp8StreamError):
    """This rank was told to stop (SIGTERM from the launcher, or a peer rank failed)."""


def join(device: str | None) -> bool:
    """Under torchrun (WORLD_SIZE > 1): initialise the default process group (NCCL for CUDA, else gloo), pin
    this process to cuda:LOCAL_RANK, turn SIGTERM into `Stopped`. Returns whether this process is in a group."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return False
    if not dist.is_initialized():
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def _on_sigterm(signum, frame):
    raise Stopped("terminated (SIGTERM from the launcher)")


def rank() -> int | None:
    """This process's rank, None outside an initialised process group."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def _store():
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except Exception:  # no store (a group initialised without one): failures then travel only by collectives
        return None


def publish_failure(message: str) -> None:
    """Tell the other ranks why this one stops (first line wins; best effort)."""
    store = _store()
    if store is None:
        return
    try:
        if not store.check([FAILED_KEY]):
            store.set(FAILED_KEY, message)
    except Exception:
        pass


def peer_failure(me: int) -> str | None:
    """Another rank's published error, if any."""
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([FAILED_KEY]):
            return None
        message = store.get(FAILED_KEY).decode("utf-8", "replace")
    except Exception:
        return None
    return None if message.startswith(f"rank {me}:") else message


def claim_report() -> bool:
    """True for the first caller in this process: it prints the one error line."""
    return _report_lock.acquire(blocking=False)


def release_report() -> None:
    """End of one CLI invocation: the next one in this process may print its own line."""
    if _report_lock.locked():
        _report_lock.release()


class PeerWatch:
    """Polls the store for another rank's failure; on one, prints this rank's line and exits the process at
    once (os._exit: the main thread may be inside a collective that will never return)."""

    def __init__(self, me: int):
        self.me = me
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fp8stream-peerwatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            failed = peer_failure(self.me)
            if failed is not None and claim_report():
                print(f"fp8stream: error: rank {self.me}: stopped because {failed}", file=sys.stderr, flush=True)
                os._exit(2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def leave() -> None:
    """Destroy the process group (if any) and restore SIGTERM."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a group broken by a failed peer: nothing left to tear down cleanly
            pass
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
